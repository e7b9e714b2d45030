# Copyright (c) mmprecond contributors. All rights reserved.
"""Mask R-CNN R50 + NKFAC: an affordable checkpoint, and an exact resume.

The zoo's ``nkfac/mask-rcnn_r50_fpn_nkfac-1x_coco.py`` and its AdamW
baseline (real mmdet models; only data, classes, image size and length
changed by ``tools/misc/on_synthetic.py``) train on the synthetic COCO set
on the CPU and write checkpoints through MMEngine's ``CheckpointHook``.
The optimizer entries of those files are compared, and a run resumed from
the NKFAC checkpoint must end bit for bit where the uninterrupted run does.

Several minutes on 2 CPU cores: ``slow`` and ``zoo`` (``make test-zoo``).
"""
import importlib.util
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TOOLS_DIR
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

from mmprecond.engine.checkpoint_size import saved_state_breakdown

# 12 minutes on 2 cores (two real Mask R-CNN R50 runs and a resume): heavy,
# so it runs in `make test-zoo` but not in CI's time budget
pytestmark = [pytest.mark.slow, pytest.mark.zoo, pytest.mark.heavy]

NKFAC_CFG = REPO_ROOT / 'configs/nkfac/mask-rcnn_r50_fpn_nkfac-1x_coco.py'
ADAMW_CFG = REPO_ROOT / 'configs/baselines/mask-rcnn_r50_fpn_adamw-1x_coco.py'


def _on_synthetic():
    spec = importlib.util.spec_from_file_location(
        'on_synthetic', TOOLS_DIR / 'misc' / 'on_synthetic.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class SeedEachIteration(Hook):
    """Seeds torch's RNG from the iteration before each step's forward.

    Mask R-CNN samples RoIs with the global RNG, which a resumed process
    does not carry over; seeding by iteration makes the uninterrupted and
    the resumed run draw the same samples at the same iteration.
    """

    priority = 'VERY_HIGH'

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        torch.manual_seed(1000 + runner.iter)


def mask_rcnn_cfg(path: Path, data_root: Path, work_dir: Path,
                  max_iters: int) -> Config:
    cfg = _on_synthetic().synthetic_config(
        Config.fromfile(str(path)), data_root=str(data_root), img_size=128,
        max_iters=max_iters, batch_size=1, num_workers=0, fp32=True)
    for split in ('val', 'test'):
        cfg[f'{split}_cfg'] = None
        cfg[f'{split}_dataloader'] = None
        cfg[f'{split}_evaluator'] = None
    # no random flip: the data of an iteration must not depend on the RNG
    for step in cfg.train_dataloader.dataset.pipeline:
        if step.get('type') == 'RandomFlip':
            step['prob'] = 0.0
    cfg.train_cfg.val_interval = 10**6
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=2,
                                        by_epoch=False, save_last=False)
    cfg.default_hooks.logger.interval = 1
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'{path.stem}_{time.time_ns()}'
    cfg.randomness = dict(seed=0)
    return cfg


def optimizer_bytes(ckpt_path: Path) -> int:
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    return sum(saved_state_breakdown(ckpt['optimizer'])[0].values()), ckpt


def train(cfg: Config) -> Runner:
    runner = Runner.from_cfg(cfg)
    runner.register_hook(SeedEachIteration())
    runner.train()
    return runner


def test_mask_rcnn_nkfac_checkpoint_size_and_resume(tiny_coco, tmp_path):
    adamw = train(mask_rcnn_cfg(ADAMW_CFG, tiny_coco, tmp_path / 'adamw', 2))
    adamw_bytes, adamw_ckpt = optimizer_bytes(tmp_path / 'adamw' / 'iter_2.pth')
    del adamw

    # uninterrupted: 3 iterations, the checkpoint written after the 2nd
    full = train(mask_rcnn_cfg(NKFAC_CFG, tiny_coco, tmp_path / 'nkfac', 3))
    ckpt_path = tmp_path / 'nkfac' / 'iter_2.pth'
    nkfac_bytes, nkfac_ckpt = optimizer_bytes(ckpt_path)
    pre = nkfac_ckpt['optimizer']['preconditioner']
    # factors packed; the exact inverses of step 0 left out (rebuilt at load)
    assert not any(k.endswith(('_inv', '_root')) for st in pre['layers'].values()
                   for k in st)
    packed = sum(len(v) for v in pre['packed'].values())
    factors = sum(len(st) for st in pre['layers'].values())
    assert packed >= 0.9 * factors, (packed, factors)
    ratio = nkfac_bytes / adamw_bytes
    file_ratio = ckpt_path.stat().st_size / (tmp_path / 'adamw' /
                                             'iter_2.pth').stat().st_size
    print(f'optimizer state: NKFAC {nkfac_bytes} B, AdamW {adamw_bytes} B '
          f'({ratio:.3f}x); checkpoint files {file_ratio:.3f}x')
    # SGDM's momentum (half AdamW's moments) plus the packed fp32 factors:
    # see docs/checkpoints.md for why 1.5x of the optimizer entry alone is
    # out of reach without dropping exactness
    assert ratio <= 1.75, ratio
    assert file_ratio <= 1.5, file_ratio

    # resume from iter_2 and take the 3rd iteration
    cfg = mask_rcnn_cfg(NKFAC_CFG, tiny_coco, tmp_path / 'resumed', 3)
    cfg.resume, cfg.load_from = True, str(ckpt_path)
    resumed = train(cfg)
    assert resumed.iter == 3
    want = full.model.state_dict()
    got = resumed.model.state_dict()
    assert set(want) == set(got)
    for key, value in want.items():
        assert torch.equal(value, got[key]), key
    opt_a = full.optim_wrapper.optimizer
    opt_b = resumed.optim_wrapper.optimizer
    for name, st in opt_a.layer_state.items():
        for key, value in st.items():
            assert torch.equal(value, opt_b.layer_state[name][key]), (name, key)

    # what stays large was logged once at the start and once at the save
    log = Path(full.log_dir, f'{full.timestamp}.log').read_text()
    assert log.count('a checkpoint will hold about') == 1
    assert log.count('optimizer state in this checkpoint') == 1
    del adamw_ckpt

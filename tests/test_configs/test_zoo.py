# Copyright (c) mmprecond contributors. All rights reserved.
"""Every zoo config trains on the synthetic data through MMEngine's Runner.

Each config under ``configs/`` (``_base_`` and ``demo`` excepted) is moved
onto the synthetic data with ``tools/misc/on_synthetic.py`` (its model,
pipelines and optim wrapper unchanged; classes, image size, pretrained
weights and length reduced) and trained for two iterations on the CPU.
The losses must be finite and the parameters must move.

All trainings are ``slow``; by default one config per model family x
optimizer runs (``make test``, about 8 minutes on 2 cores) and the other
configs are also marked ``zoo``::

    pytest tests/test_configs -m zoo        # the configs outside the subset
    pytest tests/test_configs               # the whole zoo (make test-zoo)
"""
import importlib.util
import math
import time
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from conftest import REPO_ROOT, TOOLS_DIR
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

CONFIG_DIR = REPO_ROOT / 'configs'
ZOO = sorted(
    p for p in CONFIG_DIR.rglob('*.py')
    if not {'_base_', 'demo'} & set(p.relative_to(CONFIG_DIR).parts))
# Detection runs at 128 px; mmpretrain's Swin needs 224 px (one 7x7 window
# in its last stage), which is also the ImageNet configs' own size.
IMG_SIZE = {'det': 128, 'cls': 224}
MAX_ITERS = 2


def _load_on_synthetic():
    spec = importlib.util.spec_from_file_location(
        'on_synthetic', TOOLS_DIR / 'misc' / 'on_synthetic.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


on_synthetic = _load_on_synthetic()


def config_id(path: Path) -> str:
    return str(path.relative_to(CONFIG_DIR))


def family_key(path: Path) -> str:
    """Model family x optimizer, e.g. ``mask-rcnn|r|nkfac``.

    OpenMMLab names put the optimizer before the schedule
    (``mask-rcnn_r50_fpn_nkfac-1x_coco``, ``..._ms-crop_adankfac-3x_coco``)
    or after the batch (``swin-tiny_16xb64-adankfac_in1k``).  Backbone depth
    (R50 / R101, Swin-T / S / B) and schedule (1x / 2x / 3x) are dropped.
    """
    parts = path.stem.split('_')
    if parts[0].startswith('swin-'):  # mmpretrain
        return f'swin|{parts[1].split("-", 1)[1]}|{parts[-1]}'
    optimizer = parts[-2].rsplit('-', 1)[0]
    arch = 'swin' if parts[1].startswith('swin') else parts[1].rstrip(
        '0123456789')
    return f'{parts[0]}|{arch}|{optimizer}'


def default_subset(paths: List[Path]) -> List[Path]:
    """The first config (in sorted order) of every :func:`family_key`.

    Sorting puts R101 before R50 and Swin-B before Swin-T; prefer the
    smaller model of each family (R50, Swin-T, the 1x schedule).
    """
    chosen: Dict[str, Path] = {}

    def cost(path: Path):
        stem = path.stem
        return ('r101' in stem, 'swin-base' in stem, 'swin-s-' in stem,
                'ms-crop' in stem, stem)

    for path in sorted(paths, key=cost):
        chosen.setdefault(family_key(path), path)
    return sorted(chosen.values())


DEFAULT = default_subset(ZOO)
#: Configs whose first step computes every inverse root from scratch (AdaBK:
#: 10 coupled Newton-Schulz iterations, Shampoo: two nested runs) on factors
#: up to 4608 wide: 7 (Swin-T) to over 10 minutes each on 2 CPU cores, so
#: they train only with ``-m zoo`` and are also marked ``heavy``: CI runs
#: ``-m "zoo and not heavy"`` (its 90 minutes would not hold them), while
#: ``make test-zoo`` runs them too.  The demo detector covers the optimizers
#: in ``tests/test_optim/test_extra_optimizers_mmdet.py``.
CPU_HEAVY = {
    'adabk/faster-rcnn_r50_fpn_sgdm-bk-1x_coco.py',
    'adabk/mask-rcnn_r50_fpn_sgdm-bk-1x_coco.py',
    'adabk/mask-rcnn_swin-t-p4-w7_fpn_adamw-bk-1x_coco.py',
    'adabk/swin-tiny_16xb64-adamw-bk_in1k.py',
    'shampoo/resnet50_8xb32-shampoo_in1k.py',
}
PARAMS = [
    pytest.param(p, id=config_id(p),
                 marks=(pytest.mark.slow, ) if p in DEFAULT
                 and config_id(p) not in CPU_HEAVY else
                 (pytest.mark.slow, pytest.mark.zoo) +
                 ((pytest.mark.heavy, ) if config_id(p) in CPU_HEAVY else ()))
    for p in ZOO
]


class TrainProbe(Hook):
    """Snapshots the trainable parameters and keeps every iteration's losses.

    The snapshot is taken in ``before_train``, after the runner initialised
    the weights.
    """

    priority = 'LOWEST'

    def __init__(self):
        self.before: Dict[str, torch.Tensor] = {}
        self.losses: List[Dict[str, float]] = []

    def before_train(self, runner) -> None:
        self.before = {
            name: p.detach().clone()
            for name, p in runner.model.named_parameters() if p.requires_grad
        }

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        self.losses.append({
            k: float(v) for k, v in outputs.items()
            if isinstance(v, torch.Tensor) and v.numel() == 1
        })


def zoo_cfg(path: Path, data_root: Path, work_dir: Path) -> Config:
    """The zoo config on the synthetic data, 2 iterations, no evaluation."""
    cfg = Config.fromfile(str(path))
    task = on_synthetic.task_of(cfg)
    cfg = on_synthetic.synthetic_config(
        cfg,
        data_root=str(data_root),
        img_size=IMG_SIZE[task],
        max_iters=MAX_ITERS,
        batch_size=2,
        num_workers=0,
        fp32=True)  # AmpOptimWrapper needs a GPU
    for split in ('val', 'test'):
        cfg[f'{split}_cfg'] = None
        cfg[f'{split}_dataloader'] = None
        cfg[f'{split}_evaluator'] = None
    cfg.train_cfg.val_interval = 10**6
    cfg.default_hooks.checkpoint = None
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f'zoo_{path.stem}_{time.time_ns()}'
    cfg.randomness = dict(seed=0)
    cfg.log_level = 'WARNING'
    return cfg


def test_zoo_is_complete() -> None:
    """The zoo holds the thesis' experiments; the subset covers every family."""
    names = {config_id(p) for p in ZOO}
    for name in (
            'baselines/faster-rcnn_r50_fpn_sgd-1x_coco.py',
            'baselines/retinanet_swin-t-p4-w7_fpn_sgd-1x_coco.py',
            'baselines/mask-rcnn_swin-t-p4-w7_fpn_ms-crop_adamw-2x_coco.py',
            'baselines/swin-base_16xb64-adamw_in1k.py',
            'nkfac/faster-rcnn_r101_fpn_nkfac-1x_coco.py',
            'nkfac/retinanet_swin-t-p4-w7_fpn_nkfac-1x_coco.py',
            'nkfac/mask-rcnn_swin-t-p4-w7_fpn_ms-crop_adankfac-3x_coco.py',
            'nkfac/swin-tiny_16xb64-adankfac_in1k.py',
            'adamr/mask-rcnn_r50_fpn_adamr-1x_coco.py',
            'adabk/faster-rcnn_r50_fpn_sgdm-bk-1x_coco.py',
            'adabk/mask-rcnn_r50_fpn_sgdm-bk-1x_coco.py',
            'adabk/mask-rcnn_swin-t-p4-w7_fpn_adamw-bk-1x_coco.py',
            'sgd_ph/resnet18_8xb32-sgd-ph_in1k.py',
            'shampoo/resnet50_8xb32-shampoo_in1k.py',
            'adafisher/resnet50_8xb32-adafisher_in1k.py',
    ):
        assert name in names, name
    assert {family_key(p) for p in DEFAULT} == {family_key(p) for p in ZOO}
    assert CPU_HEAVY <= names
    assert len(DEFAULT) < len(ZOO)


@pytest.mark.parametrize('path', ZOO, ids=config_id)
def test_zoo_config_keeps_model_and_optimizer(path: Path, tmp_path) -> None:
    """Only data, classes, sizes, pretrained weights and length change."""
    cfg = Config.fromfile(str(path))
    derived = on_synthetic.synthetic_config(cfg, max_iters=7)
    # the derived config survives a dump / load round trip
    derived.dump(str(tmp_path / 'derived.py'))
    derived = Config.fromfile(str(tmp_path / 'derived.py'))
    assert derived.optim_wrapper.to_dict() == cfg.optim_wrapper.to_dict()
    assert derived.train_cfg.max_iters == 7
    assert derived.load_from is None

    model, orig = derived.model.to_dict(), cfg.model.to_dict()
    if 'roi_head' in model:
        assert model['roi_head']['bbox_head']['num_classes'] == 5
        if 'mask_head' in model['roi_head']:
            assert model['roi_head']['mask_head']['num_classes'] == 5
    for key in ('bbox_head', 'head'):
        if key in model:
            assert model[key]['num_classes'] == 5
    assert 'Pretrained' not in repr(model)
    # everything else in the model is the zoo config's
    on_synthetic.set_num_classes(orig, 5)
    on_synthetic.drop_pretrained(orig)
    assert model == orig

    dataset = derived.train_dataloader.dataset
    assert dataset.type in ('CocoDataset', 'CustomDataset')
    assert tuple(dataset.metainfo['classes']) == (
        'cross', 'ellipse', 'rectangle', 'ring', 'triangle')


@pytest.mark.parametrize('path', PARAMS)
def test_zoo_config_trains_on_synthetic(path: Path, tiny_coco, tiny_cls,
                                        tmp_path) -> None:
    cfg = Config.fromfile(str(path))
    task = on_synthetic.task_of(cfg)
    if task == 'cls':
        # mmpretrain 1.2 imports torchvision with its models
        pytest.importorskip('torchvision')
    data_root = tiny_coco if task == 'det' else tiny_cls
    opt_type = cfg.optim_wrapper.optimizer.type
    start = time.perf_counter()
    runner = Runner.from_cfg(zoo_cfg(path, data_root, tmp_path))
    probe = TrainProbe()
    runner.register_hook(probe)
    runner.train()
    seconds = time.perf_counter() - start

    assert type(runner.optim_wrapper.optimizer).__name__ == opt_type
    assert len(probe.losses) == MAX_ITERS
    for losses in probe.losses:
        assert 'loss' in losses
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        assert not bad, bad
    # Every trainable top-level module (backbone, neck, heads) was updated.
    # Not every tensor: two warm-up steps (lr x 1e-3) of SGD leave deep
    # backbone weights unchanged in float32.
    after = dict(runner.model.named_parameters())
    moved = {
        name.split('.')[0]
        for name, p in probe.before.items()
        if not torch.equal(p, after[name].detach())
    }
    modules = {name.split('.')[0] for name in probe.before}
    assert moved == modules, f'not updated: {sorted(modules - moved)}'
    print(f'{config_id(path)}: {seconds:.1f} s')

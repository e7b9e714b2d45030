# Copyright (c) mmprecond contributors. All rights reserved.
"""TNT-EF trains the real demo Faster R-CNN (detection losses: no sampling)."""
import pytest
import torch
from conftest import REPO_ROOT, LossRecorder, use_coco_root
from mmengine.config import Config
from mmengine.runner import Runner

pytestmark = pytest.mark.slow

CONFIG = REPO_ROOT / 'configs' / 'tnt' / 'faster-rcnn_r18-tiny_fpn_tnt-ef_synthetic.py'


def test_tnt_ef_config_trains_faster_rcnn(tiny_coco, tmp_path):
    """The shipped TNT-EF detection config (warm start by WarmStartHook, then
    refreshes every 10 iterations here): loss falls, every parameter tensor
    with a factorable mode got an inverse, no inverse failed."""
    iters = 40
    cfg = Config.fromfile(str(CONFIG))
    use_coco_root(cfg, tiny_coco)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters,
                         val_interval=10**6)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
    cfg.optim_wrapper.optimizer.refresh_interval = 10
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10**6)
    cfg.work_dir = str(tmp_path)
    runner = Runner.from_cfg(cfg)
    recorder = LossRecorder()
    runner.register_hook(recorder)
    runner.train()
    opt = runner.optim_wrapper.optimizer
    assert type(opt).__name__ == 'TNT_EF'
    assert opt.fallbacks.counts['inverse_failed'] == 0
    model = runner.model
    for name, p in model.named_parameters():
        if p.requires_grad and opt.factored_modes(p)[1]:
            assert 'Q' + str(opt.factored_modes(p)[1][0]) in opt.state[p], name
            assert bool(torch.isfinite(p).all()), name
    losses = recorder.losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)

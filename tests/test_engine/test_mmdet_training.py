# Copyright (c) mmprecond contributors. All rights reserved.
"""A real mmdet Faster R-CNN trained through MMEngine's Runner."""

import pytest
import torch.nn as nn
from conftest import DEMO_DET_CONFIG, LossRecorder, use_coco_root
from mmengine.config import Config
from mmengine.runner import Runner

pytestmark = pytest.mark.slow


def demo_cfg(data_root, work_dir, optimizer, iters):
    cfg = Config.fromfile(str(DEMO_DET_CONFIG))
    use_coco_root(cfg, data_root)
    cfg.train_cfg.pop('_delete_', None)
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10**6)
    cfg.default_hooks.logger.interval = 10
    cfg.optim_wrapper = dict(
        type='OptimWrapper', constructor='PrecondOptimWrapperConstructor',
        optimizer=optimizer, paramwise_cfg=dict(norm_decay_mult=0.0),
        clip_grad=dict(max_norm=10.0))
    cfg.custom_hooks = [dict(type='PrecondStatsHook', interval=10)]
    cfg.work_dir = str(work_dir)
    return cfg


@pytest.mark.parametrize('optimizer', [
    dict(type='AdaNKFAC', lr=2e-3, weight_decay=0.05, stat_interval=2,
         refresh_interval=6, exact_inv_period=2),
    dict(type='NKFAC', lr=0.02, weight_decay=1e-4, stat_interval=2,
         refresh_interval=6, exact_inv_period=2),
])
def test_faster_rcnn_trains_and_loss_falls(optimizer, tiny_coco, tmp_path):
    iters = 40
    runner = Runner.from_cfg(demo_cfg(tiny_coco, tmp_path, optimizer, iters))
    recorder = LossRecorder()
    runner.register_hook(recorder)
    runner.train()
    opt = runner.optim_wrapper.optimizer
    assert type(opt).__name__ == optimizer['type']
    # every Linear/Conv2d of backbone, neck, RPN and RoI head is preconditioned
    names = set(opt.layers)
    hookable = {
        n for n, m in runner.model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad
    }
    assert names == hookable
    assert {'neck.fpn_convs.0.conv', 'rpn_head.rpn_conv',
            'roi_head.bbox_head.shared_fcs.0', 'roi_head.bbox_head.fc_cls'} <= names
    assert any(n.startswith('backbone.stem') or n == 'backbone.conv1'
               for n in names)
    # Newton refreshes happened (steps 18, 30, 36: > 2 T_inv, not multiples of 12)
    state = opt.layer_state['roi_head.bbox_head.shared_fcs.0']
    assert {'L_inv', 'R_inv'} <= set(state)
    assert opt.fallbacks.counts['nonfinite_direction'] == 0
    # PrecondStatsHook put the counters into the training log
    hub = runner.message_hub
    assert hub.get_scalar('train/precond/refresh_s').current() > 0
    assert hub.get_scalar('train/precond/excluded_layers').current() == 0
    losses = recorder.losses
    assert len(losses) == iters
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)

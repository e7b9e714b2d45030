# Copyright (c) mmprecond contributors. All rights reserved.
"""AdamR trains a real mmdet Faster R-CNN through MMEngine's Runner."""
import math

import pytest
from conftest import DEMO_DET_CONFIG, LossRecorder, use_coco_root

pytest.importorskip('mmdet')
pytest.importorskip('mmcv.ops')

pytestmark = pytest.mark.slow

ITERS = 60


def adamr_demo_config(data_root, work_dir):
    """The demo detector with AdamR and intervals short enough for 60 iters."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(DEMO_DET_CONFIG))
    use_coco_root(cfg, data_root)
    cfg.merge_from_dict(
        dict(
            work_dir=str(work_dir),
            optim_wrapper=dict(
                _delete_=True,
                type='OptimWrapper',
                constructor='PrecondOptimWrapperConstructor',
                optimizer=dict(
                    type='AdamR',
                    lr=1e-3,
                    weight_decay=0.05,
                    stat_interval=5,
                    refresh_interval=20,
                    # like fc6 of the full-size detectors (12545 > 8192),
                    # the 3137-wide input side of shared_fcs.0 is left out
                    max_factor_dim=2048),
                paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
                clip_grad=dict(max_norm=10.0, norm_type=2)),
            param_scheduler=[
                dict(type='LinearLR', start_factor=0.1, by_epoch=False,
                     begin=0, end=10)
            ],
            train_cfg=dict(max_iters=ITERS, val_interval=ITERS + 1),
            default_hooks=dict(
                checkpoint=None, logger=dict(type='LoggerHook', interval=10))))
    return cfg


def test_faster_rcnn_loss_falls_with_adamr(tiny_coco, tmp_path):
    from mmengine.runner import Runner

    cfg = adamr_demo_config(tiny_coco, tmp_path)
    assert 'momentum' not in cfg.optim_wrapper.optimizer
    runner = Runner.from_cfg(cfg)
    recorder = LossRecorder()
    runner.register_hook(recorder)
    runner.train()

    optimizer = runner.optim_wrapper.optimizer
    assert type(optimizer).__name__ == 'AdamR' and optimizer.steps == ITERS
    losses = recorder.losses
    assert len(losses) == ITERS and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first, (first, last)
    # bases were formed (at steps 20 and 40) for the backbone, neck and heads
    rotated = [n for n, st in optimizer.layer_state.items() if 'U1' in st]
    assert len(rotated) == len(optimizer.layers)
    assert any(n.startswith('backbone.') for n in rotated)
    fc6 = optimizer.layer_state['roi_head.bbox_head.shared_fcs.0']
    assert 'U1' in fc6 and 'U2' not in fc6 and 'R' not in fc6
    assert optimizer.layer_state['rpn_head.rpn_conv']['L_count'].item() == 12
    assert optimizer.fallbacks.counts['eigh_failure'] == 0

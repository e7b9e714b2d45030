# Copyright (c) mmprecond contributors. All rights reserved.
"""AFOpt / Ada_AFOpt train real mmdet Swin detectors through MMEngine's Runner.

The configs of ``configs/afopt`` are loaded as they are; only the backbone
is shrunk (embed_dims 32, one block per stage, no pretrained weights), the
heads narrowed and the data pointed at the synthetic shapes set.
"""
import math

import pytest
from conftest import REPO_ROOT, LossRecorder

pytest.importorskip('mmdet')
pytest.importorskip('mmcv.ops')

@pytest.fixture
def one_thread():
    """Run single-threaded: faster than two threads on a shared 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CONFIGS = REPO_ROOT / 'configs' / 'afopt'
DATA_BASE = REPO_ROOT / 'configs' / '_base_' / 'datasets'
ITERS = 30


def small_swin_cfg(config, data_base, data_root, work_dir, optimizer):
    """``configs/afopt/<config>`` on a small Swin and the synthetic set."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(CONFIGS / config))
    data = Config.fromfile(str(DATA_BASE / data_base))
    cfg.train_dataloader = data.train_dataloader
    cfg.train_dataloader.update(batch_size=2, num_workers=0,
                                persistent_workers=False)
    cfg.train_dataloader.dataset.data_root = f'{data_root}/'
    for split in ('val', 'test'):  # training only
        cfg[f'{split}_dataloader'] = cfg[f'{split}_cfg'] = None
        cfg[f'{split}_evaluator'] = None
    cfg.model.backbone.update(embed_dims=32, depths=(1, 1, 1, 1),
                              num_heads=(1, 2, 4, 8), window_size=7,
                              drop_path_rate=0.0, init_cfg=None)
    widths = [32 * 2**i for i in range(4)]
    cfg.model.neck.in_channels = widths[-len(cfg.model.neck.in_channels):]
    cfg.model.neck.out_channels = 64
    if 'bbox_head' in cfg.model:  # RetinaNet
        cfg.model.bbox_head.update(in_channels=64, feat_channels=64,
                                   stacked_convs=2, num_classes=5)
    else:  # Mask R-CNN
        cfg.model.rpn_head.update(in_channels=64, feat_channels=64)
        roi = cfg.model.roi_head
        roi.bbox_roi_extractor.out_channels = 64
        roi.bbox_head.update(in_channels=64, fc_out_channels=128, num_classes=5)
        roi.mask_roi_extractor.out_channels = 64
        roi.mask_head.update(in_channels=64, conv_out_channels=64,
                             num_convs=2, num_classes=5)
        cfg.model.train_cfg.rcnn.sampler.num = 64
    cfg.optim_wrapper.optimizer.update(optimizer)
    cfg.optim_wrapper.clip_grad = dict(max_norm=10.0)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=ITERS)
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 10
    cfg.log_processor = dict(by_epoch=False)
    cfg.work_dir = str(work_dir)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize('config,data_base,optimizer', [
    ('retinanet_swin-t-p4-w7_fpn_afopt-1x_coco.py', 'synthetic_coco_detection.py',
     dict(lr=0.01, stat_interval=3, refresh_interval=9)),
    ('mask-rcnn_swin-t-p4-w7_fpn_ada-afopt-1x_coco.py',
     'synthetic_coco_instance.py', dict(lr=1e-3, stat_interval=3, refresh_interval=9)),
])
def test_swin_detector_trains_and_loss_falls(config, data_base, optimizer,
                                             tiny_coco, tmp_path, one_thread):
    from mmengine.runner import Runner

    cfg = small_swin_cfg(config, data_base, tiny_coco, tmp_path, optimizer)
    runner = Runner.from_cfg(cfg)
    recorder = LossRecorder()
    runner.register_hook(recorder)
    runner.train()

    opt = runner.optim_wrapper.optimizer
    assert type(opt).__name__ == cfg.optim_wrapper.optimizer.type
    assert opt.steps == ITERS
    # every Swin block's W-MSA / SW-MSA is an attention module, its qkv is not
    # an FSGD layer, FFN / proj / patch merging are, convs are not
    assert len(opt.attention) == 4
    assert all(n.startswith('backbone.stages.') for n in opt.attention)
    assert not any(n.endswith('.qkv') for n in opt.layers)
    assert 'backbone.stages.0.blocks.0.attn.w_msa.proj' in opt.layers
    assert 'backbone.stages.1.downsample.reduction' in opt.layers
    assert not any('conv' in n for n in opt.layers)
    st = opt.layer_state['backbone.stages.3.blocks.0.attn.w_msa']
    assert st['LQ_inv'].shape == (8, 32, 32) and st['RV_inv'].shape == (257, 257)
    for kind in ('nonfinite_statistics', 'nonfinite_direction',
                 'attention_call_skipped', 'no_attention'):
        assert not opt.fallbacks.counts.get(kind), kind
    losses = recorder.losses
    assert len(losses) == ITERS and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.95 * first, (first, last)


@pytest.mark.parametrize('config', sorted(p.name for p in CONFIGS.glob('*.py')))
def test_full_size_configs_build_their_optimizer(config):
    """The Swin-T configs build their optimizer on the full-size detector."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper

    register_all_modules()
    cfg = Config.fromfile(str(CONFIGS / config))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    opt = build_optim_wrapper(model, cfg.optim_wrapper).optimizer
    assert type(opt).__name__ == cfg.optim_wrapper.optimizer.type
    attention = getattr(opt, 'attention', {})
    assert len(attention) == (12 if 'afopt' in config else 0)
    # Swin-T: 12 blocks x (proj, 2 FFN) + 3 patch mergings, plus the heads'
    # Linear layers that fit under max_factor_dim
    swin_linear = [n for n in opt.layers if n.startswith('backbone.')]
    assert len(swin_linear) == (39 if 'afopt' in config else 51)
    if 'mask-rcnn' in config:
        assert 'roi_head.bbox_head.shared_fcs.0' not in opt.layers
        assert 'roi_head.bbox_head.shared_fcs.1' in opt.layers
        assert len(opt.param_groups) > 1  # upstream paramwise_cfg kept

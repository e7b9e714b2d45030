# A real mmdet Faster R-CNN (ResNet + FPN + RPN + RoI head), shrunk so that
# it trains to a clearly non-zero bbox AP on the synthetic shapes set
# (160x160 images, 5 classes) in a few minutes on a 2-core CPU:
#   make demo
#   python tools/train.py configs/demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py
# It trains from scratch with AdamW; swap the optimizer for a preconditioned
# one as described in README.md.
_base_ = [
    'mmdet::_base_/models/faster-rcnn_r50_fpn.py',
    '../_base_/datasets/synthetic_coco_detection.py',
    'mmdet::_base_/default_runtime.py',
    '../_base_/precond_runtime.py',
]
default_scope = 'mmdet'

num_classes = len(_base_.metainfo['classes'])
base_channels = 16  # ResNet-18 stages: 16, 32, 64, 128 (BasicBlock, x1)
fpn_channels = 64

model = dict(
    backbone=dict(
        depth=18,
        base_channels=base_channels,
        # Three 3x3 stem convs (ResNet-V1c) instead of the 7x7/2 one: on CPU,
        # torch 2.13's oneDNN takes ~100x longer for the weight gradient of
        # a 7x7/2 conv with 3 input channels than for a 5x5 one (220 vs 2.5
        # ms per batch here), which alone would double the iteration time.
        deep_stem=True,
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(
        in_channels=[base_channels * 2**i for i in range(4)],
        out_channels=fpn_channels),
    rpn_head=dict(
        in_channels=fpn_channels,
        feat_channels=fpn_channels,
        # objects are ~10-70 px: anchors of 16..256 px over strides 4..64
        anchor_generator=dict(scales=[4])),
    roi_head=dict(
        bbox_roi_extractor=dict(
            # 2x2 samples per bin: the adaptive default samples large RoIs
            # densely, and mmcv's CPU RoIAlign is the slowest op here
            roi_layer=dict(sampling_ratio=2),
            out_channels=fpn_channels,
            finest_scale=28),
        bbox_head=dict(
            in_channels=fpn_channels,
            fc_out_channels=256,
            num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=300),
        rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rpn=dict(nms_pre=500, max_per_img=300)))

max_iters = 1000
train_cfg = dict(
    type='IterBasedTrainLoop',
    max_iters=max_iters,
    val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=100),
    dict(
        type='CosineAnnealingLR',
        by_epoch=False,
        begin=100,
        end=max_iters,
        T_max=max_iters - 100,
        eta_min=2e-5),
]
# total batch size the learning rate above was tuned for (1 process x 4)
auto_scale_lr = dict(enable=False, base_batch_size=4)

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=50),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=max_iters,
        max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
# env_cfg keeps mmdet's nccl backend for GPUs; tools/train.py switches
# launched CPU-only runs to gloo (or to $MMPRECOND_DIST_BACKEND).
randomness = dict(seed=0)

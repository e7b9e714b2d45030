# A real mmdet RetinaNet (ResNet-18 + FPN + RetinaHead, focal loss), shrunk
# like configs/demo's Faster R-CNN, for the CPU mixed-precision tests
# (tests/test_optim/test_amp_mmdet.py).  Its training forward uses no mmcv
# CPU kernels (mmcv's CPU NMS / RoIAlign accept fp32 only), so it runs under
# fp16 and bf16 autocast on a CPU.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    '../../../configs/_base_/datasets/synthetic_coco_detection.py',
    'mmdet::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)
default_scope = 'mmdet'

base_channels = 16
model = dict(
    backbone=dict(
        depth=18,
        base_channels=base_channels,
        deep_stem=True,
        frozen_stages=-1,
        norm_eval=False,
        init_cfg=None),
    neck=dict(
        in_channels=[base_channels * 2**i for i in range(4)],
        out_channels=64,
        start_level=1),
    bbox_head=dict(
        num_classes=len(_base_.metainfo['classes']),
        in_channels=64,
        feat_channels=64,
        stacked_convs=2,
        anchor_generator=dict(octave_base_scale=2)))

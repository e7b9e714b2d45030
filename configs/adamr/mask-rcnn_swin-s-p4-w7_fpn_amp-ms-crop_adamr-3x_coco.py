# Mask R-CNN Swin-S-FPN 3x with multi-scale crop training on COCO with AdamR
# (thesis Table 4.6: 49.0 box / 43.6 mask AP; mmdet's AdamW 48.2 / 43.2).
# The baseline the thesis cites is mmdet's mixed-precision config, so this
# one inherits it and keeps its AmpOptimWrapper (train it on GPUs); the
# optimizer is that of the Swin-T AdamR configs (lr 1e-4, weight decay 0.02,
# mmdet's paramwise_cfg).
_base_ = [
    'mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AdamR',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.02,
        stat_interval=100,
        refresh_interval=1000,
        eps_basis=0.01))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

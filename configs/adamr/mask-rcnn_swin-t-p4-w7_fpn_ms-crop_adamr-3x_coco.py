# Mask R-CNN Swin-T-FPN with multi-scale crop training, 3x, on COCO with
# AdamR (thesis Table 4.6: 46.9 box / 42.3 mask AP; mmdet's AdamW 46.0 /
# 41.6).  Optimizer settings as in the 1x Swin config.
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
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

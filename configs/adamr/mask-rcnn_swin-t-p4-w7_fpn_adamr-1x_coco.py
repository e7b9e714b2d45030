# Mask R-CNN Swin-T-FPN 1x on COCO with AdamR (thesis Table 4.6: 43.3 box /
# 40.0 mask AP; mmdet's AdamW 42.7 / 39.3).  The thesis uses weight decay
# 0.02 for Swin (mmdet's AdamW default is 0.05).  mmdet's paramwise_cfg
# (no decay on norms and position-bias tables) is kept: those parameters
# are outside the rotated Linear / Conv2d layers and get plain AdamW.
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
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

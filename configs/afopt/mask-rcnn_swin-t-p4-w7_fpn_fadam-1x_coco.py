# Mask R-CNN Swin-T-FPN 1x on COCO trained with FAdam (thesis Table 5.2:
# 43.4 box / 39.7 mask AP; mmdet's AdamW 42.7 / 39.3): the FSGD direction of
# every Linear layer fed to AdamW.  mmdet's AdamW setting and paramwise_cfg
# are kept, as for Ada_AFOpt.
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='FAdam',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.05,
        stat_interval=50,
        refresh_interval=500,
        damping=0.01,
        stat_decay=0.95))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# Mask R-CNN Swin-T-FPN 1x on COCO trained with Ada_AFOpt (thesis Table 5.2:
# 43.4 box / 39.8 mask AP; mmdet's AdamW 42.7 / 39.3): the AFOpt direction
# fed to AdamW.  mmdet's AdamW setting is kept (lr 1e-4, betas (0.9, 0.999),
# weight decay 0.05), and so is its paramwise_cfg (no decay on norms,
# absolute_pos_embed and relative_position_bias_table; those parameters get
# plain AdamW anyway).  bbox_head.shared_fcs.0 (12545-wide input) exceeds
# max_factor_dim=8192 and gets plain AdamW.
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='Ada_AFOpt',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.05,
        stat_interval=50,
        refresh_interval=500,
        damping=0.01,
        stat_decay=0.95,
        value_jitter=1e-4))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

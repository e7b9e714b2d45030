# Mask R-CNN R50-FPN 1x on COCO with SGDM_BK (Yong et al., CVPR 2023,
# Table 5: SGDM 38.2 / 34.7 -> SGDM_BK 40.4 / 36.9 box / mask AP).  Only the
# optimizer differs from the upstream config: mmdet's SGD lr 0.02 / wd 1e-4
# and AdaBK's defaults (200 / 2000 iterations, decay 0.9, damping 1e-5).
_base_ = [
    'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='SGDM_BK',
        lr=0.02,
        momentum=0.9,
        weight_decay=1e-4,
        stat_interval=200,
        refresh_interval=2000,
        damping=1e-5,
        stat_decay=0.9))

# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

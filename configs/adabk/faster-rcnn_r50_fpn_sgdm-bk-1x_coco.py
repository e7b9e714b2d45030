# Faster R-CNN R50-FPN 1x on COCO with SGDM_BK (Yong et al., CVPR 2023,
# Table 4: SGDM 37.4 -> SGDM_BK 39.6 box AP).  Only the optimizer differs
# from the upstream config: the paper keeps mmdet's SGD lr 0.02 / wd 1e-4
# and AdaBK's defaults (statistics every 200, inverse roots every 2000
# iterations, stat decay 0.9, damping 1e-5 x lambda_max, K = 10).
_base_ = [
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
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

# Faster R-CNN R50-FPN 1x on COCO with NKFAC (thesis ch. 3, Table 3.7:
# SGDM 37.4 -> NKFAC 39.7 box AP).  Only the optimizer differs from the
# upstream config: lr / wd are mmdet's SGD defaults, as in the thesis; the
# statistics / inverse intervals are the thesis' COCO values.
_base_ = [
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='NKFAC',
        lr=0.02,
        momentum=0.9,
        weight_decay=1e-4,
        stat_interval=100,
        refresh_interval=1000,
        damping=0.01,
        stat_decay=0.95))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

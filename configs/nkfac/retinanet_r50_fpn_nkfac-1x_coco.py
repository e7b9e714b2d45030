# RetinaNet R50-FPN 1x on COCO with NKFAC.  Not a thesis experiment (it ran
# RetinaNet only with Swin-T); the settings follow its RetinaNet rule: NKFAC
# takes mmdet's RetinaNet SGD values, lr 0.01 and wd 1e-4.
_base_ = [
    'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='NKFAC',
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
        stat_interval=100,
        refresh_interval=1000,
        damping=0.01,
        stat_decay=0.95))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

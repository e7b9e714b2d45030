# RetinaNet R50-FPN 1x on COCO with NKFAC.  Not a thesis experiment (it ran
# RetinaNet only with Swin-T); the settings follow its RetinaNet rule: NKFAC
# takes mmdet's RetinaNet SGD values, lr 0.01 and wd 1e-4.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)

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
        inv_interval=1000,
        damping=0.01,
        stat_decay=0.95))

# mmprecond's PrecondStatsHook logs the optimizer's time per phase, its
# state memory and the preconditioner's health at the logger's interval;
# at most 3 checkpoints are kept (a preconditioner's state makes them large).
custom_hooks = [dict(type='PrecondStatsHook', interval=50)]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

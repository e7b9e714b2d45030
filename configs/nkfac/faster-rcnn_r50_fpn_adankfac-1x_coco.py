# Faster R-CNN R50-FPN 1x on COCO with AdaNKFAC (thesis ch. 3: AdamW-based
# variant, lr 1e-4 and decoupled weight decay 0.2 as used for COCO).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AdaNKFAC',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.2,
        stat_interval=100,
        inv_interval=1000))

# mmprecond's PrecondStatsHook logs the optimizer's time per phase, its
# state memory and the preconditioner's health at the logger's interval;
# at most 3 checkpoints are kept (a preconditioner's state makes them large).
custom_hooks = [dict(type='PrecondStatsHook', interval=50)]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

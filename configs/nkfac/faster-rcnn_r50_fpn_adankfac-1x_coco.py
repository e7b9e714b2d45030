# Faster R-CNN R50-FPN 1x on COCO with AdaNKFAC (thesis ch. 3: AdamW-based
# variant, lr 1e-4 and decoupled weight decay 0.2 as used for COCO).
_base_ = [
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

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
        refresh_interval=1000))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

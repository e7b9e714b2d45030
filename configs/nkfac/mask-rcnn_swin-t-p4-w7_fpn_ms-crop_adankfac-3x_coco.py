# Mask R-CNN Swin-T-FPN 3x (36 epochs, x0.1 at 27 and 33) with multi-scale
# crop training on COCO with AdaNKFAC (thesis Table 3.9: AdamW 46.0 / 41.6
# -> AdaNKFAC 46.9 / 42.3 box / mask AP).  Optimizer as in the 1x AdaNKFAC
# config.
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py',
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

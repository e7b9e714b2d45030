# Faster R-CNN R50-FPN 1x on COCO with AdamR (thesis Table 4.5: 39.1 box AP,
# AdamW 37.8, SGDM 37.4).  lr / weight decay are the thesis' AdamW values for
# ResNet detectors; the schedule (warm-up, x0.1 at epochs 8 and 11) is
# mmdet's.  The input side of the 12545-wide shared fc (fc6) exceeds
# max_factor_dim and keeps the identity rotation.
_base_ = [
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,  # drop SGD's momentum
        type='AdamR',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.2,
        stat_interval=100,
        refresh_interval=1000,
        eps_basis=0.01))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

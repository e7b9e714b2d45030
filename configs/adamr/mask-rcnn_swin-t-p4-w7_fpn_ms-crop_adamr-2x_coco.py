# Mask R-CNN Swin-T-FPN 2x (24 epochs, x0.1 at 16 and 22) on COCO with
# AdamR.  Not a thesis experiment (AdamR ran 1x and 3x); schedule and
# pipeline are those of the 2x AdamW baseline, the optimizer that of the 1x
# / 3x AdamR configs (lr 1e-4, weight decay 0.02, mmdet's paramwise_cfg).
_base_ = '../baselines/mask-rcnn_swin-t-p4-w7_fpn_ms-crop_adamw-2x_coco.py'

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AdamR',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.02,
        stat_interval=100,
        refresh_interval=1000,
        eps_basis=0.01))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

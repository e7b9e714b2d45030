# Mask R-CNN Swin-T-FPN 2x (24 epochs, x0.1 at 16 and 22) on COCO with
# AdaNKFAC (thesis Table 3.9: AdamW 45.2 / 41.0 reproduced -> AdaNKFAC 46.2 /
# 41.7 box / mask AP).  The schedule and data pipeline are those of the 2x
# AdamW baseline (see its header for why it uses the ms-crop pipeline); the
# optimizer is that of the 1x AdaNKFAC config.
_base_ = '../baselines/mask-rcnn_swin-t-p4-w7_fpn_ms-crop_adamw-2x_coco.py'

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

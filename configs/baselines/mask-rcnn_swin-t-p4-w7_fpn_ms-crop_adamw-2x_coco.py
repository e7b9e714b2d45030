# Mask R-CNN Swin-T-FPN 2x on COCO with mmdet's default AdamW, the baseline
# the thesis reproduced (Table 3.9: 45.2 box / 41.0 mask AP).  mmdet has no
# Swin 2x config.  The thesis' footnote fixes 24 epochs with the learning
# rate decayed at epochs 16 and 22; everything else is the upstream 3x
# config.  That the 2x run used the 3x config's multi-scale crop pipeline
# (rather than the 1x single-scale one) is our reading: 45.2 AP lies between
# the single-scale 1x (42.7) and the ms-crop 3x (46.0) results.
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py',
    '../_base_/precond_runtime.py',
]

max_epochs = 24
train_cfg = dict(max_epochs=max_epochs)

param_scheduler = [
    dict(
        type='LinearLR', start_factor=0.001, by_epoch=False, begin=0,
        end=1000),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[16, 22],
        gamma=0.1)
]

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

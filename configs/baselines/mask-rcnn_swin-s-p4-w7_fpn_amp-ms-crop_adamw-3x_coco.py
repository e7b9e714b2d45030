# Mask R-CNN Swin-S-FPN 3x with multi-scale crop and mixed-precision
# training on COCO, mmdet's default AdamW.  The upstream config (plus the logging hook); the
# thesis cites its official result, 48.2 box / 43.2 mask AP (Table 4.6).
_base_ = [
    'mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py',
    '../_base_/precond_runtime.py',
]

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

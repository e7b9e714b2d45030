# Mask R-CNN Swin-T-FPN 3x (36 epochs, x0.1 at 27 and 33) with multi-scale
# crop training on COCO, mmdet's default AdamW.  The upstream config (plus the logging hook);
# the thesis cites its official result, 46.0 box / 41.6 mask AP (Tables 3.9,
# 4.6).
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py',
    '../_base_/precond_runtime.py',
]

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

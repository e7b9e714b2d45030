# Mask R-CNN R101-FPN 1x on COCO, mmdet's default SGD.  The upstream config
# (plus the logging hook); the thesis cites its official result, 40.0 box / 36.1 mask AP
# (Tables 3.9, 4.6).
_base_ = [
    'mmdet::mask_rcnn/mask-rcnn_r101_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# Faster R-CNN R101-FPN 1x on COCO, mmdet's default SGD.  The upstream
# config (plus the logging hook); the thesis cites its official result, 39.4 box AP
# (Tables 3.7, 4.5).
_base_ = [
    'mmdet::faster_rcnn/faster-rcnn_r101_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# Faster R-CNN R50-FPN 1x on COCO, mmdet's default SGD (lr 0.02, momentum
# 0.9, wd 1e-4).  The upstream config (plus the logging hook); the thesis cites its official
# result, 37.4 box AP (Tables 3.7, 4.5).
_base_ = [
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

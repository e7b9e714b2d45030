# Mask R-CNN Swin-T-FPN 1x on COCO, mmdet's default AdamW (lr 1e-4, wd 0.05,
# no decay on norms and position-bias tables).  The upstream config (plus the logging hook);
# the thesis cites its official result, 42.7 box / 39.3 mask AP (Tables 3.9,
# 4.6, 5.2).
_base_ = [
    'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

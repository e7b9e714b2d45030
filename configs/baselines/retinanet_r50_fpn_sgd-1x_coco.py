# RetinaNet R50-FPN 1x on COCO, mmdet's default SGD (lr 0.01, momentum 0.9,
# wd 1e-4).  The upstream config (plus the logging hook).  The thesis reports no RetinaNet
# R50 run; this is the ResNet reference for the RetinaNet Swin-T experiments.
_base_ = [
    'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

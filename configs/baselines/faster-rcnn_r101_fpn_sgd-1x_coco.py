# Faster R-CNN R101-FPN 1x on COCO, mmdet's default SGD.  The upstream
# config (plus the logging hook); the thesis cites its official result, 39.4 box AP
# (Tables 3.7, 4.5).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r101_fpn_1x_coco.py'

custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)
# mmprecond's PrecondStatsHook logs the optimizer's time per phase, its
# state memory and the preconditioner's health at the logger's interval;
# at most 3 checkpoints are kept (a preconditioner's state makes them large).
custom_hooks = [dict(type='PrecondStatsHook', interval=50)]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

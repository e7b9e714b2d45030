# Mask R-CNN Swin-T-FPN 1x on COCO, mmdet's default AdamW (lr 1e-4, wd 0.05,
# no decay on norms and position-bias tables).  The upstream config (plus the logging hook);
# the thesis cites its official result, 42.7 box / 39.3 mask AP (Tables 3.9,
# 4.6, 5.2).
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py'

custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)
# mmprecond's PrecondStatsHook logs the optimizer's time per phase, its
# state memory and the preconditioner's health at the logger's interval;
# at most 3 checkpoints are kept (a preconditioner's state makes them large).
custom_hooks = [dict(type='PrecondStatsHook', interval=50)]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# Mask R-CNN Swin-T-FPN 3x (36 epochs, x0.1 at 27 and 33) with multi-scale
# crop training on COCO, mmdet's default AdamW.  The upstream config (plus the logging hook);
# the thesis cites its official result, 46.0 box / 41.6 mask AP (Tables 3.9,
# 4.6).
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py'

custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)
# mmprecond's PrecondStatsHook logs the optimizer's time per phase, its
# state memory and the preconditioner's health at the logger's interval;
# at most 3 checkpoints are kept (a preconditioner's state makes them large).
custom_hooks = [dict(type='PrecondStatsHook', interval=50)]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

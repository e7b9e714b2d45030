# Mask R-CNN Swin-S-FPN 3x with multi-scale crop training on COCO with AdamR
# (thesis Table 4.6: 49.0 box / 43.6 mask AP; mmdet's AdamW 48.2 / 43.2).
# The baseline the thesis cites is mmdet's mixed-precision config, so this
# one inherits it and keeps its AmpOptimWrapper (train it on GPUs); the
# optimizer is that of the Swin-T AdamR configs (lr 1e-4, weight decay 0.02,
# mmdet's paramwise_cfg).
_base_ = 'mmdet::swin/mask-rcnn_swin-s-p4-w7_fpn_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)

optim_wrapper = dict(
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AdamR',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.02,
        stat_interval=100,
        basis_interval=1000,
        eps_basis=0.01))

# mmprecond's PrecondStatsHook logs the optimizer's time per phase, its
# state memory and the preconditioner's health at the logger's interval;
# at most 3 checkpoints are kept (a preconditioner's state makes them large).
custom_hooks = [dict(type='PrecondStatsHook', interval=50)]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

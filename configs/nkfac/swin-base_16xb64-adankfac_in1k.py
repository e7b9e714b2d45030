# Swin-B on ImageNet-1k with AdaNKFAC (thesis Table 3.6: AdamW 83.36 ->
# AdaNKFAC 83.30 top-1).  Same optimizer settings as the Swin-T config: lr
# 0.002, weight decay 0.025, everything else mmpretrain's default.
_base_ = 'mmpretrain::swin_transformer/swin-base_16xb64_in1k.py'

custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AdaNKFAC',
        lr=2e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.025,
        stat_interval=100,
        inv_interval=1000))

# mmprecond's PrecondStatsHook logs the optimizer's time per phase, its
# state memory and the preconditioner's health at the logger's interval;
# at most 3 checkpoints are kept (a preconditioner's state makes them large).
custom_hooks = [dict(type='PrecondStatsHook', interval=100)]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

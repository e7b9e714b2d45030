# Swin-B on ImageNet-1k with AdaNKFAC (thesis Table 3.6: AdamW 83.36 ->
# AdaNKFAC 83.30 top-1).  Same optimizer settings as the Swin-T config: lr
# 0.002, weight decay 0.025, everything else mmpretrain's default.
_base_ = [
    'mmpretrain::swin_transformer/swin-base_16xb64_in1k.py',
    '../_base_/precond_runtime_in1k.py',
]

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
        refresh_interval=1000))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# Swin-B on ImageNet-1k with AdamR.  Not a thesis experiment; settings as in
# the Swin-T AdamR config (mmpretrain's AdamW lr 1e-3 and weight decay 0.05).
_base_ = [
    'mmpretrain::swin_transformer/swin-base_16xb64_in1k.py',
    '../_base_/precond_runtime_in1k.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AdamR',
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.05,
        stat_interval=100,
        refresh_interval=1000,
        eps_basis=0.01))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

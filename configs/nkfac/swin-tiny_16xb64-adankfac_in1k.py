# Swin-T on ImageNet-1k with AdaNKFAC (thesis Table 3.6: AdamW 81.18 ->
# AdaNKFAC 81.63 top-1).  The thesis sets lr 0.002 and weight decay 0.025
# (mmpretrain's AdamW: 1e-3 and 0.05, so lr x wd is unchanged) and keeps
# "other hyper-parameters the same as default": the 300-epoch warm-up +
# cosine schedule, the total batch of 16 x 64, gradient clipping at 5 and
# the paramwise_cfg without decay on norms, biases and position-bias tables.
# Statistics / inverse intervals: the thesis' 100 / 1000 for Swin.
_base_ = [
    'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
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

# Swin-T on ImageNet-1k with AdamW_BK (Yong et al., CVPR 2023, Table 3:
# AdamW 81.18 -> AdamW_BK 81.79 top-1).  The paper replaces AdamW by
# AdamW_BK in the official config and keeps everything else (lr 1e-3 for a
# total batch of 1024, wd 0.05, 300 epochs, gradient clipping at 5, no decay
# on norms, biases and position-bias tables) with AdaBK's defaults.
_base_ = [
    'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
    '../_base_/precond_runtime_in1k.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AdamW_BK',
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.05,
        stat_interval=200,
        refresh_interval=2000))

# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

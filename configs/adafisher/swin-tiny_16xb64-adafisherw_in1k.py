# Swin-T on ImageNet-1k with AdaFisherW (Gomes et al., ICLR 2025; the paper
# reports Swin only on CIFAR / Tiny ImageNet, so there is no published
# ImageNet number to compare with).  AdaFisherW replaces AdamW in
# mmpretrain's config with the paper's ViT settings (lr 1e-3, damping 3e-3
# as in the released ViT config, gamma 0.8) and mmpretrain's weight decay
# 0.05, schedule, clipping and paramwise_cfg.
_base_ = [
    'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py',
    '../_base_/precond_runtime_in1k.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AdaFisherW',
        lr=1e-3,
        beta=0.9,
        weight_decay=0.05,
        damping=3e-3,
        gamma=0.8,
        stat_interval=100,
        statistics='code'))

# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

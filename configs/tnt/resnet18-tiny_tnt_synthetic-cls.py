# TNT (sampled-label Fisher from the classifier head) on the demo
# classifier (mmpretrain ResNet-18, 4x narrower) and the synthetic shapes
# set; only the optimizer differs from
# ../demo/resnet18-tiny_adamw_synthetic-cls.py.
#   python tools/train.py configs/tnt/resnet18-tiny_tnt_synthetic-cls.py
# Hyper-parameters picked by hand, not searched (measured by
# benchmarks/bench_thesis_cls.py); the
# thesis' CIFAR values are in resnet32_tnt_cifar10.py.
_base_ = '../demo/resnet18-tiny_adamw_synthetic-cls.py'

optim_wrapper = dict(
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='TNT',
        lr=3e-3,
        damping=0.1,
        weight_decay=5e-4,
        stat_interval=10,
        refresh_interval=20,
        logits_module='head',
        warm_start_iters=5))
custom_hooks = [
    dict(type='PrecondStatsHook', interval=10),
    dict(type='WarmStartHook')]
# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

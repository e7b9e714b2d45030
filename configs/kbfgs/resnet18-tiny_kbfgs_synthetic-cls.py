# K-BFGS on the demo classifier (mmpretrain ResNet-18, 4x narrower) and the
# synthetic shapes set; only the optimizer differs from
# ../demo/resnet18-tiny_adamw_synthetic-cls.py.
#   python tools/train.py configs/kbfgs/resnet18-tiny_kbfgs_synthetic-cls.py
# Hyper-parameters picked by hand, not searched (measured by
# benchmarks/bench_thesis_cls.py); the
# thesis' CIFAR values are in resnet32_kbfgs_cifar10.py.  The momentum is
# g^ = 0.9 g^ + g (no 1 - 0.9), the effective lr is lr / damping.
_base_ = '../demo/resnet18-tiny_adamw_synthetic-cls.py'

optim_wrapper = dict(
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='KBFGS',
        lr=0.1,
        damping=1.0,
        weight_decay=5e-4,
        curvature_interval=20,
        warm_start_iters=5))
custom_hooks = [
    dict(type='PrecondStatsHook', interval=10),
    dict(type='SecondPassHook'), dict(type='WarmStartHook')]
# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# TNT on CIFAR-10 ResNet-32 with the thesis' best hyper-parameters
# (Yi Ren's thesis, Table 4.4: lr 1e-4, weight decay 10, damping 0.01;
# T1 = 10, T2 = 100; 93.48 % validation accuracy, mean of 5 seeds).
# Needs CIFAR-10 under data/cifar10.  Other best values (lr, weight decay,
# damping): CIFAR-10 VGG16 (1e-4, 10, 0.1); CIFAR-100 VGG16 (1e-4, 10, 0.1);
# CIFAR-100 ResNet-32 (1e-4, 10, 0.01).  Weight decay acts as
# W -= lr * wd * W.
_base_ = '../_base_/resnet32_cifar10_thesis.py'

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        type='TNT',
        lr=1e-4,
        weight_decay=10.0,
        damping=0.01,
        momentum=0.9,
        stat_interval=10,
        refresh_interval=100,
        # sampled labels are drawn from the classifier head's logits
        logits_module='head',
        # the thesis initialises the factors over the whole training set;
        # WarmStartHook uses the first 50 batches
        warm_start_iters=50))
custom_hooks = [
    dict(type='WarmStartHook'),
    dict(type='PrecondStatsHook', interval=100)
]
# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

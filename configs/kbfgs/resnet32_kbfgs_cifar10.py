# K-BFGS on CIFAR-10 ResNet-32 with the thesis' best hyper-parameters
# (Yi Ren's thesis, Table 3.7: lr 100, weight decay 1e-5, damping 1e3;
# T = 20; 93.45 % validation accuracy, mean of 5 seeds, Table 3.4).
# Other best values of Table 3.7 (lr, weight decay, damping):
#   CIFAR-10 VGG16 (30, 1e-5, 1e4); CIFAR-100 VGG16 (0.1, 0.01, 10);
#   CIFAR-100 ResNet-32 (1e3, 1e-6, 1e4).
# Effective lr is lr / damping; weight decay acts as W -= lr * wd * W.
_base_ = '../_base_/resnet32_cifar10_thesis.py'

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        type='KBFGS',
        lr=100.0,
        damping=1e3,
        weight_decay=1e-5,
        momentum=0.9,
        curvature_interval=20,
        # the thesis forms A over the whole training set before training;
        # WarmStartHook uses the first 50 batches (6400 images)
        warm_start_iters=50))
# the second forward/backward on the same minibatch every T iterations
custom_hooks = [
    dict(type='SecondPassHook'),
    dict(type='WarmStartHook'),
    dict(type='PrecondStatsHook', interval=100)
]
# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

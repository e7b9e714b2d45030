# SMW-GN (Ren 2022, thesis Chapter 5: the subsampled Gauss-Newton variant of
# Algorithm 23) on CIFAR-10 ResNet-32, the thesis' CNN setting of Chapter 4.
# Why CIFAR-10 and not ImageNet: the Gauss-Newton system is N2 m_L square
# and its Gram costs about m_L^2 d_out per layer and sample pair, so it
# suits a head with few classes; with ImageNet's m_L = 1000 even one
# curvature sample per GPU on 8 GPUs makes an 8000-square system, which the
# optimizer refuses (max_system_size) - use SMW-NG there
# (resnet50_8xb32-smw-ng_in1k.py).  What transfers from the thesis: the LM
# rule (lambda_LM = 1, boost 1.01, drop 0.99, eps 1/4, tau 1e-3) and no
# momentum; lr 0.1 (the thesis' MNIST value), weight decay 1e-4 and
# N2 = 4 per GPU (gathered over ranks: 32 x 10 = 320 on 8 GPUs) are not
# tuned.  Needs CIFAR-10 under data/cifar10.
_base_ = '../_base_/resnet32_cifar10_thesis.py'

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        type='SMW_GN',
        lr=0.1,
        curvature_samples=4,
        logits_module='head.fc',
        max_system_size=4096,
        damping=1.0,
        tau=1e-3,
        boost=1.01,
        drop=0.99,
        eps=0.25,
        momentum=0.0,
        weight_decay=1e-4))
custom_hooks = [
    dict(type='PrecondStatsHook', interval=100),
    dict(type='SecondPassHook')]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# SMW-GN (Ren 2022, thesis Chapter 5: the subsampled Gauss-Newton variant of
# Algorithm 23) on the demo classifier (mmpretrain ResNet-18, 4x narrower,
# synthetic shapes); only the optimizer differs from
# ../demo/resnet18-tiny_adamw_synthetic-cls.py and from the SMW-NG config
# next to this one.
#   python tools/train.py configs/smw/resnet18-tiny_smw-gn_synthetic-cls.py
# The Gauss-Newton matrix of the softmax cross-entropy of the head's logits
# (head.fc, m_L = 5 classes): the small system is N2 m_L square.  The same LM
# settings as SMW-NG (lambda_LM = 1, boost 1.01, drop 0.99, eps 1/4, tau
# 1e-3, no momentum, lr 0.1, not searched).  N2 = 4 of the batch of 32, half
# of SMW-NG's 8: the conv Gram costs N2^2 T^2 (d_in + m_L^2 d_out), dominated
# by the 7x7 stem's T = 1024 positions.  Measured (3 seeds x 10 epochs, the
# shared 2-core CPU, docs/benchmarks.md): 0.58 s per iteration, 0.22 s of it
# the Gram.  SecondPassHook runs the extra forward of the rho-test.
_base_ = '../demo/resnet18-tiny_adamw_synthetic-cls.py'

optim_wrapper = dict(
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
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
    dict(type='PrecondStatsHook', interval=10),
    dict(type='SecondPassHook')]
# at most 3 checkpoints are kept, as in the other zoo configs
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

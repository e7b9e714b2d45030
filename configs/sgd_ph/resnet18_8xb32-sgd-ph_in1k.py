# ResNet-18 on ImageNet-1k with SGD-PH (Sun et al., arXiv:2403.02681; thesis
# Table 2.3: SGDM 70.49 -> SGD-PH 70.59 top-1).  The thesis trains 100
# epochs with lr 0.1, wd 1e-4 and tau 1e-3; this config keeps mmpretrain's
# 90-epoch step schedule (x0.1 every 30 epochs) and batch 8 x 32.  The
# Hessian-vector product of the BN parameters needs HessianOptimWrapper.
_base_ = [
    'mmpretrain::resnet/resnet18_8xb32_in1k.py',
    '../_base_/precond_runtime_in1k.py',
]

optim_wrapper = dict(
    type='HessianOptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='SGD_PH',
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        tau=1e-3,
        eps=1e-4))

# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

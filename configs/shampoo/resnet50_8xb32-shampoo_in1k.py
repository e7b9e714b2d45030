# ResNet-50 on ImageNet-1k with the Shampoo baseline (Gupta et al., ICML
# 2018), with layer-wise SGD grafting so mmpretrain's SGD lr 0.1 / wd 1e-4
# and schedule carry over.  Inverse fourth roots every 100 iterations.
# Reported baseline numbers for comparison: 70.11 top-1 (Yong et al., CVPR
# 2023, Table 2, without grafting).
_base_ = [
    'mmpretrain::resnet/resnet50_8xb32_in1k.py',
    '../_base_/precond_runtime_in1k.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='Shampoo',
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-4,
        stat_interval=1,
        refresh_interval=100,
        grafting='sgd'))

# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# RetinaNet Swin-T-FPN 1x on COCO trained with FSGD (thesis Table 5.1:
# 37.7 AP; mmdet's SGDM 37.3): feature gradient descent, G (XX^T + damping)^-1,
# for every Linear layer, the attention qkv included; convs, norms and
# position-bias tables get plain SGDM.  Hyper-parameters as for AFOpt.
_base_ = [
    'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='FSGD',
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
        stat_interval=50,
        refresh_interval=500,
        damping=0.01,
        stat_decay=0.95))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

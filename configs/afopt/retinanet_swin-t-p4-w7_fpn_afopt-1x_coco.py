# RetinaNet Swin-T-FPN 1x on COCO trained with AFOpt (thesis Table 5.1:
# 38.5 AP; mmdet's SGDM 37.3).  AFOpt preconditions W_Q, W_K, W_V of every
# window attention, gives the other Linear layers (proj, FFN, patch merging)
# FSGD, and leaves convs, norms and position-bias tables to plain SGDM.
# mmdet's SGD setting is kept (lr 0.01, momentum 0.9, weight decay 1e-4);
# the thesis gives no other.  The upstream RetinaNet Swin config has no
# paramwise_cfg, so none is added.  T_s / T_u / damping / statistics decay
# are the thesis defaults (50 / 500 / 0.01 / 0.95).
_base_ = [
    'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AFOpt',
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
        stat_interval=50,
        refresh_interval=500,
        damping=0.01,
        stat_decay=0.95,
        value_jitter=1e-4))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# The demo Faster R-CNN (../demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py)
# trained with TNT-EF: the empirical-Fisher variant needs no sampled-label
# backward, which a detector's losses (RPN, box regression) do not allow,
# so it is the TNT that runs on detection.  The thesis has no detection
# results; the values below were picked by hand, not searched.
#   python tools/train.py configs/tnt/faster-rcnn_r18-tiny_fpn_tnt-ef_synthetic.py
_base_ = '../demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py'

optim_wrapper = dict(
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='TNT_EF',
        lr=1e-3,
        damping=0.1,
        weight_decay=1e-4,
        stat_interval=10,
        refresh_interval=100,
        warm_start_iters=5),
    paramwise_cfg=dict(norm_decay_mult=0.0))
# PrecondStatsHook (interval 50) comes from configs/_base_/precond_runtime.py
custom_hooks = [dict(type='WarmStartHook'),
                *_base_.custom_hooks]
# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

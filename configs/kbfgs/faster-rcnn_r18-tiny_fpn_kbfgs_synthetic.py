# The demo Faster R-CNN (../demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py)
# trained with K-BFGS: only the optimizer and the second-pass hook differ.
#   python tools/train.py configs/kbfgs/faster-rcnn_r18-tiny_fpn_kbfgs_synthetic.py
# Every 20 iterations SecondPassHook re-runs the detector's loss on the same
# batch after the update (same RNG: same RPN/RoI sampling draws), for the
# pre-activation secant pairs.  The thesis has no detection results; the
# values below were picked by hand (effective lr = lr / damping, close to
# mmdet's SGD 0.02 for the layers K-BFGS does not precondition).
_base_ = '../demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py'

optim_wrapper = dict(
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='KBFGS',
        lr=0.02,
        damping=1.0,
        weight_decay=1e-4,
        curvature_interval=20,
        warm_start_iters=5),
    paramwise_cfg=dict(norm_decay_mult=0.0))
# PrecondStatsHook (interval 50) comes from configs/_base_/precond_runtime.py
custom_hooks = [dict(type='SecondPassHook'), dict(type='WarmStartHook'),
                *_base_.custom_hooks]
# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# TNT-EF (empirical Fisher, no sampled-label backward) on the demo
# classifier; see resnet18-tiny_tnt_synthetic-cls.py.
_base_ = './resnet18-tiny_tnt_synthetic-cls.py'

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='TNT_EF', lr=3e-3, damping=0.1,
                   weight_decay=5e-4, stat_interval=10, inv_interval=20,
                   warm_start_iters=5))

# mmprecond's PrecondStatsHook logs the optimizer's time per phase, its
# state memory and the preconditioner's health at the logger's interval.
custom_hooks = [dict(type='PrecondStatsHook', interval=10)]
# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

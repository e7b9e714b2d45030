# TNT-EF (empirical Fisher, no sampled-label backward) on the demo
# classifier; see resnet18-tiny_tnt_synthetic-cls.py.
_base_ = './resnet18-tiny_tnt_synthetic-cls.py'

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='TNT_EF', lr=3e-3, damping=0.1,
                   weight_decay=5e-4, stat_interval=10, refresh_interval=20,
                   warm_start_iters=5))

# precond_runtime.py for the ImageNet configs: PrecondStatsHook every 100
# iterations (mmpretrain's logger interval) instead of 50.
_base_ = './precond_runtime.py'
custom_hooks = [dict(type='PrecondStatsHook', interval=100)]

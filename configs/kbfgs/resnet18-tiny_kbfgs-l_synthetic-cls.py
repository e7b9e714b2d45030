# K-BFGS(L) (L-BFGS with 100 pairs for H_G) on the demo classifier; see
# resnet18-tiny_kbfgs_synthetic-cls.py.
_base_ = './resnet18-tiny_kbfgs_synthetic-cls.py'

optim_wrapper = dict(optimizer=dict(type='KBFGS_L', history=100))

# mmprecond's PrecondStatsHook logs the optimizer's time per phase, its
# state memory and the preconditioner's health at the logger's interval.
custom_hooks = [dict(type='PrecondStatsHook', interval=10)]
# at most 3 checkpoints are kept (a preconditioner's state makes them large)
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# What every mmprecond config shares: the import that registers mmprecond's
# optimizers, constructor and hooks, and PrecondStatsHook, which logs the
# optimizer's time per phase, its state memory and the preconditioner's
# health every 50 iterations.  List it after the upstream config:
#   _base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
#             '../_base_/precond_runtime.py']
# A config with other hooks writes them around the inherited one:
#   custom_hooks = [*_base_.custom_hooks, dict(type='WarmStartHook')]
# MMEngine refuses a key that two bases both define, so the optim_wrapper
# constructor and default_hooks (defined by every upstream schedule and
# runtime) cannot live here; see configs/README.md.
custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)
custom_hooks = [dict(type='PrecondStatsHook', interval=50)]

# The interruption test's config plus a hook that kills the training process
# with SIGKILL right after iteration 5 (tests/test_tools/sigkill_hook.py; the
# test puts that directory on PYTHONPATH).
_base_ = './vit-tiny_interrupt_synthetic-cls.py'
custom_imports = dict(
    imports=['mmprecond', 'sigkill_hook'], allow_failed_imports=False)
custom_hooks = [
    dict(type='PrecondStatsHook', interval=1),
    dict(type='SigkillAfterIter', after_iter=5),
]

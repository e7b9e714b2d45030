# Swin-T on ImageNet-1k, mmpretrain's default AdamW (lr 1e-3 for a total
# batch of 1024, wd 0.05, 300 epochs, gradient clipping at 5).  The upstream
# config (plus the logging hook); the thesis cites its official result, 81.18 top-1
# (Table 3.6).
_base_ = 'mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py'

custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)
# mmprecond's PrecondStatsHook logs the optimizer's time per phase, its
# state memory and the preconditioner's health at the logger's interval;
# at most 3 checkpoints are kept (a preconditioner's state makes them large).
custom_hooks = [dict(type='PrecondStatsHook', interval=100)]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

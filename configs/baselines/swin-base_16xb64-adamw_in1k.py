# Swin-B on ImageNet-1k, mmpretrain's default AdamW (lr 1e-3 for a total
# batch of 1024, wd 0.05, 300 epochs, gradient clipping at 5).  The upstream
# config (plus the logging hook); the thesis cites its official result, 83.36 top-1
# (Table 3.6).
_base_ = [
    'mmpretrain::swin_transformer/swin-base_16xb64_in1k.py',
    '../_base_/precond_runtime_in1k.py',
]

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

# A real mmpretrain ResNet-18 classifier, 4x narrower, on the synthetic
# shapes classification set (64x64 images, 5 classes), trained from scratch
# with AdamW; small enough for a 2-core CPU:
#   python -m mmprecond.datasets.synthetic cls --out data/synthetic_cls
#   python tools/train.py configs/demo/resnet18-tiny_adamw_synthetic-cls.py
_base_ = [
    'mmpretrain::_base_/models/resnet18.py',
    '../_base_/datasets/synthetic_cls.py',
    'mmpretrain::_base_/default_runtime.py',
    '../_base_/precond_runtime.py',
]
default_scope = 'mmpretrain'

base_channels = 16  # stages: 16, 32, 64, 128 channels (BasicBlock, x1)
model = dict(
    backbone=dict(stem_channels=base_channels, base_channels=base_channels),
    head=dict(
        num_classes=_base_.num_classes,
        in_channels=base_channels * 8,
        topk=(1, )))

max_epochs = 10
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=5)
val_cfg = dict()
test_cfg = dict()

optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0))
param_scheduler = [
    dict(
        type='LinearLR',
        start_factor=0.01,
        by_epoch=True,
        begin=0,
        end=1,
        convert_to_iter_based=True),
    dict(
        type='CosineAnnealingLR',
        by_epoch=True,
        begin=1,
        end=max_epochs,
        eta_min=2e-5,
        convert_to_iter_based=True),
]
# total batch size the learning rate above was tuned for (1 process x 32)
auto_scale_lr = dict(base_batch_size=32)

default_hooks = dict(
    logger=dict(interval=10),
    checkpoint=dict(interval=max_epochs, max_keep_ckpts=1))
# time per phase and optimizer-state memory in the log
custom_hooks = [dict(type='PrecondStatsHook', interval=10)]
randomness = dict(seed=0)

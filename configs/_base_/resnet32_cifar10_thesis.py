# CIFAR-10 ResNet-32 as trained by the second-order methods of Yi Ren's
# thesis (Secs. 3.5.2 and 4.7): He et al.'s CIFAR ResNet-32
# (mmprecond.models.cifar_resnet), batch 128, 150 epochs, learning rate
# x0.1 at epochs 50 and 100.  Needs CIFAR-10 under data/cifar10
# (mmpretrain's CIFAR10 dataset).  The optimizer is set by each config.
_base_ = [
    'mmpretrain::_base_/datasets/cifar10_bs16.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(
    imports=['mmprecond', 'mmprecond.models.cifar_resnet'],
    allow_failed_imports=False)
default_scope = 'mmpretrain'

model = dict(
    type='ImageClassifier',
    backbone=dict(type='CifarResNet', depth=32),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=64,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))

train_dataloader = dict(batch_size=128)
val_dataloader = dict(batch_size=128)
test_dataloader = dict(batch_size=128)
max_epochs = 150
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=5)
val_cfg = dict()
test_cfg = dict()
param_scheduler = dict(
    type='MultiStepLR', by_epoch=True, milestones=[50, 100], gamma=0.1)
auto_scale_lr = dict(base_batch_size=128)

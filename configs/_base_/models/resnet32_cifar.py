# ResNet-32 for CIFAR-10 (He et al. 2016, Sec. 4.2), the CNN of Yi Ren's
# thesis (Tables 3.4, 4.2); the backbone is mmprecond.models.cifar_resnet.
model = dict(
    type='ImageClassifier',
    backbone=dict(type='CifarResNet', depth=32),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=10,
        in_channels=64,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0)))

# Synthetic shapes classification data (mmprecond's built-in mmpretrain
# data): one shape per 64x64 image, ImageNet-style layout.  Generate it with
#   python -m mmprecond.datasets.synthetic cls --out data/synthetic_cls
# or ``mmprecond.datasets.ensure_synthetic_cls('data/synthetic_cls')``.
dataset_type = 'CustomDataset'
data_root = 'data/synthetic_cls/'
# Must match mmprecond.datasets.SHAPE_CLASSES (label order).
metainfo = dict(classes=('cross', 'ellipse', 'rectangle', 'ring', 'triangle'))
num_classes = 5
img_size = 64

data_preprocessor = dict(
    num_classes=num_classes,
    # RGB mean/std of ImageNet, the usual choice in mmpretrain configs
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    # the images are loaded as BGR, convert them to RGB
    to_rgb=True)

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_size),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='PackInputs')
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_size),
    dict(type='PackInputs')
]
train_dataloader = dict(
    batch_size=32,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='meta/train.txt',
        data_prefix='train',
        metainfo=metainfo,
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=32,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file='meta/val.txt',
        data_prefix='val',
        metainfo=metainfo,
        pipeline=test_pipeline))
val_evaluator = dict(type='Accuracy', topk=(1, ))
test_dataloader = val_dataloader
test_evaluator = val_evaluator

# A deliberately tiny mmpretrain VisionTransformer classifier on the
# synthetic shapes set, for the interruption test
# (tests/test_tools/test_interruption.py): no random augmentation, no
# dropout, no validation, a checkpoint every 2 iterations and deterministic
# kernels, so that a resumed run can be compared bit for bit.
_base_ = [
    '../../../configs/_base_/datasets/synthetic_cls.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)
default_scope = 'mmpretrain'

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='VisionTransformer',
        img_size=32,
        patch_size=8,
        arch=dict(
            embed_dims=32, num_layers=2, num_heads=2, feedforward_channels=64),
        drop_rate=0.0,
        drop_path_rate=0.0),
    neck=None,
    head=dict(
        type='VisionTransformerClsHead',
        num_classes=_base_.num_classes,
        in_channels=32,
        topk=(1, )))

train_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    dataset=dict(pipeline=[
        dict(type='LoadImageFromFile'),
        dict(type='Resize', scale=32),
        dict(type='PackInputs')
    ]))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None

train_cfg = dict(by_epoch=False, max_iters=10)
optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    # the test sets type, lr and the refresh interval per optimizer
    optimizer=dict(type='NKFAC', lr=0.01, stat_interval=1))
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
default_hooks = dict(
    logger=dict(interval=1),
    checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False))
custom_hooks = [dict(type='PrecondStatsHook', interval=1)]
log_processor = dict(by_epoch=False)
randomness = dict(seed=0, deterministic=True)

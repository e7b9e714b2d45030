# A real mmpretrain Swin Transformer, shrunk to run on a 2-core CPU (3 stages,
# 32-dim embedding, window 4, 0.57 M parameters), on the synthetic shapes
# classification set (64x64 images, 5 classes), trained from scratch with
# AdamW.  It is the small Swin of docs/benchmarks.md, where the attention-
# aware optimizers (FSGD / FAdam / AFOpt / Ada_AFOpt) are compared:
#   python -m mmprecond.datasets.synthetic cls --out data/synthetic_cls
#   python tools/train.py configs/demo/swin-mini_adamw_synthetic-cls.py
_base_ = [
    '../_base_/datasets/synthetic_cls.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)
default_scope = 'mmpretrain'

embed_dims = 32
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='SwinTransformer',
        arch=dict(embed_dims=embed_dims, depths=[2, 2, 2],
                  num_heads=[1, 2, 4]),
        img_size=_base_.img_size,
        window_size=4,
        out_indices=(2, ),
        drop_path_rate=0.1),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=_base_.num_classes,
        in_channels=embed_dims * 4,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, )))

max_epochs = 10
train_cfg = dict(by_epoch=True, max_epochs=max_epochs, val_interval=5)
val_cfg = dict()
test_cfg = dict()

# mmpretrain's Swin recipe: AdamW, no decay on norms, biases and the
# relative position bias tables
optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=0.05),
    clip_grad=dict(max_norm=5.0),
    paramwise_cfg=dict(
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        custom_keys={
            '.absolute_pos_embed': dict(decay_mult=0.0),
            '.relative_position_bias_table': dict(decay_mult=0.0)
        }))
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

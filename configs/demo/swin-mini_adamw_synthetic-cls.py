# A real mmpretrain Swin Transformer, shrunk to run on a 2-core CPU (3 stages,
# 32-dim embedding, window 4, 0.57 M parameters), on the synthetic shapes
# classification set (64x64 images, 5 classes), trained from scratch with
# AdamW; data, schedule and hooks are those of the ResNet-18 demo.  It is the
# small Swin of docs/benchmarks.md, where the attention-aware optimizers
# (FSGD / FAdam / AFOpt / Ada_AFOpt) are compared:
#   python -m mmprecond.datasets.synthetic cls --out data/synthetic_cls
#   python tools/train.py configs/demo/swin-mini_adamw_synthetic-cls.py
_base_ = './resnet18-tiny_adamw_synthetic-cls.py'

embed_dims = 32
model = dict(
    _delete_=True,
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

# mmpretrain's Swin recipe on top of the demo's AdamW: gradient clipping and
# no decay on the position embeddings / relative position bias tables
optim_wrapper = dict(
    clip_grad=dict(max_norm=5.0),
    paramwise_cfg=dict(
        custom_keys={
            '.absolute_pos_embed': dict(decay_mult=0.0),
            '.relative_position_bias_table': dict(decay_mult=0.0)
        }))

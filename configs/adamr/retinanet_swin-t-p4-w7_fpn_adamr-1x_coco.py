# RetinaNet Swin-T-FPN 1x on COCO with AdamR.  Not a thesis experiment (it
# trained this model with NKFAC and AFOpt only); the settings follow its
# rule for Swin backbones: lr 1e-4, decoupled weight decay 0.02.  The
# upstream config has no paramwise_cfg, so none is added.
_base_ = [
    'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,  # drop SGD's momentum
        type='AdamR',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.02,
        stat_interval=100,
        refresh_interval=1000,
        eps_basis=0.01))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

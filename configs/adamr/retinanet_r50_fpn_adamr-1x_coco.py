# RetinaNet R50-FPN 1x on COCO with AdamR.  Not a thesis experiment; the
# settings follow its rule for ResNet detectors (AdamR takes the AdamW
# values the thesis used there: lr 1e-4, decoupled weight decay 0.2).
_base_ = [
    'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py',
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
        weight_decay=0.2,
        stat_interval=100,
        refresh_interval=1000,
        eps_basis=0.01))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

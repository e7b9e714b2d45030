# Mask R-CNN R101-FPN 1x on COCO with AdamW, the baseline the thesis re-ran
# for AdamR (Table 4.6: 40.7 box / 37.2 mask AP) with lr 1e-4 and decoupled
# weight decay 0.2.  The schedule is mmdet's.
_base_ = [
    'mmdet::mask_rcnn/mask-rcnn_r101_fpn_1x_coco.py',
    '../_base_/precond_runtime.py',
]

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(
        _delete_=True,  # drop SGD's momentum
        type='AdamW',
        lr=1e-4,
        betas=(0.9, 0.999),
        weight_decay=0.2))

# At most 3 checkpoints are kept (a preconditioner's state makes them large).
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3))

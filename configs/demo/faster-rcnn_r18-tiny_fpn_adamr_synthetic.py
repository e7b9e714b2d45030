# The demo Faster R-CNN (see faster-rcnn_r18-tiny_fpn_adamw_synthetic.py),
# trained with AdamR instead of AdamW: only the optimizer differs.
#   python tools/train.py configs/demo/faster-rcnn_r18-tiny_fpn_adamr_synthetic.py
#
# lr / weight decay are the demo AdamW's (AdamR's base update is AdamW in the
# rotated basis).  Intervals: the zoo's stat_interval=100 / refresh_interval=1000
# are for ~90k-iteration COCO runs; this run is 1000 iterations, so both are
# scaled down 10x (statistics every 10 steps, a new basis every 100), the
# same number of statistics per refresh as in the thesis.
_base_ = './faster-rcnn_r18-tiny_fpn_adamw_synthetic.py'

optim_wrapper = dict(
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AdamR',
        lr=2e-3,
        betas=(0.9, 0.999),
        weight_decay=0.05,
        stat_interval=10,
        refresh_interval=100))

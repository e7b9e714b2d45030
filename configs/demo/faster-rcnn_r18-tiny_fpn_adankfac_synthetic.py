# The demo Faster R-CNN (see faster-rcnn_r18-tiny_fpn_adamw_synthetic.py),
# trained with AdaNKFAC instead of AdamW: only the optimizer differs.
#   make demo
#   python tools/train.py configs/demo/faster-rcnn_r18-tiny_fpn_adankfac_synthetic.py
#
# Intervals: the thesis uses T_stat=100 / T_inv=1000 for 12-epoch COCO runs
# (~90k iterations).  This run is 1000 iterations, so both are scaled down
# 10x (statistics every 10 steps, inverses every 100: exact at 0, 100, 200,
# warm-started Newton afterwards), which keeps the number of statistics per
# refresh the same as in the thesis.
_base_ = './faster-rcnn_r18-tiny_fpn_adamw_synthetic.py'

optim_wrapper = dict(
    constructor='PrecondOptimWrapperConstructor',
    optimizer=dict(
        _delete_=True,
        type='AdaNKFAC',
        lr=2e-3,
        weight_decay=0.05,
        stat_interval=10,
        refresh_interval=100))

# RetinaNet Swin-T-FPN 1x on COCO, mmdet's default SGD (lr 0.01, momentum
# 0.9, wd 1e-4; not AdamW, thesis spec section 7 item 10).  Exactly the
# upstream config; mmdet has no official number, the thesis reproduced it:
# 37.3 box AP (Tables 3.8, 5.1).
_base_ = 'mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py'

# Mask R-CNN Swin-T-FPN 3x (36 epochs, x0.1 at 27 and 33) with multi-scale
# crop training on COCO, mmdet's default AdamW.  Exactly the upstream config;
# the thesis cites its official result, 46.0 box / 41.6 mask AP (Tables 3.9,
# 4.6).
_base_ = 'mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_ms-crop-3x_coco.py'

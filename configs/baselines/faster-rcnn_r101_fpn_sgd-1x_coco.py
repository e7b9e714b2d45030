# Faster R-CNN R101-FPN 1x on COCO, mmdet's default SGD.  Exactly the
# upstream config; the thesis cites its official result, 39.4 box AP
# (Tables 3.7, 4.5).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r101_fpn_1x_coco.py'

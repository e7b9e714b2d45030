# Swin-B on ImageNet-1k, mmpretrain's default AdamW (lr 1e-3 for a total
# batch of 1024, wd 0.05, 300 epochs, gradient clipping at 5).  Exactly the
# upstream config; the thesis cites its official result, 83.36 top-1
# (Table 3.6).
_base_ = 'mmpretrain::swin_transformer/swin-base_16xb64_in1k.py'

# K-BFGS(L) (L-BFGS with 100 pairs for H_G) on the demo classifier; see
# resnet18-tiny_kbfgs_synthetic-cls.py.
_base_ = './resnet18-tiny_kbfgs_synthetic-cls.py'

optim_wrapper = dict(optimizer=dict(type='KBFGS_L', history=100))

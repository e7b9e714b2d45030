# K-BFGS(L) (100 L-BFGS pairs for H_G) on CIFAR-10 ResNet-32, thesis
# Table 3.7: lr 1e3, weight decay 1e-6, damping 1e4 (93.38 %, Table 3.4).
# Other best values (lr, weight decay, damping): CIFAR-10 VGG16
# (1, 1e-3, 100); CIFAR-100 VGG16 (0.3, 1e-3, 100); CIFAR-100 ResNet-32
# (10, 1e-4, 100).
_base_ = './resnet32_kbfgs_cifar10.py'

optim_wrapper = dict(
    optimizer=dict(
        type='KBFGS_L', lr=1e3, damping=1e4, weight_decay=1e-6, history=100))

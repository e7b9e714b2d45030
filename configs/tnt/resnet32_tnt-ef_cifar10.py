# TNT-EF (empirical Fisher: no sampled-label backward) on CIFAR-10
# ResNet-32, thesis Table 4.6: lr 1e-4, weight decay 10, damping 0.01
# (93.24 %).  CIFAR-100 ResNet-32: (1e-4, 10, 0.01); CIFAR-10 VGG16
# (1e-4, 10, 0.1); CIFAR-100 VGG16 (3e-5, 10, 0.1).
_base_ = './resnet32_tnt_cifar10.py'

optim_wrapper = dict(
    optimizer=dict(_delete_=True, type='TNT_EF', lr=1e-4, weight_decay=10.0,
                   damping=0.01, momentum=0.9, stat_interval=10,
                   refresh_interval=100, warm_start_iters=50))

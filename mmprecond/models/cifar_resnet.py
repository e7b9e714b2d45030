# Copyright (c) mmprecond contributors. All rights reserved.
"""The CIFAR ResNets of He et al. (2016), Sec. 4.2, for mmpretrain.

``ResNet-(6n+2)``: a 3x3 stem with 16 channels and three stages of ``n``
BasicBlocks with 16, 32 and 64 channels (strides 1, 2, 2), global average
pooling and a linear classifier.  ResNet-32 (``n = 5``) is the CIFAR model
of Yi Ren's thesis (Tables 3.4 and 4.2).  mmpretrain ships ``ResNet_CIFAR``
only with the ImageNet depths (18, 34, 50, ...), so the depths here are
added to its architecture table; downsampling shortcuts are mmpretrain's
1x1 projection (option B of He et al.) rather than zero padding (option A).

Example:
    >>> import torch
    >>> net = CifarResNet(depth=32)
    >>> net(torch.randn(2, 3, 32, 32))[-1].shape
    torch.Size([2, 64, 8, 8])
"""
from mmpretrain.models.backbones.resnet import BasicBlock
from mmpretrain.models.backbones.resnet_cifar import ResNet_CIFAR
from mmpretrain.registry import MODELS


@MODELS.register_module()
class CifarResNet(ResNet_CIFAR):
    """ResNet-20/32/44/56/110 for 32x32 inputs (He et al. 2016).

    Args:
        depth (int): 20, 32, 44, 56 or 110.
        **kwargs: Passed to mmpretrain's ``ResNet_CIFAR`` (``stem_channels``,
            ``base_channels``, ``num_stages`` and ``strides`` default to the
            paper's 16, 16, 3 and (1, 2, 2); ``out_indices`` to the last
            stage).
    """

    arch_settings = {
        depth: (BasicBlock, ((depth - 2) // 6, ) * 3)
        for depth in (20, 32, 44, 56, 110)
    }

    def __init__(self, depth: int = 32, **kwargs) -> None:
        kwargs.setdefault('stem_channels', 16)
        kwargs.setdefault('base_channels', 16)
        kwargs.setdefault('num_stages', 3)
        kwargs.setdefault('strides', (1, 2, 2))
        kwargs.setdefault('dilations', (1, 1, 1))
        kwargs.setdefault('out_indices', (2, ))
        super().__init__(depth=depth, **kwargs)

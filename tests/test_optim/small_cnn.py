# Copyright (c) mmprecond contributors. All rights reserved.
"""A real small CNN classifier and a learnable task for optimizer tests."""
import torch
import torch.nn as nn


def small_cnn(seed: int = 0, bn: bool = True) -> nn.Sequential:
    """Conv + BN + ReLU, strided conv without bias, pooling, Linear head
    (``bn=False``: an identity instead of the BatchNorm)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6) if bn else nn.Identity(), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))


def quadrant_task(seed: int = 1, n: int = 64):
    """8x8 images; the label is the quadrant with the largest mean."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=gen)
    quads = [x[:, :, r:r + 4, c:c + 4].mean((1, 2, 3))
             for r in (0, 4) for c in (0, 4)]
    return x, torch.stack(quads, 1).argmax(1)

# Copyright (c) mmprecond contributors. All rights reserved.
import pytest
import torch
import torch.nn as nn

from mmprecond.curvature.capture import input_rows_gram, output_grad_gram
from mmprecond.curvature.diagonal import DiagonalCapture, diagonal_reason


@pytest.mark.parametrize('layer', [
    nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1),
    nn.Conv2d(3, 4, (3, 2), padding=(2, 1), dilation=2, bias=False),
    nn.Linear(5, 3),
])
def test_diagonals_equal_the_full_factors_diagonals(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9) if isinstance(layer, nn.Conv2d) else torch.randn(
        2, 4, 5)
    cap = DiagonalCapture({'m': layer})
    cap.active = True
    out = layer(x)
    out.retain_grad()
    out.sin().sum().backward()
    buf = cap.buffers['m']
    gram, rows = input_rows_gram(layer, x)
    torch.testing.assert_close(buf.h, gram.diagonal())
    assert buf.h_rows == rows
    ggram, grows = output_grad_gram(layer, out.grad)
    torch.testing.assert_close(buf.s, ggram.diagonal())
    assert buf.s_rows == grows


def test_norm_layers_per_channel_and_unsupported():
    bn, ln = nn.BatchNorm2d(3), nn.LayerNorm(4)
    cap = DiagonalCapture({'bn': bn, 'ln': ln})
    cap.active = True
    x = torch.randn(2, 3, 5, 4)
    y = ln(bn(x))
    y.pow(2).sum().backward()
    torch.testing.assert_close(cap.buffers['bn'].h, x.pow(2).sum((0, 2, 3)))
    assert cap.buffers['bn'].h_rows == 40 and cap.buffers['ln'].s_rows == 30
    assert diagonal_reason(nn.Conv2d(4, 4, 3, groups=2)) is not None
    assert diagonal_reason(nn.BatchNorm2d(3, affine=False)) is not None

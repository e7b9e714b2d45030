# Copyright (c) mmprecond contributors. All rights reserved.
"""BFGS building blocks of K-BFGS against their defining formulas."""
import pytest
import torch
import torch.nn as nn

from mmprecond.curvature.capture import input_rows_gram
from mmprecond.optim.bfgs_updates import (
    CompactLBFGS,
    bfgs_update,
    hessian_action,
    layer_rows,
    mean_patch_sum,
    powell_lm_damping,
)


def _explicit_bfgs(H, s, y):
    rho = 1.0 / (s @ y)
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    left = eye - rho * torch.outer(s, y)
    return left @ H @ left.T + rho * torch.outer(s, s)


def _spd(d, gen, dtype=torch.float64):
    m = torch.randn(d, d, generator=gen, dtype=dtype)
    return m @ m.T + d * torch.eye(d, dtype=dtype)


def test_bfgs_update_equals_product_form():
    gen = torch.Generator().manual_seed(0)
    H = torch.linalg.inv(_spd(6, gen))
    s = torch.randn(6, generator=gen, dtype=torch.float64)
    y = _spd(6, gen) @ s
    torch.testing.assert_close(bfgs_update(H, s, y), _explicit_bfgs(H, s, y))


@pytest.mark.parametrize('count', [1, 7, 12])
def test_compact_lbfgs_equals_explicit_recursion(count):
    """k <= p pairs: compact H M == k explicit BFGS updates of h0 I, times M;
    more than p pairs: only the newest p enter."""
    gen = torch.Generator().manual_seed(count)
    d, p, h0 = 9, 8, 0.3
    lb = CompactLBFGS(d, history=p, h0=h0, dtype=torch.float64)
    pairs = []
    for _ in range(count):
        s = torch.randn(d, generator=gen, dtype=torch.float64)
        y = _spd(d, gen) @ s  # s^T y > 0
        lb.push(s, y)
        pairs.append((s, y))
    H = h0 * torch.eye(d, dtype=torch.float64)
    for s, y in pairs[-p:]:
        H = _explicit_bfgs(H, s, y)
    M = torch.randn(d, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(lb.apply(M), H @ M)


def test_compact_lbfgs_state_roundtrip():
    gen = torch.Generator().manual_seed(3)
    lb = CompactLBFGS(5, history=4, h0=2.0)
    for _ in range(3):
        s = torch.randn(5, generator=gen)
        lb.push(s, 3 * s + 0.1 * torch.randn(5, generator=gen))
    other = CompactLBFGS(5, history=4, h0=2.0)
    other.load({k: v.clone() for k, v in lb.state().items()})
    M = torch.randn(5, 2, generator=gen)
    torch.testing.assert_close(other.apply(M), lb.apply(M))


def test_hessian_action_rank_one_is_sherman_morrison():
    """Thesis Theorem 1: H = A^-1, A+ = A + c a a^T, s = H a, y = A+ s:
    one BFGS update gives (A+)^-1 exactly."""
    gen = torch.Generator().manual_seed(1)
    A = _spd(7, gen)
    H = torch.linalg.inv(A)
    a = torch.randn(7, generator=gen, dtype=torch.float64)
    c = 0.7
    A_plus = A + c * torch.outer(a, a)
    s = H @ a
    y = A_plus @ s
    torch.testing.assert_close(bfgs_update(H, s, y), torch.linalg.inv(A_plus))


def test_double_damping_guarantees_curvature():
    """s~^T y~ >= mu2 ||s~||^2 and s~^T y >= mu1 y^T H y, also for pairs
    with negative curvature, and the undamped pair passes unchanged."""
    gen = torch.Generator().manual_seed(2)
    mu1 = 0.2
    for _ in range(200):
        d = 5
        H = torch.linalg.inv(_spd(d, gen))
        s = torch.randn(d, generator=gen, dtype=torch.float64)
        y = torch.randn(d, generator=gen, dtype=torch.float64)
        mu2 = float(10**torch.empty(1).uniform_(-3, 2, generator=gen))
        s2, y2 = powell_lm_damping(s, y, H @ y, mu1, mu2)
        assert s2 @ y2 >= mu2 * (s2 @ s2) * (1 - 1e-10)
        assert s2 @ y >= mu1 * (y @ H @ y) * (1 - 1e-10) - 1e-12
        if s @ y >= mu1 * (y @ H @ y):
            torch.testing.assert_close(s2, s)
            torch.testing.assert_close(y2, y + mu2 * s)


@pytest.mark.parametrize('layer', [
    nn.Linear(6, 4),
    nn.Linear(6, 4, bias=False),
    nn.Conv2d(3, 5, 3, padding=1),
    nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1, bias=False),
    nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(0, 1), dilation=2),
    nn.Conv2d(3, 4, 3, padding='same'),
])
def test_hessian_action_and_mean_patch_match_explicit_factor(layer):
    """A s (Eq. 3.15, A never formed) == (sum of patch outer products) s,
    with the explicit im2col Gram of the capture module; the same for the
    summed patch and the layer's |T|."""
    gen = torch.Generator().manual_seed(4)
    if isinstance(layer, nn.Conv2d):
        x = torch.randn(3, layer.in_channels, 9, 8, generator=gen)
        out = layer(x)
        assert layer_rows(layer, x) == (3, out.shape[2] * out.shape[3])
    else:
        x = torch.randn(2, 5, 6, generator=gen)
        assert layer_rows(layer, x) == (10, 1)
    gram, rows = input_rows_gram(layer, x)
    s = torch.randn(gram.shape[0], generator=gen)
    torch.testing.assert_close(
        hessian_action(layer, x, s), gram @ s, rtol=1e-4, atol=1e-4)
    total = mean_patch_sum(layer, x)
    if layer.bias is not None:
        torch.testing.assert_close(total, gram[-1], rtol=1e-4, atol=1e-4)
        assert float(total[-1]) == rows
    else:
        assert total.shape == (gram.shape[0], )

# Copyright (c) mmprecond contributors. All rights reserved.
import pytest
import torch

from mmprecond.inverse_root import (
    coupled_newton_schulz,
    damped_inverse_roots,
    inverse_root,
    inverse_roots,
)
from mmprecond.linalg import power_iteration_lmax


def spd(spectrum, seed=0):
    """``Q diag(spectrum) Q^T`` with a random orthogonal ``Q``."""
    g = torch.Generator().manual_seed(seed)
    n = len(spectrum)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(spectrum, dtype=torch.float64)) @ q.T


def eigh_power(a, power):
    vals, vecs = torch.linalg.eigh(a.double())
    return (vecs * vals.pow(power)) @ vecs.T


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize('n', [3, 8, 17])
def test_inverse_sqrt_k10_matches_eigh_on_known_spectrum(n):
    # eigenvalues within 30x of each other: lambda / tr(A) >= 1e-2 for n <= 17,
    # where K = 10 has converged
    mats = [spd(torch.linspace(0.1, 3.0, n) * (s + 1), seed=s) for s in range(4)]
    batch = torch.stack(mats).float()
    sqrt, isqrt = coupled_newton_schulz(batch, iters=10)
    for i, a in enumerate(mats):
        assert rel_err(isqrt[i], eigh_power(a, -0.5)) < 1e-4
        assert rel_err(sqrt[i], eigh_power(a, 0.5)) < 1e-4


def test_inverse_fourth_root_matches_eigh():
    mats = [spd(torch.logspace(-1, 0.5, 6), seed=s) for s in range(3)]
    got = inverse_root(torch.stack(mats).float(), 4, iters=10)
    for i, a in enumerate(mats):
        assert rel_err(got[i], eigh_power(a, -0.25)) < 1e-4


def test_k10_truncation_damps_small_eigenvalues_as_documented():
    # lambda / tr(A) = 1e-4 for the small direction: the K = 10 gain there is
    # about 0.53 of the true s^{-1/2} (and converged with enough iterations)
    small = 1e-4
    a = torch.diag(torch.tensor([1.0 - small, small], dtype=torch.float64))
    z10 = coupled_newton_schulz(a[None], iters=10)[1][0]
    ratio = float(z10[1, 1] / small**-0.5)
    assert 0.5 < ratio < 0.56, ratio
    assert abs(float(z10[0, 0]) - (1 - small)**-0.5) < 1e-6
    z40 = coupled_newton_schulz(a[None], iters=40)[1][0]
    assert abs(float(z40[1, 1] / small**-0.5) - 1) < 1e-6


def test_batched_equals_one_at_a_time():
    mats = torch.stack([spd(torch.rand(5) + 0.2, seed=s) for s in range(5)]).float()
    together = inverse_root(mats, 2)
    for i in range(5):
        torch.testing.assert_close(together[i], inverse_root(mats[i:i + 1], 2)[0])


def test_power_lmax_and_relative_damping():
    spectra = [torch.tensor([4.0, 1.0, 0.5, 0.0]), torch.tensor([2.0, 0.1, 0.1, 0.1])]
    mats = torch.stack([spd(s, seed=i) for i, s in enumerate(spectra)])
    lam = power_iteration_lmax(mats, 50)
    torch.testing.assert_close(lam, torch.tensor([4.0, 2.0], dtype=torch.float64))
    assert float(power_iteration_lmax(torch.zeros(1, 3, 3), 10)[0]) == 0.0
    # (A + eps lmax I)^{-1/2}, with the singular first matrix made SPD
    got = damped_inverse_roots(mats, 2, damping=0.1, iters=30)
    for a, s, r in zip(mats, spectra, got):
        ref = eigh_power(a + 0.1 * s.max() * torch.eye(4, dtype=a.dtype), -0.5)
        assert rel_err(r, ref) < 1e-6


def test_mixed_sizes_grouped_and_nonfinite_flagged():
    a3, b3, a5 = spd([1.0, 2.0, 3.0], 0), spd([0.5, 1.0, 1.5], 1), spd(
        torch.linspace(1, 2, 5), 2)
    zero = torch.zeros(3, 3, dtype=torch.float64)
    roots, ok = inverse_roots([a3, a5, zero, b3], p=2, damping=1e-5, iters=20)
    assert ok == [True, True, False, True]
    torch.testing.assert_close(roots[2], torch.eye(3, dtype=torch.float64))
    for r, a in zip([roots[0], roots[1], roots[3]], [a3, a5, b3]):
        ref = eigh_power(a + 1e-5 * torch.linalg.eigvalsh(a).max() * torch.eye(
            len(a), dtype=a.dtype), -0.5)
        assert rel_err(r, ref) < 1e-6

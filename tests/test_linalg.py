# Copyright (c) mmprecond contributors. All rights reserved.
import pytest
import torch

from mmprecond.linalg import (
    damp,
    estimate_residual,
    exact_inverse,
    newton_inverse,
    power_iteration_lmax,
    safe_eigh,
)
from mmprecond.logging import FallbackLog


def spd_with_spectrum(eigs, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g,
                                       dtype=torch.float64))
    return (q * torch.as_tensor(eigs, dtype=torch.float64)) @ q.T


def residual(a, b):
    return torch.linalg.matrix_norm(torch.eye(a.shape[0], dtype=a.dtype) - b @ a)


def test_power_iteration_matches_eigvalsh():
    eigs = torch.cat([torch.linspace(0.01, 1.0, 29), torch.tensor([3.0])])
    a = spd_with_spectrum(eigs)
    assert power_iteration_lmax(a, 50) == pytest.approx(3.0, rel=1e-6)
    # 10 iterations (the default) never overestimate and are close here
    assert 0.95 * 3.0 <= float(power_iteration_lmax(a)) <= 3.0 + 1e-9


def test_power_iteration_on_softmax_gradient_factor():
    # Cross-entropy output gradients sum to zero over classes, so the all-ones
    # vector spans the null space of Delta Delta^T; a ones start would only
    # amplify round-off.  The estimate must be accurate and thread-independent.
    torch.manual_seed(0)
    logits = torch.randn(12, 5)
    target = torch.randint(0, 5, (12, ))
    delta = logits.softmax(1) - torch.nn.functional.one_hot(target, 5)
    # integer rows summing to exactly zero: Delta Delta^T 1 == 0 in fp32 too
    ints = torch.randint(-3, 4, (12, 4)).float()
    for gg in (delta.T @ delta / 12,
               torch.cat([ints, -ints.sum(1, keepdim=True)], 1).T
               @ torch.cat([ints, -ints.sum(1, keepdim=True)], 1)):
        assert float(gg.sum(0).abs().max()) < 1e-5 * float(gg.abs().max())
        check_lmax(gg)


def check_lmax(gg):
    true = float(torch.linalg.eigvalsh(gg.double()).max())
    est = float(power_iteration_lmax(gg))
    assert 0.95 * true <= est <= true * (1 + 1e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert float(power_iteration_lmax(gg)) == est
    finally:
        torch.set_num_threads(threads)


def test_damp_adds_relative_and_floor():
    a = torch.diag(torch.tensor([2.0, 1.0]))
    d = damp(a, 0.01, lmax=torch.tensor(2.0))
    assert torch.allclose(d.diagonal(), torch.tensor([2.02, 1.02]))
    z = damp(torch.zeros(2, 2), 0.01)
    assert torch.allclose(z, 1e-4 * torch.eye(2))


def test_newton_cold_start_converges_quadratically():
    eigs = torch.linspace(0.1, 1.0, 20)
    a = spd_with_spectrum(eigs)
    # classic cold start B0 = A / (||A||_1 ||A||_inf): ||I - B0 A||_2 < 1
    b = a / (torch.linalg.matrix_norm(a, 1) * torch.linalg.matrix_norm(a, float('inf')))
    errs = [float(residual(a, b))]
    for _ in range(30):
        b, _ = newton_inverse(a, b, steps=1)
        errs.append(float(residual(a, b)))
    assert errs[-1] < 1e-10
    # outside the unit ball (Frobenius) the damped step decreases it monotonically
    k = next(i for i, e in enumerate(errs) if e < 1)
    assert k > 0 and all(x > y for x, y in zip(errs[:k], errs[1:k + 1]))
    # inside, the error squares each step (up to rounding)
    for e0, e1 in zip(errs[k:], errs[k + 1:]):
        if e0 > 1e-7:
            assert e1 <= e0 ** 2 * 1.01


def test_newton_warm_start_single_step_improves():
    eigs = torch.logspace(-2, 0, 40)
    a_old = spd_with_spectrum(eigs, seed=1)
    a_new = a_old + 0.05 * spd_with_spectrum(torch.rand(40), seed=2)
    b_prev = torch.linalg.inv(a_old)
    before = residual(a_new, b_prev)
    b, r0 = newton_inverse(a_new, b_prev, steps=1)
    assert r0 == pytest.approx(float(before))
    if before < 1:
        assert residual(a_new, b) <= before ** 2 * 1.01
    else:
        assert residual(a_new, b) < before


def test_newton_damped_branch_when_residual_at_least_one():
    a = spd_with_spectrum(torch.linspace(1.0, 2.0, 10))
    b0 = 3.0 * torch.linalg.inv(a)  # ||I - B0 A||_F = 2 sqrt(10) >= 1
    assert residual(a, b0) >= 1
    b, r0 = newton_inverse(a, b0, steps=1)
    # manual damped step (1 + s) B - s B A B with s = 1 / ||B A||_F
    t = b0 @ a
    s = 1 / torch.linalg.matrix_norm(t)
    assert torch.allclose(b, (1 + s) * b0 - s * t @ b0)
    assert residual(a, b) < r0


def test_estimate_residual_is_unbiased():
    a = spd_with_spectrum(torch.linspace(0.5, 1.5, 50))
    b = torch.linalg.inv(a) * 0.9
    exact = float(torch.linalg.matrix_norm(torch.eye(50, dtype=a.dtype) - a @ b))
    g = torch.Generator().manual_seed(0)
    est = estimate_residual(a, b, probes=2000, generator=g)
    assert float(est) == pytest.approx(exact, rel=0.05)


def test_exact_inverse_and_fp64_retry_is_counted():
    a = spd_with_spectrum(torch.linspace(0.1, 1, 8)).float()
    assert torch.allclose(exact_inverse(a) @ a, torch.eye(8), atol=1e-4)
    log = FallbackLog('test')
    # positive definite in fp64 but not numerically so in fp32
    eps = 1e-9
    bad = torch.tensor([[1.0, 1.0 - eps], [1.0 - eps, 1.0]], dtype=torch.float64)
    inv = exact_inverse(bad.float(), log)
    assert torch.isfinite(inv).all()
    assert log.counts['inverse_fp64_retry'] == 1


def test_exact_inverse_raises_on_nan():
    with pytest.raises(FloatingPointError):
        exact_inverse(torch.full((3, 3), float('nan')), FallbackLog('t'))


def test_safe_eigh_repeated_eigenvalues():
    a = spd_with_spectrum([1.0, 1.0, 1.0, 2.0, 2.0]).float()
    vals, vecs = safe_eigh(a)
    assert vals.dtype == torch.float32
    assert torch.allclose(vals, torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0]), atol=1e-5)
    assert torch.allclose(vecs @ torch.diag(vals) @ vecs.T, a, atol=1e-5)
    assert torch.allclose(vecs.T @ vecs, torch.eye(5), atol=1e-5)

# Copyright (c) mmprecond contributors. All rights reserved.
import pytest
import torch

from mmprecond.linalg import (
    EIGH_FAILED,
    EXTRA_DAMPING,
    FP64_RETRY,
    INVERSE_FAILED,
    NEWTON_FALLBACK,
    batch_limit,
    damp,
    eigh_batch,
    estimate_residual,
    exact_inverse,
    exact_inverse_batch,
    guarded_newton_inverse,
    lanczos_lmax,
    newton_inverse,
    power_iteration_lmax,
    record_flags,
    refresh_inverse,
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
    # 20 mat-vecs (the default, the authors' count) never overestimate
    assert 0.95 * 3.0 <= float(power_iteration_lmax(a)) <= 3.0 + 1e-9
    assert float(lanczos_lmax(a)) == pytest.approx(3.0, rel=1e-9)


def gram(rows, n, seed, mix=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g, dtype=torch.float64)
    if mix is not None:
        x = x @ mix
    return x.T @ x / rows


def known_spectra():
    """Factors whose lambda_max is known (eigvalsh), named by their shape."""
    n = 385  # a conv/linear input factor: 384 channels plus the bias column
    mix = torch.randn(n, n, generator=torch.Generator().manual_seed(3),
                      dtype=torch.float64) / n**0.5
    return {
        # flat top end (Marchenko-Pastur edge): power iteration's worst case
        'gaussian-rows-385': gram(8 * n, n, 0),
        'correlated-features-385': gram(2 * n, n, 1, mix),
        'slow-decay-385': spd_with_spectrum(torch.arange(1., n + 1)**-0.25),
        'rank-100-of-385': spd_with_spectrum(torch.cat(
            [torch.linspace(1, 0.9, 100), torch.zeros(n - 100)])),
        'gap-30': spd_with_spectrum(torch.cat([torch.linspace(0.01, 1.0, 29),
                                               torch.tensor([3.0])])),
    }


@pytest.mark.parametrize('name', list(known_spectra()))
def test_lanczos_lmax_against_eigvalsh_and_the_authors_estimator(name):
    a = known_spectra()[name]
    true = float(torch.linalg.eigvalsh(a)[-1])
    est = float(lanczos_lmax(a))
    # a lower bound (Cauchy interlacing), up to fp64 rounding
    assert est <= true * (1 + 1e-10)
    # at least as accurate as the 20 power mat-vecs of the authors' code,
    # with 10 mat-vecs
    assert est >= float(power_iteration_lmax(a, 20)) * (1 - 1e-12)
    assert est >= 0.985 * true
    # fp32 input: the bound holds up to fp32 rounding
    est32 = float(lanczos_lmax(a.float()))
    assert 0.98 * true <= est32 <= true * (1 + 1e-5)


def test_power_iteration_reads_low_on_a_flat_spectrum_top():
    """The issue behind the switch: 10 power mat-vecs read ~8 % low."""
    a = known_spectra()['gaussian-rows-385']
    true = float(torch.linalg.eigvalsh(a)[-1])
    assert float(power_iteration_lmax(a, 10)) < 0.93 * true
    assert float(power_iteration_lmax(a, 20)) < 0.97 * true
    assert float(lanczos_lmax(a, 10)) > 0.985 * true


def test_lanczos_lmax_edge_cases():
    assert lanczos_lmax(torch.zeros(2, 4, 4)).tolist() == [0.0, 0.0]
    assert float(lanczos_lmax(torch.eye(1) * 2)) == pytest.approx(2.0)
    # an invariant Krylov subspace (identity): no 0 / 0
    assert float(lanczos_lmax(torch.eye(50))) == pytest.approx(1.0)
    nan = torch.eye(6).repeat(3, 1, 1)
    nan[1, 2, 3] = float('nan')
    out = lanczos_lmax(nan)
    assert out[1].isnan() and out[[0, 2]].tolist() == pytest.approx([1.0, 1.0])


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
        for estimator in (power_iteration_lmax, lanczos_lmax):
            check_lmax(gg, estimator)


def check_lmax(gg, estimator):
    true = float(torch.linalg.eigvalsh(gg.double()).max())
    est = float(estimator(gg))
    assert 0.95 * true <= est <= true * (1 + 1e-6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert float(estimator(gg)) == est
    finally:
        torch.set_num_threads(threads)


def test_damp_adds_relative_and_floor():
    a = torch.diag(torch.tensor([2.0, 1.0]))
    d = damp(a, 0.01, lmax=torch.tensor(2.0))
    assert torch.allclose(d.diagonal(), torch.tensor([2.02, 1.02]))
    z = damp(torch.zeros(2, 2), 0.01)
    assert torch.allclose(z, 1e-4 * torch.eye(2))
    # a batch: one shift per matrix
    batch = damp(torch.stack([a, 2 * a]), 0.01, lmax=torch.tensor([2.0, 4.0]))
    assert torch.allclose(batch.diagonal(dim1=1, dim2=2),
                          torch.tensor([[2.02, 1.02], [4.04, 2.04]]))


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


# ------------------------------------------------------------------ batches
def spd_batch(n, count, seed):
    """Damped, correlated Gram matrices, fp32, like refreshed factors."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for _ in range(count):
        x = torch.randn(2 * n, n, generator=g) @ (torch.randn(n, n, generator=g)
                                                  / n**0.5)
        s = x.T @ x
        mats.append(s / torch.linalg.matrix_norm(s))
    return damp(torch.stack(mats), 0.01)


@pytest.mark.parametrize('n,count', [(1, 3), (5, 4), (17, 3), (64, 5)])
def test_batched_results_equal_one_at_a_time(n, count):
    a = spd_batch(n, count, seed=n)
    lmax = lanczos_lmax(a)
    inv, flags = exact_inverse_batch(a)
    assert flags.tolist() == [0] * count
    warm = inv * 0.97 + 0.01 * torch.eye(n)
    new, res = newton_inverse(a, warm, steps=2)
    vals, vecs, eflags = eigh_batch(a)
    probes = torch.randn(count, n, 4, generator=torch.Generator().manual_seed(0))
    guarded, gflags = guarded_newton_inverse(a, warm, 1, probes, 1e-3)
    assert gflags.tolist() == [0] * count
    for i in range(count):
        tight = dict(rtol=1e-5, atol=1e-6 * float(inv[i].abs().max()))
        torch.testing.assert_close(lmax[i], lanczos_lmax(a[i]), **tight)
        torch.testing.assert_close(inv[i], exact_inverse(a[i]), **tight)
        one, r = newton_inverse(a[i], warm[i], steps=2)
        torch.testing.assert_close(new[i], one, **tight)
        torch.testing.assert_close(res[i], r)
        one, _ = guarded_newton_inverse(a[i:i + 1], warm[i:i + 1], 1,
                                        probes[i:i + 1], 1e-3)
        torch.testing.assert_close(guarded[i], one[0], **tight)
        w, v = safe_eigh(a[i])
        torch.testing.assert_close(vals[i], w, rtol=1e-5, atol=1e-7)
        # eigenvectors up to sign (the spectra here are simple)
        signs = torch.sign((vecs[i] * v).sum(0))
        torch.testing.assert_close(vecs[i] * signs, v, rtol=0, atol=1e-4)
    # the inverse is right, not only consistent
    torch.testing.assert_close(inv @ a, torch.eye(n).expand(count, n, n),
                               rtol=0, atol=2e-3)


def test_one_bad_matrix_in_a_batch_is_retried_and_counted_alone():
    a = spd_batch(8, 5, seed=0)
    clean, _ = exact_inverse_batch(a)
    bad = a.clone()
    bad[1] = torch.ones(8, 8)  # singular in fp64 too: needs extra damping
    bad[3, 0, 0] = float('nan')  # cannot be inverted at all
    inv, flags = exact_inverse_batch(bad)
    codes = flags.tolist()
    assert codes[1] == FP64_RETRY | EXTRA_DAMPING
    assert codes[3] == FP64_RETRY | EXTRA_DAMPING | INVERSE_FAILED
    assert [codes[i] for i in (0, 2, 4)] == [0, 0, 0]
    assert torch.equal(inv[[0, 2, 4]], clean[[0, 2, 4]])  # untouched
    assert torch.isfinite(inv[1]).all() and torch.isnan(inv[3]).all()
    log = FallbackLog('test')
    record_flags(log, flags)
    assert log.counts['inverse_fp64_retry'] == 2
    assert log.counts['inverse_extra_damping'] == 2
    assert log.counts['inverse_failure'] == 1
    with pytest.raises(FloatingPointError):
        exact_inverse(bad, FallbackLog('t'))


def test_newton_guard_falls_back_per_matrix():
    a = spd_batch(12, 4, seed=1)
    exact, _ = exact_inverse_batch(a)
    warm = exact * 0.98
    warm[2] = -10 * exact[2]  # a useless warm start for one matrix only
    probes = torch.randn(4, 12, 4, generator=torch.Generator().manual_seed(0))
    new, flags = guarded_newton_inverse(a, warm, 1, probes, 1e-3)
    assert flags.tolist() == [0, 0, NEWTON_FALLBACK, 0]
    torch.testing.assert_close(new[2], exact[2])
    ref, _ = newton_inverse(a[[0, 1, 3]], warm[[0, 1, 3]])
    assert torch.equal(new[[0, 1, 3]], ref)
    # refresh_inverse composes lambda_max, damping and the guard
    inv, flags = refresh_inverse(a, 0.01, prev=warm, probes=probes)
    ref, ref_flags = guarded_newton_inverse(damp(a, 0.01), warm, 1, probes, 1e-3)
    assert torch.equal(inv, ref) and torch.equal(flags, ref_flags)
    assert flags.tolist()[2] == NEWTON_FALLBACK
    inv, flags = refresh_inverse(a, 0.01)  # no warm start: exact
    assert torch.equal(inv, exact_inverse_batch(damp(a, 0.01))[0])


def test_eigh_batch_fails_only_the_nonfinite_matrix():
    a = spd_batch(6, 3, seed=2)
    vals, vecs, flags = eigh_batch(a)
    bad = a.clone()
    bad[0, 1, 1] = float('inf')
    bvals, bvecs, bflags = eigh_batch(bad)
    assert bflags.tolist() == [EIGH_FAILED, 0, 0]
    assert torch.isnan(bvecs[0]).all() and torch.isnan(bvals[0]).all()
    assert torch.equal(bvecs[1:], vecs[1:]) and torch.equal(bvals[1:], vals[1:])
    log = FallbackLog('test')
    safe_eigh(bad, log)
    assert dict(log.counts) == {'eigh_failure': 1}


def test_batch_limit_caps_cpu_batches_only():
    cpu = torch.device('cpu')
    assert batch_limit(256, torch.float32, cpu) == 4  # 1 MiB of factors
    assert batch_limit(4608, torch.float32, cpu) == 1
    assert batch_limit(256, torch.float64, cpu) == 2
    assert batch_limit(256, torch.float32, torch.device('meta')) > 10**9

# Copyright (c) mmprecond contributors. All rights reserved.
"""AdamR's basis handling: the rotation pays off, power-step refreshes,
non-finite bases and factors."""
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REPO_ROOT

from mmprecond.curvature.factors import BatchStatistics
from mmprecond.optim import AdamR
from mmprecond.optim.adamr import power_step_basis


def _benchmark(name):
    spec = importlib.util.spec_from_file_location(
        name, REPO_ROOT / 'benchmarks' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_adamr_beats_adamw_5x_on_least_squares():
    """The rotation buys what it promises on an ill-conditioned problem."""
    bench = _benchmark('adamr_least_squares')
    problem = bench.LeastSquares(seed=0)
    lr = 0.03
    adamw = bench.train(
        problem, lambda m: torch.optim.AdamW(m.parameters(), lr=lr,
                                             weight_decay=0.0), steps=400)
    adamr = bench.train(
        problem, lambda m: AdamR(m.parameters(), model=m, lr=lr,
                                 weight_decay=0.0, stat_interval=5,
                                 refresh_interval=20), steps=400)
    ratio = bench.final_loss(adamr, 20) / bench.final_loss(adamw, 20)
    assert ratio < 1 / 5, ratio
    # and not by luck: Algorithm 6's carried-over moments waste it
    thesis = bench.train(
        problem, lambda m: AdamR(m.parameters(), model=m, lr=lr,
                                 weight_decay=0.0, stat_interval=5,
                                 refresh_interval=20,
                                 moment_projection='algorithm6'), steps=400)
    assert bench.final_loss(thesis, 20) > 10 * bench.final_loss(adamr, 20)


def _spd(n, seed, spectrum=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    d = torch.linspace(1, n, n, dtype=torch.float64) if spectrum is None else spectrum
    return q @ torch.diag(d) @ q.T, q  # q: eigenvectors, ascending


def test_power_steps_converge_to_the_eigenbasis_in_order():
    factor, q = _spd(6, 0, torch.tensor([1., 2., 4., 8., 16., 32.],
                                        dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    # a start near the eigenbasis, as after an earlier refresh
    start = torch.linalg.qr(q + 0.1 * torch.randn(6, 6, generator=g,
                                                  dtype=torch.float64))[0]
    start = start * torch.where((start * q).sum(0) < 0, -1.0, 1.0)
    u = start
    for _ in range(40):
        u = power_step_basis(factor, u)[0]
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=torch.float64))
    # column i converges to the i-th eigenvector (ascending), same sign
    torch.testing.assert_close(u, q, rtol=0, atol=1e-6)
    # one step moves towards it and keeps every column's direction
    one, ok = power_step_basis(factor, start)
    assert (one - q).norm() < (start - q).norm()
    assert ((one * start).sum(0) > 0).all() and ok


def test_power_step_is_batched_and_keeps_old_basis_when_not_finite():
    f1, q1 = _spd(5, 2)
    f2, q2 = _spd(5, 3)
    bad = f2.clone()
    bad[0, 1] = float('nan')
    batch, ok = power_step_basis(torch.stack([f1, f2, bad]),
                                 torch.stack([q1, q2, q2]))
    torch.testing.assert_close(batch[0], power_step_basis(f1, q1)[0])
    torch.testing.assert_close(batch[1], power_step_basis(f2, q2)[0])
    torch.testing.assert_close(batch[2], q2, rtol=0, atol=0)
    assert ok.tolist() == [True, True, False]


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8),
                         nn.Tanh(), nn.Linear(8, 3))


def _steps(model, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(32, 6, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), x[:, :3]).backward()
        opt.step()


def test_power_refresh_moves_bases_and_keeps_first_moment():
    model = _net()
    opt = AdamR(model.parameters(), model=model, lr=1e-2, stat_interval=1,
                refresh_interval=4, power_interval=1, moment_projection='rotate')
    _steps(model, opt, 5)  # eigh at t = 4
    before = {n: {k: v.clone() for k, v in st.items()}
              for n, st in opt.layer_state.items()}
    g = torch.Generator().manual_seed(5)
    stats = {}
    for n, st in opt.layer_state.items():  # factors with other eigenvectors
        a = torch.randn(len(st['L']), 20, generator=g)
        b = torch.randn(len(st['R']), 20, generator=g)
        stats[n] = BatchStatistics(xx=b @ b.T, gg=a @ a.T)
    opt.update_statistics(stats, 5)
    opt.update_preconditioners(5)  # a power step, not an eigh
    for name, st in opt.layer_state.items():
        old = before[name]
        for key, side in (('U1', 'L'), ('U2', 'R')):
            u = st[key]
            torch.testing.assert_close(u.T @ u, torch.eye(len(u)), rtol=0,
                                       atol=1e-5)
            torch.testing.assert_close(u, power_step_basis(st[side],
                                                           old[key])[0])
            assert not torch.allclose(u, old[key], atol=1e-4)
        # 'rotate': the first moment is the same matrix in parameter space
        torch.testing.assert_close(st['U1'] @ st['exp_avg'] @ st['U2'].T,
                                   old['U1'] @ old['exp_avg'] @ old['U2'].T,
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(st['exp_avg_sq'], old['exp_avg_sq'])
    assert sum(opt.fallbacks.counts.values()) == 0


def test_nan_factor_in_power_refresh_keeps_basis_and_is_counted():
    model = _net()
    opt = AdamR(model.parameters(), model=model, lr=1e-2, stat_interval=1,
                refresh_interval=4, power_interval=1)
    _steps(model, opt, 5)
    st = opt.layer_state['2']
    u1 = st['U1'].clone()
    st['L'][0, 0] = float('nan')
    opt.update_preconditioners(5)
    torch.testing.assert_close(st['U1'], u1, rtol=0, atol=0)
    # counted on the device, read when the counts are
    assert opt.fallbacks.counts['power_step_failure'] == 1


def test_nonfinite_basis_skips_the_layer_consistently():
    """A NaN in a basis: that layer takes only its weight decay, its moments
    stay as they were, the rest of the model steps as usual, and the next
    eigh refresh replaces the basis and restarts the layer's moments."""
    lr, wd = 1e-2, 0.1
    model, ref = _net(), _net()
    hp = dict(lr=lr, weight_decay=wd, stat_interval=1, refresh_interval=4)
    opt, opt_ref = (AdamR(model.parameters(), model=model, **hp),
                    AdamR(ref.parameters(), model=ref, **hp))
    _steps(model, opt, 5)
    _steps(ref, opt_ref, 5)
    st = opt.layer_state['2']
    st['U1'][1, 2] = float('nan')
    moments = {k: st[k].clone() for k in ('exp_avg', 'exp_avg_sq')}
    w, b = model[2].weight.detach().clone(), model[2].bias.detach().clone()
    _steps(model, opt, 1, seed=7)  # t = 5: no refresh
    _steps(ref, opt_ref, 1, seed=7)
    for k, v in moments.items():
        torch.testing.assert_close(st[k], v, rtol=0, atol=0)
    torch.testing.assert_close(model[2].weight, w * (1 - lr * wd), rtol=0,
                               atol=0)
    torch.testing.assert_close(model[2].bias, b * (1 - lr * wd), rtol=0,
                               atol=0)
    for i in (0, 4):  # the other layers took their usual step
        torch.testing.assert_close(model[i].weight, ref[i].weight)
    for p in model.parameters():
        assert torch.isfinite(p).all()
    opt.sync_fallbacks()
    assert opt.fallbacks.counts['nonfinite_rotated_gradient'] == 1
    assert opt.fallbacks.counts['nonfinite_direction'] == 0  # base saw none
    _steps(model, opt, 3, seed=8)  # t = 6, 7, 8: eigh at t = 8
    assert opt.fallbacks.counts['nonfinite_basis'] == 1
    assert torch.isfinite(st['U1']).all() and st['step'].item() == 1
    for name, layer_st in opt.layer_state.items():
        for key, value in layer_st.items():
            assert torch.isfinite(value).all(), (name, key)
    for p in model.parameters():
        assert torch.isfinite(p).all()


@pytest.mark.parametrize('power_interval', [None, 2])
def test_nan_factor_before_eigh_keeps_everything_finite(power_interval):
    model = _net()
    opt = AdamR(model.parameters(), model=model, lr=1e-2, stat_interval=1,
                refresh_interval=4, power_interval=power_interval)
    _steps(model, opt, 5)
    u1 = opt.layer_state['0']['U1'].clone()
    opt.layer_state['0']['L'].fill_(float('nan'))
    _steps(model, opt, 4)  # refreshes at t = 6 (power) and 8 (eigh)
    st = opt.layer_state['0']
    assert opt.fallbacks.counts['eigh_failure'] >= 1
    torch.testing.assert_close(st['U1'], u1, rtol=0, atol=0)  # kept
    for key in ('U1', 'U2', 'exp_avg', 'exp_avg_sq'):
        assert torch.isfinite(st[key]).all()
    for p in model.parameters():
        assert torch.isfinite(p).all()

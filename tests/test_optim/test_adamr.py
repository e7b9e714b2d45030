# Copyright (c) mmprecond contributors. All rights reserved.
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmprecond.curvature.factors import BatchStatistics
from mmprecond.optim import AdamR
from mmprecond.optim.adamr import align_signs, project_moments


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(6, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5))


def batches(n, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g),
             torch.randint(0, 5, (size, ), generator=g)) for _ in range(n)]


def loss_of(model, x, y):
    return F.cross_entropy(model(x), y)


def groups(model):
    """Weights and biases in groups with different lr / weight decay."""
    decay = [p for n, p in model.named_parameters() if n.endswith('weight')]
    no_decay = [p for n, p in model.named_parameters() if n.endswith('bias')]
    return [dict(params=decay), dict(params=no_decay, weight_decay=0.0, lr=0.03)]


def run(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


def assert_same_params(a, b, atol=1e-6):
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=atol)


@pytest.mark.parametrize('identity', ['no_basis_yet', 'all_excluded'])
def test_identity_rotation_is_adamw(identity):
    a, b = tiny_net(), tiny_net()
    kw = (dict(stat_interval=1, refresh_interval=1000)
          if identity == 'no_basis_yet' else dict(max_factor_dim=1))
    opt_a = AdamR(groups(a), model=a, lr=1e-2, betas=(0.8, 0.99), eps=1e-7,
                  weight_decay=0.1, **kw)
    opt_b = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.8, 0.99), eps=1e-7,
                              weight_decay=0.1)
    data = batches(12)
    run(a, opt_a, data)
    run(b, opt_b, data)
    assert_same_params(a, b)
    if identity == 'no_basis_yet':
        # the layers were hooked and their moments are the AdamW moments of
        # the [weight | bias] matrix, kept per layer
        assert set(opt_a.layers) == {'0', '2', '5'} and not opt_a.state
        st = opt_a.layer_state['5']
        assert 'U1' not in st and st['L_count'].item() == 12
        lin = a[5]
        exp_avg = torch.cat([opt_b.state[b[5].weight]['exp_avg'],
                             opt_b.state[b[5].bias]['exp_avg'][:, None]], 1)
        torch.testing.assert_close(st['exp_avg'], exp_avg, rtol=0, atol=1e-7)
        assert st['exp_avg'].shape == (5, lin.in_features + 1)
    else:
        assert not opt_a.layers


def _matrix(lin):
    return torch.cat([lin.weight, lin.bias[:, None]], 1).detach().clone()


def _hand_basis(s, eps):
    m = s.double() + eps * torch.eye(len(s), dtype=torch.float64)
    vecs = torch.linalg.eigh(m).eigenvectors.float()
    return vecs * torch.where(vecs.diagonal() < 0, -1.0, 1.0)  # aligned with I


# (moment_projection, reset_first_basis): the default resets the moments at
# the first basis; Algorithm 6 and the old 'project' carry them over
FIRST_BASIS_POLICIES = [('rotate', None), ('algorithm6', None),
                        ('project', False)]


@pytest.mark.parametrize('projection,reset', FIRST_BASIS_POLICIES)
def test_rotated_step_matches_hand_computation(projection, reset):
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    lr, wd, b1, b2, eps, eps_b = 0.05, 0.1, 0.9, 0.99, 1e-8, 0.01
    opt = AdamR(model.parameters(), model=model, lr=lr, betas=(b1, b2), eps=eps,
                weight_decay=wd, stat_interval=1, refresh_interval=1,
                eps_basis=eps_b, moment_projection=projection,
                reset_first_basis=reset)
    xs = [torch.randn(16, 4), torch.randn(16, 4)]
    ls, rs, gs, ws = [], [], [], [_matrix(lin)]
    for x in xs:
        opt.zero_grad()
        out = model(x)
        out.retain_grad()
        out.sin().sum().backward()
        xr = torch.cat([x, torch.ones(16, 1)], 1)
        rs.append(xr.T @ xr / 16)
        ls.append(out.grad.T @ out.grad)
        gs.append(torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1).clone())
        opt.step()
        ws.append(_matrix(lin))

    # step 0: no basis yet, a plain AdamW step
    m = (1 - b1) * gs[0]
    v = (1 - b2) * gs[0]**2
    w1 = ws[0] * (1 - lr * wd) - lr / (1 - b1) * m / (
        (v / (1 - b2)).sqrt() + eps)
    torch.testing.assert_close(ws[1], w1, rtol=0, atol=1e-6)
    # step 1: L, R are means of two statistics; the first basis is formed
    u1 = _hand_basis((ls[0] + ls[1]) / 2, eps_b)
    u2 = _hand_basis((rs[0] + rs[1]) / 2, eps_b)
    torch.testing.assert_close(opt.layer_state['0']['U1'], u1, rtol=0, atol=1e-5)
    torch.testing.assert_close(opt.layer_state['0']['U2'], u2, rtol=0, atol=1e-5)
    k = 2  # the bias-correction counter
    if projection == 'rotate':  # reset at the first basis
        m, v, k = torch.zeros_like(m), torch.zeros_like(v), 1
    elif projection == 'project':
        m = u1.T @ m @ u2
        v = (u1 * u1).T @ v @ (u2 * u2)
    gt = u1.T @ gs[1] @ u2
    m = b1 * m + (1 - b1) * gt
    v = b2 * v + (1 - b2) * gt**2
    bc1, bc2 = 1 - b1**k, 1 - b2**k
    w2 = ws[1] * (1 - lr * wd) - lr / bc1 * u1 @ (m / (
        (v / bc2).sqrt() + eps)) @ u2.T
    torch.testing.assert_close(ws[2], w2, rtol=0, atol=1e-5)
    assert opt.layer_state['0']['step'].item() == k
    # it did rotate: the AdamW step from the same moments is elsewhere
    m_id = b1 * (1 - b1) * gs[0] + (1 - b1) * gs[1]
    v_id = b2 * (1 - b2) * gs[0]**2 + (1 - b2) * gs[1]**2
    w2_adamw = ws[1] * (1 - lr * (wd)) - lr / (1 - b1**2) * m_id / (
        (v_id / (1 - b2**2)).sqrt() + eps)
    assert (ws[2] - w2_adamw).abs().max() > 1e-3


def _layer_with_basis(projection, seed=0):
    """A one-layer AdamR whose layer has a basis, moments and new factors."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5, bias=False))
    opt = AdamR(model.parameters(), model=model, stat_interval=1,
                refresh_interval=1, moment_projection=projection)
    q1 = torch.linalg.qr(torch.randn(5, 5))[0]
    q2 = torch.linalg.qr(torch.randn(4, 4))[0]
    a, b = torch.randn(5, 9), torch.randn(4, 9)
    opt.layer_state['0'] = dict(
        L=a @ a.T, R=b @ b.T, U1=q1, U2=q2, exp_avg=torch.randn(5, 4),
        exp_avg_sq=torch.rand(5, 4), step=torch.tensor(7.0))
    return opt, {k: v.clone() for k, v in opt.layer_state['0'].items()}


@pytest.mark.parametrize('projection', ['rotate', 'project', 'keep', 'reset'])
def test_moments_at_a_later_refresh(projection):
    opt, before = _layer_with_basis(projection)
    opt.update_preconditioners(1)
    st = opt.layer_state['0']
    u1, u2 = st['U1'], st['U2']
    assert not torch.allclose(u1, before['U1'], atol=1e-2)
    m_param = before['U1'] @ before['exp_avg'] @ before['U2'].T
    if projection == 'rotate':  # M exact, V matched by eigenvalue order
        torch.testing.assert_close(u1 @ st['exp_avg'] @ u2.T, m_param)
        torch.testing.assert_close(st['exp_avg_sq'], before['exp_avg_sq'])
    elif projection == 'project':
        torch.testing.assert_close(u1 @ st['exp_avg'] @ u2.T, m_param)
        torch.testing.assert_close(st['exp_avg_sq'].sum(),
                                   before['exp_avg_sq'].sum())
    elif projection == 'keep':
        for key in ('exp_avg', 'exp_avg_sq'):
            torch.testing.assert_close(st[key], before[key])
    else:
        assert not st['exp_avg'].any() and not st['exp_avg_sq'].any()
    assert st['step'].item() == (0 if projection == 'reset' else 7)


def test_first_basis_after_first_statistics():
    data = batches(6)
    model = tiny_net()
    opt = AdamR(model.parameters(), model=model, stat_interval=2,
                refresh_interval=100, first_basis='stat_interval')
    assert [t for t in range(250) if opt.is_basis_step(t)] == [2, 100, 200]
    run(model, opt, data[:2])
    assert 'U1' not in opt.layer_state['5']
    run(model, opt, data[2:3])  # t = 2: the second statistics, and a basis
    st = opt.layer_state['5']
    assert 'U1' in st and st['L_count'].item() == 2
    assert st['step'].item() == 1  # reset at the first basis
    default = AdamR(model.parameters(), model=model, stat_interval=2,
                    refresh_interval=100)
    assert [t for t in range(250) if default.is_basis_step(t)] == [100, 200]


def test_project_moments_properties():
    torch.manual_seed(0)
    q_old = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    q_new = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))[0]
    r_old = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    r_new = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    m, v = torch.randn(5, 3, dtype=torch.float64), torch.rand(5, 3,
                                                              dtype=torch.float64)
    m_new, v_new = m.clone(), v.clone()
    project_moments(m_new, v_new, q_new.T @ q_old, r_new.T @ r_old)
    # the first moment is the same matrix in parameter space
    torch.testing.assert_close(q_new @ m_new @ r_new.T, q_old @ m @ r_old.T)
    # the second moment stays non-negative with the same total
    assert (v_new >= 0).all()
    torch.testing.assert_close(v_new.sum(), v.sum())
    # a new basis that only permutes and flips the old one permutes V exactly
    perm = torch.eye(5, dtype=torch.float64)[[2, 0, 4, 1, 3]]
    signs = torch.tensor([1., -1., 1., -1., -1.], dtype=torch.float64)
    m_new, v_new = m.clone(), v.clone()
    project_moments(m_new, v_new, perm * signs, None)
    torch.testing.assert_close(v_new, v[[2, 0, 4, 1, 3]])
    torch.testing.assert_close(m_new, (signs[:, None] * m)[[2, 0, 4, 1, 3]])


def test_align_signs_keeps_the_basis():
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(4, 4))[0]
    flipped = q * torch.tensor([-1., 1., -1., 1.])
    torch.testing.assert_close(align_signs(flipped, q), q)
    assert (align_signs(q, None).diagonal() >= 0).all()


def _one_layer_opt(**kw):
    model = nn.Sequential(nn.Linear(4, 5, bias=False))
    opt = AdamR(model.parameters(), model=model, stat_interval=1,
                refresh_interval=1, **kw)
    return model, opt


def test_basis_of_factor_with_repeated_eigenvalues():
    _, opt = _one_layer_opt()
    torch.manual_seed(0)
    q = torch.linalg.qr(torch.randn(5, 5))[0]
    left = q @ torch.diag(torch.tensor([0., 0., 1., 1., 3.])) @ q.T  # repeated
    right = torch.zeros(4, 4)  # + eps I: a single eigenvalue of multiplicity 4
    opt.layer_state['0'] = dict(L=left, R=right)
    opt.update_preconditioners(1)
    st = opt.layer_state['0']
    for u, s in ((st['U1'], left), (st['U2'], right)):
        torch.testing.assert_close(u.T @ u, torch.eye(len(u)), rtol=0, atol=1e-5)
        d = u.T @ (s + 0.01 * torch.eye(len(s))) @ u
        torch.testing.assert_close(d, torch.diag(d.diagonal()), rtol=0,
                                   atol=1e-5)
    assert opt.fallbacks.counts['eigh_retry'] == 0
    assert opt.fallbacks.counts['eigh_failure'] == 0


def test_eigh_retry_is_counted(monkeypatch):
    _, opt = _one_layer_opt()
    real_eigh = torch.linalg.eigh
    calls = []

    def flaky_eigh(a, *args, **kwargs):
        calls.append(a.device)
        if len(calls) == 1:
            raise RuntimeError('linalg.eigh: the algorithm failed to converge')
        return real_eigh(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, 'eigh', flaky_eigh)
    torch.manual_seed(0)
    a = torch.randn(5, 8)
    opt.layer_state['0'] = dict(L=a @ a.T)
    opt.update_preconditioners(1)
    assert opt.fallbacks.counts['eigh_retry'] == 1
    u = opt.layer_state['0']['U1']
    torch.testing.assert_close(u.T @ u, torch.eye(5), rtol=0, atol=1e-5)


def test_nonfinite_factor_or_failed_eigh_keeps_previous_basis(monkeypatch):
    model, opt = _one_layer_opt()
    x = torch.randn(8, 4)
    for _ in range(2):  # statistics at steps 0, 1; basis at step 1
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    st = opt.layer_state['0']
    u1, u2 = st['U1'].clone(), st['U2'].clone()
    st['L'][0, 0] = float('nan')
    opt.update_preconditioners(2)
    assert opt.fallbacks.counts['eigh_failure'] == 1
    torch.testing.assert_close(st['U1'], u1, rtol=0, atol=0)
    assert not torch.equal(st['U2'], torch.zeros_like(u2))

    def broken_eigh(a, *args, **kwargs):
        raise RuntimeError('linalg.eigh: the algorithm failed to converge')

    st['L'] = torch.eye(5)
    monkeypatch.setattr(torch.linalg, 'eigh', broken_eigh)
    opt.update_preconditioners(3)
    assert opt.fallbacks.counts['eigh_retry'] == 2  # both sides retried
    assert opt.fallbacks.counts['eigh_failure'] == 3  # and failed: kept
    torch.testing.assert_close(st['U1'], u1, rtol=0, atol=0)
    for v in st.values():
        assert torch.isfinite(v).all()


def test_missing_statistics_do_not_count_towards_the_mean():
    _, opt = _one_layer_opt()
    opt.update_statistics({'0': BatchStatistics(xx=torch.eye(4))}, 0)
    opt.update_statistics({'0': BatchStatistics(xx=3 * torch.eye(4))}, 1)
    opt.update_statistics({'0': BatchStatistics()}, 2)  # e.g. dropped (inf)
    st = opt.layer_state['0']
    assert 'L' not in st and st['R_count'].item() == 2
    torch.testing.assert_close(st['R'], 2 * torch.eye(4))


@pytest.mark.parametrize('extra', [
    dict(), dict(moment_projection='keep'), dict(moment_projection='project'),
    dict(power_interval=2)
])
def test_resume_across_basis_change_equals_uninterrupted(extra):
    data = batches(20)
    hp = dict(lr=3e-3, weight_decay=0.1, stat_interval=2, refresh_interval=4,
              **extra)
    ref = tiny_net()
    opt_ref = AdamR(groups(ref), model=ref, **hp)
    run(ref, opt_ref, data)

    first = tiny_net()
    opt1 = AdamR(groups(first), model=first, **hp)
    run(first, opt1, data[:10])  # bases formed at steps 4, 8; next at 12
    buf = io.BytesIO()
    torch.save(dict(model=first.state_dict(), optim=opt1.state_dict()), buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    second = tiny_net(seed=123)
    second.load_state_dict(ckpt['model'])
    opt2 = AdamR(groups(second), model=second, **hp)
    opt2.load_state_dict(ckpt['optim'])
    assert opt2.steps == 10 and set(opt2.layer_state['2']) >= {'U1', 'U2'}
    run(second, opt2, data[10:])
    assert_same_params(ref, second)
    for name, st in opt_ref.layer_state.items():
        for k, v in st.items():
            torch.testing.assert_close(opt2.layer_state[name][k], v, rtol=0,
                                       atol=1e-6)


def test_grad_scaler_skipped_step_leaves_statistics_untouched():
    a, b = tiny_net(), tiny_net()
    hp = dict(lr=1e-3, stat_interval=1, refresh_interval=2)
    opt_a = AdamR(a.parameters(), model=a, **hp)
    opt_b = AdamR(b.parameters(), model=b, **hp)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0**10)
    opt_a.attach_grad_scaler(scaler)
    for i, (x, y) in enumerate(batches(5)):
        if i == 3:  # forced overflow: the scaler skips this step
            opt_a.zero_grad()
            scaler.scale(loss_of(a, x, y) * float('inf')).backward()
            scaler.step(opt_a)
            scaler.update()
            assert opt_a.steps == 3
        opt_a.zero_grad()
        scaler.scale(loss_of(a, x, y)).backward()
        scaler.step(opt_a)
        scaler.update()
        opt_b.zero_grad()
        loss_of(b, x, y).backward()
        opt_b.step()
    assert opt_a.steps == opt_b.steps == 5
    for name, st in opt_b.layer_state.items():
        assert st['L_count'].item() == opt_a.layer_state[name]['L_count'].item() == 5
        for k, v in st.items():
            assert torch.isfinite(opt_a.layer_state[name][k]).all()
            torch.testing.assert_close(opt_a.layer_state[name][k].float(),
                                       v.float(), rtol=1e-4, atol=1e-5)
    assert_same_params(a, b, atol=1e-5)


@pytest.mark.parametrize('projection', ['rotate', 'algorithm6', 'project'])
def test_loss_decreases_on_tiny_conv_net(projection):
    data = batches(1, size=32) * 30
    model = tiny_net()
    opt = AdamR(model.parameters(), model=model, lr=1e-2, weight_decay=0.01,
                stat_interval=1, refresh_interval=5, moment_projection=projection)
    first = loss_of(model, *data[0]).item()
    run(model, opt, data)
    assert loss_of(model, *data[0]).item() < 0.5 * first
    assert all('U1' in st and 'U2' in st for st in opt.layer_state.values())
    assert sum(opt.fallbacks.counts[k] for k in ('eigh_retry', 'eigh_failure')) == 0


def test_invalid_arguments_are_named():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match='moment_projection'):
        AdamR(model.parameters(), model=model, moment_projection='rot')
    with pytest.raises(ValueError, match='algorithm6'):
        AdamR(model.parameters(), model=model, moment_projection='algorithm6',
              reset_first_basis=True)
    with pytest.raises(ValueError, match='first_basis'):
        AdamR(model.parameters(), model=model, first_basis='t0')
    with pytest.raises(ValueError, match='power_interval'):
        AdamR(model.parameters(), model=model, power_interval=0)
    with pytest.raises(ValueError, match='refresh_interval'):
        AdamR(model.parameters(), model=model, refresh_interval=0)
    with pytest.raises(TypeError, match='PrecondOptimWrapperConstructor'):
        AdamR(model.parameters())

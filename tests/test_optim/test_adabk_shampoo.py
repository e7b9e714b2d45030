# Copyright (c) mmprecond contributors. All rights reserved.
"""SGDM_BK, AdamW_BK and Shampoo: the inverse-root Kronecker optimizers."""
import pytest
import torch
import torch.nn as nn
from optim_checks import assert_loss_halves, assert_resume_equals_uninterrupted
from test_nkfac import batches, groups, run, tiny_net

from mmprecond.optim import SGDM_BK, AdamW_BK, Shampoo

SGD_LIKE = [(SGDM_BK, {}), (Shampoo, {})]


@pytest.mark.parametrize('cls,kw', SGD_LIKE)
def test_without_preconditioning_is_sgd(cls, kw):
    a, b = tiny_net(), tiny_net()
    opt_a = cls(groups(a), model=a, lr=0.05, momentum=0.9, weight_decay=1e-3,
                max_factor_dim=1, stat_interval=1, refresh_interval=1, **kw)
    assert not opt_a.layers
    opt_b = torch.optim.SGD(groups(b), lr=0.05, momentum=0.9, weight_decay=1e-3)
    data = batches(6)
    run(a, opt_a, data)
    run(b, opt_b, data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_adamw_bk_without_preconditioning_is_adamw():
    a, b = tiny_net(), tiny_net()
    opt_a = AdamW_BK(groups(a), model=a, lr=1e-2, betas=(0.8, 0.99), eps=1e-7,
                     weight_decay=0.1, max_factor_dim=1)
    opt_b = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.8, 0.99), eps=1e-7,
                              weight_decay=0.1)
    data = batches(6)
    run(a, opt_a, data)
    run(b, opt_b, data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def damped_root(s, eps, power):
    s = s.double()
    vals, vecs = torch.linalg.eigh(s + eps * torch.linalg.eigvalsh(s).max()
                                   * torch.eye(len(s), dtype=s.dtype))
    return ((vecs * vals.pow(power)) @ vecs.T).float()


def linear_step_setup(seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(4, 3)
    x = torch.randn(16, 4)
    return lin, x


@pytest.mark.parametrize('cls', [SGDM_BK, AdamW_BK])
def test_adabk_one_step_matches_hand_computation(cls):
    lin, x = linear_step_setup()
    model = nn.Sequential(lin)
    alpha, eps, lr = 0.9, 1e-2, 0.1
    kw = dict(momentum=0.0) if cls is SGDM_BK else dict(weight_decay=0.0)
    opt = cls(model.parameters(), model=model, lr=lr, stat_decay=alpha,
              damping=eps, stat_interval=1, refresh_interval=1, ns_iters=40, **kw)
    w0 = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().clone()
    out = model(x)
    out.retain_grad()
    out.sin().sum().backward()
    xr = torch.cat([x, torch.ones(16, 1)], 1)
    R = (1 - alpha) * xr.T @ xr / 16          # raw statistics, EMA from 0
    L = (1 - alpha) * out.grad.T @ out.grad
    G = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
    H = damped_root(L, eps, -0.5) @ G @ damped_root(R, eps, -0.5)
    H = H * G.norm() / H.norm()
    opt.step()
    w1 = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
    if cls is SGDM_BK:
        expect = w0 - lr * H
    else:  # first Adam step: m/sqrt(v) = sign, up to eps
        expect = w0 - lr * H / (H.abs() + 1e-8)
    torch.testing.assert_close(w1, expect, rtol=0, atol=2e-4)
    assert not torch.allclose(w1, w0 - lr * G, atol=1e-3)


@pytest.mark.parametrize('grafting', ['sgd', 'none'])
def test_shampoo_one_step_matches_hand_computation(grafting):
    lin, x = linear_step_setup()
    model = nn.Sequential(lin)
    beta, eps, lr = 0.99, 1e-2, 0.1
    opt = Shampoo(model.parameters(), model=model, lr=lr, momentum=0.0,
                  stat_decay=beta, damping=eps, grafting=grafting, ns_iters=40)
    assert not any(opt.capture.sides[n] != (False, False) for n in opt.layers)
    w0 = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().clone()
    model(x).sin().sum().backward()
    G = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
    L, R = (1 - beta) * G @ G.T, (1 - beta) * G.T @ G
    H = damped_root(L, eps, -0.25) @ G @ damped_root(R, eps, -0.25)
    if grafting == 'sgd':
        H = H * G.norm() / H.norm()
    opt.step()
    w1 = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
    torch.testing.assert_close(w1, w0 - lr * H, rtol=0, atol=2e-4)


def test_bk_schedule_and_k10_from_scratch():
    model = tiny_net()
    opt = SGDM_BK(model.parameters(), model=model, stat_interval=2, refresh_interval=4)
    data = batches(9)
    run(model, opt, data[:1])
    st = opt.layer_state['5']
    first = st['L_root'].clone()
    run(model, opt, data[1:4])  # statistics at step 2, no refresh before 4
    torch.testing.assert_close(st['L_root'], first, rtol=0, atol=0)
    run(model, opt, data[4:5])  # step 4: recomputed from scratch, K = 10
    from mmprecond.inverse_root import damped_inverse_roots
    ref = damped_inverse_roots(st['L'][None], 2, 1e-5, 10)[0]
    torch.testing.assert_close(st['L_root'], ref)
    assert not torch.equal(st['L_root'], first)
    assert opt.fallbacks.counts['root_fallback'] == 0


def test_zero_factor_is_skipped_and_retried_after_new_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    nn.init.zeros_(model[2].weight)  # no output gradient reaches layer 0
    opt = SGDM_BK(model.parameters(), model=model, lr=0.1, stat_interval=2,
                  refresh_interval=100)
    x = torch.randn(8, 4)

    def step():
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()

    step()
    assert opt.fallbacks.counts['root_fallback'] == 1
    assert set(opt.layer_state['0']) == {'L', 'R', 'R_root'}
    step()  # not a statistics step: no retry
    assert opt.fallbacks.counts['root_fallback'] == 1
    step()  # step 2 folds non-zero statistics: the left root now exists
    assert 'L_root' in opt.layer_state['0']
    assert opt.fallbacks.counts['root_fallback'] == 1


CASES = [(SGDM_BK, dict(lr=0.05, weight_decay=1e-3)),
         (AdamW_BK, dict(lr=1e-3, weight_decay=0.1)),
         (Shampoo, dict(lr=0.05, weight_decay=1e-3))]


@pytest.mark.parametrize('cls,kw', CASES)
def test_resume_equals_uninterrupted(cls, kw):
    hp = dict(stat_interval=2, refresh_interval=3, **kw)
    opt = assert_resume_equals_uninterrupted(
        tiny_net, lambda m: cls(m.parameters(), model=m, **hp), run, batches(12), 7)
    assert opt.steps == 12


@pytest.mark.parametrize('cls,kw', CASES)
def test_loss_decreases(cls, kw):
    if cls is AdamW_BK:
        kw = dict(kw, lr=1e-2)
    model = tiny_net()
    opt = cls(model.parameters(), model=model, stat_interval=1, refresh_interval=5,
              **kw)
    assert_loss_halves(model, opt, *batches(1, size=32)[0])
    assert opt.fallbacks.counts['nonfinite_direction'] == 0


def test_invalid_arguments():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match='grafting'):
        Shampoo(m.parameters(), model=m, grafting='adam')
    with pytest.raises(ValueError, match='ns_iters'):
        SGDM_BK(m.parameters(), model=m, ns_iters=0)
    with pytest.raises(TypeError, match='PrecondOptimWrapperConstructor'):
        AdamW_BK(m.parameters())


def test_loads_a_checkpoint_of_the_previous_layout():
    """A checkpoint saved when roots were stored as ``'L_inv'`` / ``'R_inv'``
    (``data/sgdm_bk_previous_layout.pth``, written by the code of that time
    with ``data/make_sgdm_bk_previous_layout.py``) loads into the root keys."""
    import os
    path = os.path.join(os.path.dirname(__file__), 'data',
                        'sgdm_bk_previous_layout.pth')
    saved = torch.load(path, weights_only=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model.load_state_dict(saved['model'])
    opt = SGDM_BK(model.parameters(), model=model, lr=0.05, stat_interval=1,
                  refresh_interval=2)
    opt.load_state_dict(saved['optim'])
    old = saved['optim']['preconditioner']['layers']
    for name, st in opt.layer_state.items():
        assert not any(k.endswith('_inv') for k in st), sorted(st)
        for side in ('L', 'R'):
            assert torch.equal(st[side + '_root'], old[name][side + '_inv'])
    assert opt.fallbacks.counts.get('nonfinite_state_reset', 0) == 0
    model(torch.randn(8, 6)).pow(2).mean().backward()
    opt.step()  # step 3: no refresh, the loaded roots precondition
    assert all(torch.isfinite(p).all() for p in model.parameters())

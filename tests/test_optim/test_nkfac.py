# Copyright (c) mmprecond contributors. All rights reserved.
import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmprecond.optim import KFAC, NKFAC, AdaNKFAC


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
    decay = [p for n, p in model.named_parameters() if n.endswith('weight')]
    no_decay = [p for n, p in model.named_parameters() if n.endswith('bias')]
    return [dict(params=decay), dict(params=no_decay, weight_decay=0.0, lr=0.03)]


def run(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()


@pytest.mark.parametrize('nesterov', [False, True])
def test_nkfac_without_preconditioning_is_sgd(nesterov):
    a, b = tiny_net(), tiny_net()
    opt_a = NKFAC(groups(a), model=a, lr=0.05, momentum=0.9, weight_decay=1e-3,
                  nesterov=nesterov, max_factor_dim=1, stat_interval=1,
                  refresh_interval=1)
    assert not opt_a.layers and opt_a.fallbacks.counts['excluded_layers'] == 3
    opt_b = torch.optim.SGD(groups(b), lr=0.05, momentum=0.9, weight_decay=1e-3,
                            nesterov=nesterov)
    data = batches(10)
    run(a, opt_a, data)
    run(b, opt_b, data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)  # bitwise


def test_adankfac_without_preconditioning_is_adamw():
    a, b = tiny_net(), tiny_net()
    opt_a = AdaNKFAC(groups(a), model=a, lr=1e-2, betas=(0.8, 0.99), eps=1e-7,
                     weight_decay=0.1, max_factor_dim=1)
    opt_b = torch.optim.AdamW(groups(b), lr=1e-2, betas=(0.8, 0.99), eps=1e-7,
                              weight_decay=0.1)
    data = batches(10)
    run(a, opt_a, data)
    run(b, opt_b, data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)  # bitwise


def test_one_preconditioned_step_matches_hand_computation():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    x = torch.randn(16, 4)
    w0 = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().clone()
    out = model(x)
    out.retain_grad()
    (out.sin()).sum().backward()
    alpha, eta, lr = 0.95, 0.01, 0.1
    opt = NKFAC(model.parameters(), model=model, lr=lr, momentum=0.0,
                stat_decay=alpha, damping=eta)
    # statistics were not collected before the optimizer existed: redo
    opt.zero_grad()
    out = model(x)
    out.retain_grad()
    (out.sin()).sum().backward()
    xr = torch.cat([x, torch.ones(16, 1)], 1)
    xx = xr.T @ xr / 16
    delta = out.grad
    gg = delta.T @ delta
    R = (1 - alpha) * xx / xx.norm()
    L = (1 - alpha) * gg / gg.norm()

    def damped_inv(s):
        lam = torch.linalg.eigvalsh(s.double()).max().float()
        return torch.linalg.inv(s + max(1e-4, eta * lam) * torch.eye(len(s)))

    G = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
    H = damped_inv(L) @ G @ damped_inv(R)
    H = H * G.norm() / H.norm()
    opt.step()
    w1 = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
    # lambda_max by 10 power iterations differs slightly from eigvalsh
    torch.testing.assert_close(w1, w0 - lr * H, rtol=0, atol=2e-4)
    assert not torch.allclose(w1, w0 - lr * G, atol=1e-3)  # it did precondition


def test_schedule_exact_then_newton_and_guard():
    model = tiny_net()
    opt = NKFAC(model.parameters(), model=model, lr=0.02, stat_interval=1,
                refresh_interval=2, exact_inv_period=5)
    exact_steps = [s for s in range(25) if opt._use_exact(s) and s % 2 == 0]
    assert exact_steps == [0, 2, 4, 10, 20]
    run(model, opt, batches(14))  # Newton refreshes at steps 6, 8, 12
    assert opt.fallbacks.counts['newton_fallback'] == 0
    st = opt.layer_state['0']
    assert set(st) == {'L', 'R', 'L_inv', 'R_inv'}
    # guard: a useless warm start is replaced by the exact inverse, counted,
    # on the optimizer's own (batched, Newton) refresh path
    exact = opt._refresh_batch(st['R'][None], None, None)[0][0]
    st['R_inv'] = -10 * exact
    assert not opt._use_exact(16)
    opt.update_preconditioners(16)
    assert opt.fallbacks.counts['newton_fallback'] == 1
    torch.testing.assert_close(st['R_inv'], exact)


def test_loss_decreases_for_each_variant():
    data = batches(1, size=32) * 30
    for cls, kw in [(NKFAC, dict(lr=0.05)), (KFAC, dict(lr=0.05)),
                    (AdaNKFAC, dict(lr=2e-2, weight_decay=0.01))]:
        model = tiny_net()
        opt = cls(model.parameters(), model=model, stat_interval=1,
                  refresh_interval=5, **kw)
        first = loss_of(model, *data[0]).item()
        run(model, opt, data)
        assert loss_of(model, *data[0]).item() < 0.5 * first, cls.__name__


def test_gradient_accumulation_equals_one_big_batch():
    a, b = tiny_net(), tiny_net()
    opt_a = NKFAC(a.parameters(), model=a, lr=0.05, stat_interval=1, refresh_interval=2)
    opt_b = NKFAC(b.parameters(), model=b, lr=0.05, stat_interval=1, refresh_interval=2)
    for x, y in batches(6, size=12):
        opt_a.zero_grad()
        for xs, ys in zip(x.split(4), y.split(4)):  # 3 micro-batches
            (loss_of(a, xs, ys) / 3).backward()
        opt_a.step()
        opt_b.zero_grad()
        loss_of(b, x, y).backward()
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    for name in opt_a.layer_state:
        for k in opt_a.layer_state[name]:
            # inverses have entries ~1e2: compare relatively
            torch.testing.assert_close(opt_a.layer_state[name][k],
                                       opt_b.layer_state[name][k],
                                       rtol=1e-3, atol=1e-5)


def test_grad_scaler_skipped_step_leaves_no_trace():
    a, b = tiny_net(), tiny_net()
    opt_a = AdaNKFAC(a.parameters(), model=a, lr=1e-3, stat_interval=1,
                     refresh_interval=1)
    opt_b = AdaNKFAC(b.parameters(), model=b, lr=1e-3, stat_interval=1,
                     refresh_interval=1)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0**10)
    opt_a.attach_grad_scaler(scaler)
    data = batches(4)
    for i, (x, y) in enumerate(data):
        if i == 2:  # forced overflow: the scaler skips this step
            opt_a.zero_grad()
            scaler.scale(loss_of(a, x, y) * float('inf')).backward()
            scaler.step(opt_a)
            scaler.update()
            assert opt_a.steps == 2
        opt_a.zero_grad()
        scaler.scale(loss_of(a, x, y)).backward()
        scaler.step(opt_a)
        scaler.update()
        opt_b.zero_grad()
        loss_of(b, x, y).backward()
        opt_b.step()
    assert opt_a.steps == opt_b.steps == 4
    for name, st in opt_b.layer_state.items():
        for k, v in st.items():
            assert torch.isfinite(opt_a.layer_state[name][k]).all()
            torch.testing.assert_close(opt_a.layer_state[name][k], v,
                                       rtol=1e-4, atol=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('cls,kw', [(NKFAC, dict(lr=0.05)),
                                    (AdaNKFAC, dict(lr=1e-3, weight_decay=0.1))])
def test_resume_equals_uninterrupted(cls, kw):
    data = batches(20)
    hp = dict(stat_interval=2, refresh_interval=3, exact_inv_period=4, **kw)
    ref = tiny_net()
    opt_ref = cls(ref.parameters(), model=ref, **hp)
    run(ref, opt_ref, data)

    first = tiny_net()
    opt1 = cls(first.parameters(), model=first, **hp)
    run(first, opt1, data[:10])
    buf = io.BytesIO()
    torch.save(dict(model=first.state_dict(), optim=opt1.state_dict()), buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    second = tiny_net(seed=123)
    second.load_state_dict(ckpt['model'])
    opt2 = cls(second.parameters(), model=second, **hp)
    opt2.load_state_dict(ckpt['optim'])
    assert opt2.steps == 10
    run(second, opt2, data[10:])
    for pa, pb in zip(ref.parameters(), second.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_frozen_layer_not_hooked_and_deepcopy_safe():
    model = tiny_net()
    model[0].requires_grad_(False)
    opt = NKFAC([p for p in model.parameters() if p.requires_grad], model=model)
    assert '0' not in opt.layers and set(opt.layers) == {'2', '5'}
    twin = copy.deepcopy(model)
    loss_of(twin, *batches(1)[0]).backward()
    assert opt.capture.buffers['2'].xx is None


def test_missing_model_message_says_what_to_configure():
    with pytest.raises(TypeError, match='PrecondOptimWrapperConstructor'):
        AdaNKFAC(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match='stat_decay'):
        NKFAC(nn.Linear(2, 2).parameters(), model=nn.Linear(2, 2), stat_decay=1.0)

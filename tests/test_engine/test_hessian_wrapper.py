# Copyright (c) mmprecond contributors. All rights reserved.
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

import mmprecond  # noqa: F401  (registers)
from mmprecond.engine import HessianOptimWrapper
from mmprecond.optim import SGD_PH


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def build(model, wrapper_type, **opt):
    cfg = dict(type=wrapper_type, optimizer=dict(type='SGD_PH', lr=0.05, **opt))
    return OPTIM_WRAPPER_CONSTRUCTORS.build(
        dict(type='PrecondOptimWrapperConstructor', optim_wrapper_cfg=cfg))(model)


def data(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 6, 6, generator=g),
             torch.randint(0, 3, (4, ), generator=g))
            for _ in range(n)]


def test_update_params_equals_manual_create_graph_loop():
    a, b = net(), net()
    wrapper = build(a, 'HessianOptimWrapper', weight_decay=1e-3)
    assert isinstance(wrapper, HessianOptimWrapper)
    assert isinstance(wrapper.optimizer, SGD_PH)
    opt_b = SGD_PH(b.parameters(), model=b, lr=0.05, weight_decay=1e-3)
    for x, y in data(5):
        wrapper.update_params(F.cross_entropy(a(x), y))
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward(create_graph=True)
        opt_b.step()
    opt_a = wrapper.optimizer
    assert opt_a.steps == 5
    for p in opt_a.partial_hessian.params:
        assert opt_a.state[p]['hessian_diag'].gt(0).all()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_plain_wrapper_stops_with_instructions():
    model = net()
    wrapper = build(model, 'OptimWrapper')
    x, y = data(1)[0]
    with pytest.raises(RuntimeError, match="type='HessianOptimWrapper'"):
        wrapper.update_params(F.cross_entropy(model(x), y))


def test_other_optimizers_get_create_graph_backward():
    model = net()
    cfg = dict(type='HessianOptimWrapper', optimizer=dict(type='SGD', lr=0.1))
    wrapper = OPTIM_WRAPPER_CONSTRUCTORS.build(
        dict(type='PrecondOptimWrapperConstructor', optim_wrapper_cfg=cfg))(model)
    x, y = data(1)[0]
    wrapper.backward(F.cross_entropy(model(x), y))
    assert model[1].weight.grad.grad_fn is not None
    wrapper.step()
    wrapper.zero_grad()
    assert model[1].weight.grad is None


def build_companion(model, optimizer, **ph):
    cfg = dict(type='HessianOptimWrapper', partial_hessian=ph, optimizer=optimizer)
    return OPTIM_WRAPPER_CONSTRUCTORS.build(
        dict(type='PrecondOptimWrapperConstructor', optim_wrapper_cfg=cfg))(model)


def test_companion_scales_norm_gradients_by_hessian_diagonal():
    model = net()
    bn = model[1]
    tau, eps, mu, lr = 1e-3, 1e-4, 0.9, 0.1
    wrapper = build_companion(model, dict(type='SGD', lr=lr), tau=tau, eps=eps,
                              decay=mu)
    assert wrapper.partial_hessian.params == [bn.weight, bn.bias]
    x, y = data(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    (h_w, ) = torch.autograd.grad(grads[2], bn.weight, torch.ones_like(bn.weight))
    wrapper.update_params(F.cross_entropy(model(x), y))
    g = [gr.detach() for gr in grads]
    scale = [1, 1, tau * (1 - mu) / ((1 - mu) * h_w.abs() + eps),
             tau * (1 - mu) / eps, 1, 1]
    for p, p0, gi, s in zip(model.parameters(), before, g, scale):
        torch.testing.assert_close(p.detach(), p0 - lr * s * gi, rtol=1e-5,
                                   atol=1e-7)


def test_companion_with_nkfac_trains_and_resumes():
    import io

    from mmprecond.optim import NKFAC
    opt_cfg = dict(type='NKFAC', lr=0.05, stat_interval=1, refresh_interval=3)
    batches = data(1) * 12

    def train(wrapper, model, part):
        for x, y in part:
            wrapper.update_params(F.cross_entropy(model(x), y))

    ref = net()
    w_ref = build_companion(ref, opt_cfg)
    assert isinstance(w_ref.optimizer, NKFAC)
    assert set(w_ref.optimizer.layers) == {'0', '4'}
    losses = []
    for x, y in batches:
        loss = F.cross_entropy(ref(x), y)
        losses.append(float(loss))
        w_ref.update_params(loss)
    assert losses[-1] < 0.7 * losses[0]
    assert all(d.gt(0).all() for d in w_ref._diag)

    first = net()
    w1 = build_companion(first, opt_cfg)
    train(w1, first, batches[:7])
    buf = io.BytesIO()
    torch.save(dict(model=first.state_dict(), optim=w1.state_dict()), buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    second = net(seed=3)
    second.load_state_dict(ckpt['model'])
    w2 = build_companion(second, opt_cfg)
    w2.load_state_dict(ckpt['optim'])
    assert w2.partial_hessian.steps == 7
    train(w2, second, batches[7:])
    for pa, pb in zip(ref.parameters(), second.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_companion_rejected_on_sgd_ph():
    with pytest.raises(ValueError, match='partial_hessian'):
        build_companion(net(), dict(type='SGD_PH', lr=0.1))

# Copyright (c) mmprecond contributors. All rights reserved.
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from optim_checks import assert_loss_halves, assert_resume_equals_uninterrupted

from mmprecond.optim import SGD_PH


def norm_net(seed=0, norm='bn'):
    torch.manual_seed(seed)
    layer = (nn.BatchNorm2d(6) if norm == 'bn' else nn.GroupNorm(3, 6))
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), layer, nn.ReLU(),
                        nn.Flatten(), nn.Linear(6 * 6 * 6, 4))
    with torch.no_grad():  # non-trivial affine parameters
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.2, 0.2)
    return net


def batches(n, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 6, 6, generator=g),
             torch.randint(0, 4, (size, ), generator=g)) for _ in range(n)]


def run(model, opt, data, create_graph=True):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward(create_graph=create_graph)
        opt.step()


def test_without_channel_params_is_sgd():
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
                             nn.Linear(64, 4))
    a, b = net(), net()
    groups = [dict(params=[a[0].weight, a[3].weight]),
              dict(params=[a[0].bias, a[3].bias], weight_decay=0.0, lr=0.03)]
    opt_a = SGD_PH(groups, model=a, lr=0.05, momentum=0.9, weight_decay=1e-3)
    assert opt_a.partial_hessian.params == []
    groups_b = [dict(params=[b[0].weight, b[3].weight]),
                dict(params=[b[0].bias, b[3].bias], weight_decay=0.0, lr=0.03)]
    opt_b = torch.optim.SGD(groups_b, lr=0.05, momentum=0.9, weight_decay=1e-3)
    data = batches(8)
    run(a, opt_a, data, create_graph=False)
    run(b, opt_b, data, create_graph=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_diagonal_hessian_equals_exact_second_derivatives_on_bn_only_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(5), nn.Tanh(), nn.BatchNorm2d(5))
    for bn in (model[0], model[2]):
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 5, 3, 3)
    target = torch.randn(4, 5, 3, 3)
    params = list(model.parameters())

    def loss_of(*ps):
        out = torch.func.functional_call(
            model, {n: p for (n, _), p in zip(model.named_parameters(), ps)}, (x, ))
        return (out.sin() * target).sum()  # channel-separable, non-quadratic

    exact = torch.autograd.functional.hessian(loss_of, tuple(params))
    mu = 0.9
    opt = SGD_PH(params, model=model, lr=0.0, momentum=mu)
    assert opt.partial_hessian.params == params
    for k, p in enumerate(params):
        opt.zero_grad()
        loss_of(*params).backward(create_graph=True)
        opt.step()
        block = exact[k][k]
        diag = block.diagonal()
        # the block is exactly diagonal, so the row sums are the diagonal
        torch.testing.assert_close(block, torch.diag(diag), rtol=0, atol=1e-5)
        assert diag.abs().min() > 1e-3
        torch.testing.assert_close(opt.state[p]['hessian_diag'],
                                   (1 - mu) * diag.abs(), rtol=1e-5, atol=1e-6)
        for q in params[k + 1:]:  # not yet visited
            assert 'hessian_diag' not in opt.state[q] or not opt.state[q][
                'hessian_diag'].any()


def test_one_step_matches_hand_computation():
    model = norm_net()
    x, y = batches(1)[0]
    bn = model[1]
    lr, wd, mu, tau, eps = 0.1, 1e-2, 0.9, 1e-3, 1e-4
    opt = SGD_PH(model.parameters(), model=model, lr=lr, momentum=mu,
                 weight_decay=wd, tau=tau, eps=eps)
    assert opt.partial_hessian.params == [bn.weight, bn.bias]
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    (h_w, ) = torch.autograd.grad(grads[2], bn.weight, torch.ones(6),
                                  retain_graph=True)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward(create_graph=True)
    opt.step()
    g = [gr.detach() for gr in grads]
    bc = 1 - mu  # first visit of the round robin
    expect = [
        before[0] - lr * (g[0] + wd * before[0]),
        before[1] - lr * (g[1] + wd * before[1]),
        before[2] - lr * (tau * bc * g[2] / ((1 - mu) * h_w.abs() + eps)
                          + wd * before[2]),
        before[3] - lr * (tau * bc * g[3] / eps + wd * before[3]),  # diag still 0
        before[4] - lr * (g[4] + wd * before[4]),
        before[5] - lr * (g[5] + wd * before[5]),
    ]
    for p, e in zip(model.parameters(), expect):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)


def test_missing_create_graph_stops_with_instructions():
    model = norm_net()
    opt = SGD_PH(model.parameters(), model=model)
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="HessianOptimWrapper"):
        opt.step()
    with pytest.raises(TypeError, match='model'):
        SGD_PH(model.parameters())
    with pytest.raises(ValueError, match='tau'):
        SGD_PH(model.parameters(), model=model, tau=0.0)


def test_all_1d_scope_follows_authors_code():
    model = norm_net()
    opt = SGD_PH(model.parameters(), model=model, scope='all_1d')
    # conv bias, BN weight, BN bias; the classifier bias (last) stays first-order
    assert opt.partial_hessian.params == [model[0].bias, model[1].weight,
                                          model[1].bias]


def test_resume_equals_uninterrupted():
    hp = dict(lr=0.05, weight_decay=1e-3)
    opt = assert_resume_equals_uninterrupted(
        norm_net, lambda m: SGD_PH(m.parameters(), model=m, **hp), run, batches(9), 5)
    assert opt.steps == 9


def test_loss_decreases():
    model = norm_net()
    opt = SGD_PH(model.parameters(), model=model, lr=0.05)
    assert_loss_halves(model, opt, *batches(1, size=32)[0], create_graph=True)
    assert all(opt.state[p]['hessian_diag'].gt(0).all()
               for p in opt.partial_hessian.params)


def test_nonfinite_gradient_skips_step_on_device():
    """Issue 18: a NaN / Inf gradient entry leaves the weights, momentum
    buffers and Hessian diagonals as they were (the BN weight's Hessian turn
    included); counted, and the step reads no device value."""
    from mmprecond.profiling import DispatchCounter, counter_tensors

    model = norm_net()
    opt = SGD_PH(model.parameters(), model=model, lr=0.05, weight_decay=1e-3)
    data = batches(4)
    run(model, opt, data[:2])  # both BN tensors had their Hessian turn
    params = [p.detach().clone() for p in model.parameters()]
    state = {id(p): {k: v.clone() for k, v in opt.state[p].items()}
             for p in model.parameters()}
    x, y = data[2]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward(create_graph=True)
    with torch.no_grad():
        model[1].weight.grad[0] = float('nan')
        model[4].weight.grad[0, -1] = float('inf')
    with DispatchCounter(counter_tensors(opt)) as counter:
        opt.step()
    assert counter.host_reads == 0
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
        for k, v in state[id(p)].items():
            assert torch.equal(opt.state[p][k], v), k
    assert opt.fallbacks.counts['nonfinite_gradient_skipped'] == 1
    run(model, opt, data[3:])  # and it trains on
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())

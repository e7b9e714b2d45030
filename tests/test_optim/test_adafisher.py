# Copyright (c) mmprecond contributors. All rights reserved.
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from optim_checks import assert_loss_halves, assert_resume_equals_uninterrupted

from mmprecond.optim import AdaFisher, AdaFisherW
from mmprecond.optim.adafisher import min_max


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6),
                         nn.ReLU(inplace=True), nn.Conv2d(6, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


def batches(n, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g),
             torch.randint(0, 5, (size, ), generator=g)) for _ in range(n)]


def run(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize('cls', [AdaFisher, AdaFisherW])
def test_without_fisher_and_momentum_is_sgd(cls):
    def net():
        torch.manual_seed(0)  # grouped conv: no diagonal statistics, F = 1
        return nn.Sequential(nn.Conv2d(3, 6, 3, groups=3), nn.Flatten())
    a, b = net(), net()
    opt_a = cls(a.parameters(), model=a, lr=0.05, beta=0.0, weight_decay=1e-2,
                stat_interval=1)
    assert not opt_a.layers
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, weight_decay=1e-2)
    for x, _ in batches(6):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).sin().mean().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


@pytest.mark.parametrize('rule', ['code', 'paper'])
def test_one_step_matches_hand_computation(rule):
    torch.manual_seed(0)
    lin, bn = nn.Linear(4, 3), nn.BatchNorm1d(3)
    model = nn.Sequential(lin, bn)
    x = torch.randn(16, 4)
    lr, beta, wd, lam, gamma = 0.1, 0.9, 0.01, 1e-3, 0.8
    opt = AdaFisher(model.parameters(), model=model, lr=lr, beta=beta,
                    weight_decay=wd, damping=lam, gamma=gamma, statistics=rule)
    w0 = [p.detach().clone() for p in model.parameters()]
    z = lin(x)
    z.retain_grad()
    out = bn(z)
    out.retain_grad()
    out.sin().sum().backward()
    xr = torch.cat([x, torch.ones(16, 1)], 1)
    stats = dict(lin=(xr.pow(2).mean(0), z.grad.pow(2).mean(0)),
                 bn=(z.detach().pow(2).mean(0), out.grad.pow(2).mean(0)))

    def fold(v):
        return 0.08 + 0.008 * min_max(v) if rule == 'code' else min_max(v)

    h, s = (fold(v) for v in stats['lin'])
    f_lin = torch.outer(s, h) + lam
    hb, sb = (fold(v) for v in stats['bn'])
    fishers = [f_lin[:, :-1], f_lin[:, -1], sb * hb + lam, sb + lam]
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    for p, p0, g, f in zip(model.parameters(), w0, grads, fishers):
        m = (1 - beta) * (g + wd * p0)
        torch.testing.assert_close(p.detach(), p0 - lr / (1 - beta) * m / f,
                                   rtol=1e-5, atol=1e-6)


def test_code_rule_fisher_collapses_to_damping_paper_rule_does_not():
    data = batches(1, size=16) * 40
    fisher = {}
    for rule in ('code', 'paper'):
        model = tiny_net()
        opt = AdaFisher(model.parameters(), model=model, lr=1e-4,
                        stat_interval=1, statistics=rule)
        run(model, opt, data)
        f = opt._fisher[model[0].weight]
        fisher[rule] = (float(f.min()), float(f.max()))
    lam = 1e-3
    # code: F within [lambda, lambda + (0.008 / 0.92)^2 (1 + transient)]
    assert lam <= fisher['code'][0] and fisher['code'][1] < 1.1 * lam
    # paper: the normalised factors reach 1, so F spans [lambda, 1 + lambda]
    assert abs(fisher['paper'][0] - lam) < 1e-6
    assert fisher['paper'][1] > 0.5


@pytest.mark.parametrize('cls', [AdaFisher, AdaFisherW])
def test_resume_equals_uninterrupted(cls):
    hp = dict(lr=1e-3, weight_decay=1e-2, stat_interval=3)
    opt = assert_resume_equals_uninterrupted(
        tiny_net, lambda m: cls(m.parameters(), model=m, **hp), run, batches(10), 5)
    assert opt.steps == 10 and set(opt.layer_state) == {'0', '1', '3', '6'}


@pytest.mark.parametrize('rule,lr', [('code', 1e-3), ('paper', 1e-3)])
def test_loss_decreases(rule, lr):
    model = tiny_net()
    opt = AdaFisherW(model.parameters(), model=model, lr=lr, stat_interval=5,
                     statistics=rule)
    assert_loss_halves(model, opt, *batches(1, size=32)[0])


def test_invalid_arguments():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match='statistics'):
        AdaFisher(m.parameters(), model=m, statistics='both')
    with pytest.raises(TypeError, match='PrecondOptimWrapperConstructor'):
        AdaFisher(m.parameters())


@pytest.mark.parametrize('cls', [AdaFisher, AdaFisherW])
def test_nonfinite_gradient_skips_step_on_device(cls):
    """Issue 18: a NaN / Inf gradient entry on a statistics step leaves the
    weights, the momentum and the Fisher diagonals as they were; counted,
    and the step reads no device value."""
    from mmprecond.profiling import DispatchCounter, counter_tensors

    model = tiny_net()
    opt = cls(model.parameters(), model=model, lr=1e-3, weight_decay=0.1,
              stat_interval=1)
    data = batches(4)
    run(model, opt, data[:3])
    before = {k: v.clone() for k, v in _tensors(opt.state_dict()).items()}
    params = [p.detach().clone() for p in model.parameters()]
    x, y = data[3]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    model[3].weight.grad.view(-1)[0] = float('nan')
    model[6].bias.grad[-1] = float('inf')
    with DispatchCounter(counter_tensors(opt)) as counter:
        opt.step()
    assert counter.host_reads == 0
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = _tensors(opt.state_dict())
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert opt.fallbacks.counts['nonfinite_gradient_skipped'] == 1
    run(model, opt, data[:1])  # and it trains on
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _tensors(obj, prefix=''):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items()
                for k, v in _tensors(val, f'{prefix}/{key}').items()}
    return {}

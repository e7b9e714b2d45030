# Copyright (c) mmprecond contributors. All rights reserved.
"""TNT / TNT-EF against their definitions and on real small models."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from small_cnn import quadrant_task, small_cnn

from mmprecond.optim import TNT, TNT_EF
from mmprecond.optim.tnt import mode_gram, tensor_modes, trace_equalized


def _train(model, opt, x, y, start, stop, batch=16):
    losses = []
    for it in range(start, stop):
        sl = slice((it * batch) % len(x), (it * batch) % len(x) + batch)
        loss = F.cross_entropy(model(x[sl]), y[sl])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_factors_equal_definition_and_trace_equalisation():
    """mat_i(G) mat_i(G)^T against an einsum of the definition; Eq. 4.10:
    equal average eigenvalue over modes and Kronecker trace = ||G||^2."""
    gen = torch.Generator().manual_seed(0)
    assert tensor_modes((4, 3, 2, 2)) == (4, 3, 4)
    g = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64)
    defs = [torch.einsum('ajk,bjk->ab', g, g), torch.einsum('iak,ibk->ab', g, g),
            torch.einsum('ija,ijb->ab', g, g)]
    grams = {i: mode_gram(g, i).double() for i in range(3)}
    for i in range(3):
        torch.testing.assert_close(grams[i], defs[i], rtol=1e-5, atol=1e-5)
    sq = g.pow(2).sum()
    for i in range(3):  # tr(E[G^(i)]) = ||G||^2 for every i
        torch.testing.assert_close(torch.trace(grams[i]), sq, rtol=1e-5, atol=1e-5)
    us = trace_equalized(grams, sq, (4, 3, 5))
    avg = [float(torch.trace(us[i])) / d for i, d in enumerate((4, 3, 5))]
    assert max(avg) - min(avg) < 1e-9 * max(avg)
    kron = torch.kron(torch.kron(us[0], us[1]), us[2])
    torch.testing.assert_close(torch.trace(kron), sq)
    # each factor is proportional to its Gram matrix
    for i in range(3):
        ratio = us[i] / grams[i]
        assert float(ratio.max() - ratio.min()) < 1e-9 * float(ratio.abs().max())
    # a dropped (identity) mode keeps the Kronecker trace
    us2 = trace_equalized({0: grams[0], 2: grams[2]}, sq, (4, 3, 5))
    kron2 = torch.kron(torch.kron(us2[0], torch.eye(3, dtype=torch.float64)), us2[2])
    torch.testing.assert_close(torch.trace(kron2), sq)


def test_direction_equals_explicit_kronecker_inverse():
    """One TNT-EF step on a conv: W -= lr (Q1 (x) Q2 (x) Q3) vec(grad) with
    Q_i = (U~_i + eps I)^-1 formed explicitly (row-major vec)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 2, bias=False)
    w0 = conv.weight.detach().clone()
    lr, eps = 0.1, 0.05
    opt = TNT_EF(conv.parameters(), lr=lr, damping=eps, stat_interval=1,
                 refresh_interval=1, max_step_ratio=0)  # the unclipped step
    conv(torch.randn(5, 3, 4, 4)).pow(2).mean().backward()
    g = conv.weight.grad.detach().clone().reshape(4, 3, 4).double()
    opt.step()
    grams = {i: mode_gram(g, i).double() for i in range(3)}
    us = trace_equalized(grams, g.pow(2).sum(), (4, 3, 4))
    qs = [torch.linalg.inv(us[i] + eps * torch.eye(u.shape[0], dtype=torch.float64))
          for i, u in us.items()]
    direction = torch.kron(torch.kron(qs[0], qs[1]), qs[2]) @ g.reshape(-1)
    expected = w0.double().reshape(-1) - lr * direction
    torch.testing.assert_close(conv.weight.detach().double().reshape(-1), expected,
                               rtol=1e-4, atol=1e-6)


def test_degenerate_equals_sgd_momentum():
    """No factor formed (max_factor_dim=1) and no decay: torch SGD(lr, mu)
    step for step, BN and biases included."""
    x, y = quadrant_task()
    ref = small_cnn()
    model = copy.deepcopy(ref)
    opt = TNT(model.parameters(), model=model, lr=0.05, momentum=0.9,
              max_factor_dim=1, logits_module='7', stat_interval=1,
              refresh_interval=1)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, x, y, 0, 6)
    _train(ref, sgd, x, y, 0, 6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_sampled_gradient_is_extra_backward_and_main_grad_untouched():
    """G-bar from the logits hook equals the gradient of the cross-entropy of
    labels drawn from the softmax (same RNG), and the parameter .grad of the
    main backward is the plain one."""
    x, y = quadrant_task(n=16)
    model = small_cnn()
    ref = copy.deepcopy(model)
    opt = TNT(model.parameters(), model=model, logits_module='7')
    gen = torch.Generator().manual_seed(opt.draw_seed(0, 0))  # TNT's draw
    loss = F.cross_entropy(model(x), y)
    sampled = {id(p): g.clone() for p, g in opt.sampled_grads.items()}
    loss.backward()
    logits = ref(x)
    labels = torch.multinomial(torch.softmax(logits.detach(), 1), 1,
                               generator=gen).squeeze(1)
    exp = torch.autograd.grad(F.cross_entropy(logits, labels), list(ref.parameters()),
                              retain_graph=True)
    F.cross_entropy(logits, y).backward()
    for p, q, e in zip(model.parameters(), ref.parameters(), exp):
        torch.testing.assert_close(sampled[id(p)], e)
        torch.testing.assert_close(p.grad, q.grad)


def test_tnt_and_tnt_ef_train_small_cnn():
    x, y = quadrant_task()
    for cls, kw in ((TNT, dict(logits_module='7')), (TNT_EF, {})):
        model = small_cnn()
        opt = cls(model.parameters(), model=model, lr=0.003, damping=0.1,
                  stat_interval=2, refresh_interval=4, warm_start_iters=2, **kw)
        losses = _train(model, opt, x, y, 0, 40)
        first, last = sum(losses[2:6]) / 4, sum(losses[-4:]) / 4
        assert last < 0.3 * first, (cls.__name__, first, last)
        assert opt.fallbacks.counts['inverse_failed'] == 0
        assert all('Q0' in opt.state[p] for p in model.parameters())


def test_warm_start_holds_parameters():
    x, y = quadrant_task()
    model = small_cnn()
    before = copy.deepcopy(model.state_dict())
    opt = TNT(model.parameters(), model=model, logits_module='7',
              warm_start_iters=3, stat_interval=5, refresh_interval=7)
    model.eval()  # BN running stats aside: parameters must not move
    _train(model, opt, x, y, 0, 3)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])
    st = opt.state[model[7].weight]
    assert st.get('stat_count', 0) == 0 and 'Q0' not in st  # eval: no sampling
    model.train()
    opt2 = TNT(model.parameters(), model=model, logits_module='7',
               warm_start_iters=3, stat_interval=5, refresh_interval=7)
    _train(model, opt2, x, y, 0, 3)
    st = opt2.state[model[7].weight]
    assert st['stat_count'] == 3 and 'Q0' in st
    assert torch.equal(model[7].weight, before['7.weight'])


def test_resume_equals_uninterrupted():
    x, y = quadrant_task()
    kw = dict(lr=0.01, damping=0.1, stat_interval=2, refresh_interval=3,
              warm_start_iters=1, weight_decay=0.01, logits_module='7')
    full = small_cnn()
    opt = TNT(full.parameters(), model=full, **kw)
    torch.manual_seed(3)
    _train(full, opt, x, y, 0, 8)
    first = small_cnn()
    opt1 = TNT(first.parameters(), model=first, **kw)
    torch.manual_seed(3)
    _train(first, opt1, x, y, 0, 4)
    rng = torch.get_rng_state()
    sd_model = copy.deepcopy(first.state_dict())
    sd_opt = copy.deepcopy(opt1.state_dict())
    resumed = small_cnn(seed=9)
    resumed.load_state_dict(sd_model)
    opt2 = TNT(resumed.parameters(), model=resumed, **kw)
    opt2.load_state_dict(sd_opt)
    torch.set_rng_state(rng)
    _train(resumed, opt2, x, y, 4, 8)
    for p, q in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q)
    assert bool(torch.isfinite(full[7].weight).all())


class _TwoHeads(nn.Module):
    """Linear 8->16, ReLU, two Linear 16->4 heads whose outputs are summed."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.a = nn.Linear(16, 4)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        h = self.body(x)
        return self.a(h) + self.b(h)


def _square_loss_run(make, steps=30):
    torch.manual_seed(0)
    model = _TwoHeads()
    x = torch.randn(32, 8)
    opt = make(model)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


@pytest.mark.parametrize('cls', [TNT, TNT_EF])
def test_vanishing_fisher_does_not_blow_up(cls):
    """Issue 18: at lr=1e-2 (the thesis uses 1e-4) the empirical Fisher of a
    square loss is far below the damping, the damped inverse amplifies the
    step by up to damping^-2 = 1e4 and the loss went 0.11 -> inf -> NaN in
    6 steps.  The step clip holds it: the loss falls as SGD's does."""
    kw = dict(model=None, logits_module='a') if cls is TNT else {}

    def make(model):
        if cls is TNT:
            kw['model'] = model
        return cls(model.parameters(), lr=1e-2, **kw)

    model, opt, losses = _square_loss_run(make)
    _, _, sgd = _square_loss_run(
        lambda m: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9))
    assert all(map(math.isfinite, losses)), losses
    assert losses[-1] < 0.15 * losses[0], losses[::5]
    assert losses[-1] < sgd[-1], (losses[-1], sgd[-1])  # SGD ends at 0.11x
    for p in model.parameters():
        assert bool(torch.isfinite(p).all())
        assert all(bool(torch.isfinite(v).all()) for v in opt.state[p].values()
                   if isinstance(v, torch.Tensor))
    assert opt.fallbacks.counts.get('nonfinite_step', 0) == 0


def test_clip_leaves_thesis_learning_rate_alone():
    """At the thesis' lr=1e-4 the clip never binds on that problem: the run
    is the unclipped one, bit for bit."""
    runs = [_square_loss_run(lambda m, r=r: TNT_EF(m.parameters(), lr=1e-4,
                                                   max_step_ratio=r))
            for r in (0.1, 0.0)]
    for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()):
        assert torch.equal(p, q)


def test_nonfinite_gradient_skips_step_on_device():
    """A NaN / Inf gradient entry: parameters, momentum and statistics stay
    as they were, the skip and the unfolded statistic are counted, and the
    step reads no device value."""
    from mmprecond.profiling import DispatchCounter, counter_tensors

    torch.manual_seed(0)
    model = _TwoHeads()
    x = torch.randn(32, 8)
    opt = TNT_EF(model.parameters(), lr=1e-2, stat_interval=1, refresh_interval=2)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    before = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    model.a.weight.grad[0, 0] = float('nan')
    model.b.bias.grad[-1] = float('inf')
    with DispatchCounter(counter_tensors(opt)) as counter:
        opt.step()  # step 3: statistics, no refresh
    assert counter.host_reads == 0
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = opt.state_dict()
    for i, st in before['state'].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(after['state'][i][k], v), (i, k)
    assert opt.fallbacks.counts['nonfinite_step'] == 1
    assert opt.fallbacks.counts['nonfinite_statistics'] == 2  # a.weight, b.bias

# Copyright (c) mmprecond contributors. All rights reserved.
"""K-BFGS / K-BFGS(L) on real small models."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from small_cnn import quadrant_task, small_cnn

from mmprecond.curvature.capture import input_rows_gram
from mmprecond.optim import KBFGS, KBFGS_L
from mmprecond.optim.bfgs_updates import bfgs_update


def _train(model, opt, x, y, steps, batch=16):
    losses = []
    for it in range(steps):
        sl = slice((it * batch) % len(x), (it * batch) % len(x) + batch)
        xb, yb = x[sl], y[sl]

        def closure(xb=xb, yb=yb):
            return F.cross_entropy(model(xb), yb)

        loss = closure()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if getattr(opt, 'needs_second_pass', False):
            opt.second_pass(closure)
        losses.append(loss.item())
    return losses


def test_degenerate_equals_sgd_momentum():
    """No warm start, no decay, fewer steps than T: every parameter (conv,
    BN, linear) moves like torch SGD(lr / damping, momentum)."""
    x, y = quadrant_task()
    ref = small_cnn()
    model = copy.deepcopy(ref)
    lr, damping = 0.5, 4.0
    opt = KBFGS(model.parameters(), model=model, lr=lr, damping=damping,
                momentum=0.9, curvature_interval=100)
    sgd = torch.optim.SGD(ref.parameters(), lr=lr / damping, momentum=0.9)
    _train(model, opt, x, y, 6)
    _train(ref, sgd, x, y, 6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('cls', [KBFGS, KBFGS_L])
def test_every_layer_excluded_is_sgd_past_curvature_steps(cls):
    """max_factor_dim=1 leaves no layer to precondition: the curvature
    steps (every 2nd here) ask for no second pass and do nothing, and with
    damping 1 and no decay every step is torch SGD(lr, momentum) bit for
    bit (issue 18: the second pass called autograd.grad with no inputs)."""
    x, y = quadrant_task()
    ref = small_cnn()
    model = copy.deepcopy(ref)
    opt = cls(model.parameters(), model=model, lr=0.05, damping=1.0,
              momentum=0.9, curvature_interval=2, max_factor_dim=1)
    assert opt.layers == {}
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, x, y, 6)
    _train(ref, sgd, x, y, 6)
    assert not opt.needs_second_pass
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_h_a_update_is_hessian_action_bfgs():
    """After a curvature step on one Linear layer, H_A equals the BFGS
    update with s = H_A a-bar, y = (A~ + lambda_A I) s, A~ the minibatch
    factor formed explicitly."""
    torch.manual_seed(0)
    layer = nn.Linear(5, 3)
    x = torch.randn(12, 5)
    t = torch.randn(12, 3)
    damping = 0.25
    opt = KBFGS(layer.parameters(), model=layer, lr=0.1, damping=damping,
                curvature_interval=1)
    lam_a = math.sqrt(damping)
    h_a = torch.eye(6) / lam_a
    gram, rows = input_rows_gram(layer, x)
    a_bar = gram[-1] / rows
    s = h_a @ a_bar
    y_a = gram @ s / rows + lam_a * s
    expected = bfgs_update(h_a, s, y_a)

    def closure():
        return ((layer(x) - t)**2).mean()

    closure().backward()
    opt.step()
    torch.testing.assert_close(opt.layer_state[''] ['H_A'], expected)
    with pytest.raises(RuntimeError, match='SecondPassHook'):
        opt.step()
    opt.second_pass(closure)
    # H_G moved away from its initial lambda_G^-1 I and stays symmetric PD
    h_g = opt.layer_state['']['H_G']
    assert not torch.allclose(h_g, torch.eye(3) / lam_a)
    torch.testing.assert_close(h_g, h_g.T)
    assert bool(torch.linalg.eigvalsh(h_g).min() > 0)


def test_warm_start_forms_exact_inverse_and_does_not_move():
    """warm_start_iters=2: two statistics-only steps (parameters fixed), then
    H_A = (A + lambda_A I)^-1 with A = E_n[sum_t a_t a_t^T] of both
    batches; lambda_A = sqrt(|T|) sqrt(lambda) for the conv."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    before = copy.deepcopy(conv.state_dict())
    damping = 0.5
    opt = KBFGS(conv.parameters(), model=conv, lr=1.0, damping=damping,
                warm_start_iters=2)
    xs = [torch.randn(4, 2, 5, 5) for _ in range(2)]
    grams = []
    for x in xs:
        conv(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        gram, _ = input_rows_gram(conv, x)
        grams.append(gram / x.shape[0])
    for k, v in conv.state_dict().items():
        torch.testing.assert_close(v, before[k])
    lam_a = math.sqrt(25) * math.sqrt(damping)
    A = (grams[0] + grams[1]) / 2
    expected = torch.linalg.inv(A.double() + lam_a * torch.eye(19, dtype=torch.float64))
    torch.testing.assert_close(opt.layer_state['']['H_A'].double(), expected,
                               rtol=1e-4, atol=1e-6)
    # the first real step now moves the weights
    conv(xs[0]).pow(2).mean().backward()
    opt.step()
    assert not torch.equal(conv.weight, before['weight'])


@pytest.mark.parametrize('cls', [KBFGS, KBFGS_L])
def test_trains_small_cnn(cls):
    """A real small classifier: the loss falls with curvature updates every
    2 steps (H_A, H_G updated), and H matrices stay finite."""
    x, y = quadrant_task(n=64)
    model = small_cnn()
    kwargs = dict(history=5) if cls is KBFGS_L else {}
    opt = cls(model.parameters(), model=model, lr=0.3, damping=3.0,
              curvature_interval=2, **kwargs)
    losses = _train(model, opt, x, y, 40)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.4 * first, (first, last)
    for st in opt.layer_state.values():
        for v in st.values():
            assert bool(torch.isfinite(v.float()).all())
    if cls is KBFGS_L:
        assert all(lb.count == 5 for lb in opt._lbfgs.values())


@pytest.mark.parametrize('cls', [KBFGS, KBFGS_L])
def test_resume_equals_uninterrupted(cls):
    x, y = quadrant_task(n=64)
    kwargs = dict(lr=0.3, damping=0.3, curvature_interval=2, warm_start_iters=1)
    if cls is KBFGS_L:
        kwargs['history'] = 3
    full = small_cnn()
    opt = cls(full.parameters(), model=full, **kwargs)
    _train(full, opt, x, y, 9)

    first = small_cnn()
    opt1 = cls(first.parameters(), model=first, **kwargs)
    _train(first, opt1, x, y, 5)
    sd_model = copy.deepcopy(first.state_dict())
    sd_opt = copy.deepcopy(opt1.state_dict())
    resumed = small_cnn(seed=5)
    resumed.load_state_dict(sd_model)
    opt2 = cls(resumed.parameters(), model=resumed, **kwargs)
    opt2.load_state_dict(sd_opt)
    for it in range(5, 9):
        sl = slice((it * 16) % 64, (it * 16) % 64 + 16)
        xb, yb = x[sl], y[sl]

        def closure(xb=xb, yb=yb):
            return F.cross_entropy(resumed(xb), yb)

        closure().backward()
        opt2.step()
        opt2.zero_grad()
        if opt2.needs_second_pass:
            opt2.second_pass(closure)
    for p, q in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q)


def test_skipped_step_drops_first_pass():
    """A curvature-step forward/backward whose step() is skipped (AMP
    overflow) must not leak into the next step's secant pair."""
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    opt = KBFGS(layer.parameters(), model=layer, lr=0.1, curvature_interval=1)
    x = torch.randn(8, 4)
    layer(x).sum().backward()
    assert opt.secant.records['']
    opt.zero_grad()  # the step was skipped
    assert not opt.secant.records
    out = layer(x)
    opt.zero_grad()  # between forward and backward: inputs are kept
    assert opt.secant.records[''].inputs
    out.sum().backward()
    opt.step()
    assert opt.needs_second_pass


def test_kbfgs_l_equals_kbfgs_until_history_is_full():
    """With fewer curvature updates than stored pairs, the compact L-BFGS
    H_G is the dense BFGS H_G (same H0 = lambda_G^-1 I): K-BFGS(L) and
    K-BFGS train identically; with 1 pair they differ.  (Without BatchNorm:
    a conv followed by BN has y_G = 0 up to round-off, so its pairs are
    noise and two runs that differ by rounding drift apart.)"""
    x, y = quadrant_task(n=64)
    runs = {}
    for key, cls, kw in (('dense', KBFGS, {}), ('lbfgs', KBFGS_L, dict(history=10)),
                         ('short', KBFGS_L, dict(history=1))):
        model = small_cnn(bn=False)
        opt = cls(model.parameters(), model=model, lr=0.3, damping=1.0,
                  curvature_interval=2, **kw)
        _train(model, opt, x, y, 12)
        runs[key] = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(runs['lbfgs'], runs['dense'], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(runs['short'], runs['dense'], rtol=1e-3, atol=1e-4)

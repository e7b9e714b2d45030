# Copyright (c) mmprecond contributors. All rights reserved.
"""NaN/Inf and singular factors, for every preconditioned optimizer.

Properties: by default a non-finite gradient entry (injected directly, or
produced by a NaN activation) is zeroed on the device, so weights and state
stay finite with no host read; with ``skip_nonfinite_steps=True`` such a step
leaves weights, optimizer state and step counter exactly as they were, so
training continues as if that batch had not been seen; a non-finite factor
is dropped and the layer restarts, never reaching the weights; a
singular factor (dead ReLU channel, constant input, a layer that saw no
rows) still gives a finite update.
"""
import copy
import io

import pytest
import torch
import torch.nn as nn
from test_afopt import TinyTransformer, seq_batches
from test_nkfac import batches, run, tiny_net

from mmprecond.optim import (
    FSGD,
    KFAC,
    NKFAC,
    SGDM_BK,
    Ada_AFOpt,
    AdamR,
    AdamW_BK,
    AdaNKFAC,
    AFOpt,
    FAdam,
    Shampoo,
)

CNN = dict(make=tiny_net, data=batches)
SEQ = dict(make=TinyTransformer, data=seq_batches)
HP = dict(stat_interval=1)
CASES = [
    pytest.param(NKFAC, CNN, dict(HP, refresh_interval=2, lr=0.05), id='NKFAC'),
    pytest.param(AdaNKFAC, CNN, dict(HP, refresh_interval=2, lr=1e-3), id='AdaNKFAC'),
    pytest.param(KFAC, CNN, dict(HP, refresh_interval=2, lr=0.05), id='KFAC'),
    pytest.param(AdamR, CNN, dict(HP, refresh_interval=2, lr=1e-3), id='AdamR'),
    pytest.param(FSGD, CNN, dict(HP, refresh_interval=2, lr=0.05,
                                 precondition_convs=True), id='FSGD'),
    pytest.param(FAdam, CNN, dict(HP, refresh_interval=2, lr=1e-3,
                                  precondition_convs=True), id='FAdam'),
    pytest.param(AFOpt, SEQ, dict(HP, refresh_interval=2, lr=0.05), id='AFOpt'),
    pytest.param(Ada_AFOpt, SEQ, dict(HP, refresh_interval=2, lr=1e-2), id='Ada_AFOpt'),
    pytest.param(SGDM_BK, CNN, dict(HP, refresh_interval=2, lr=0.05), id='SGDM_BK'),
    pytest.param(AdamW_BK, CNN, dict(HP, refresh_interval=2, lr=1e-3), id='AdamW_BK'),
    pytest.param(Shampoo, CNN, dict(HP, refresh_interval=2, lr=0.05), id='Shampoo'),
]


def flat_state(opt):
    """Every tensor of the optimizer's state_dict, by path."""
    out = {}

    def walk(prefix, obj):
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj.detach().clone()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f'{prefix}/{k}', v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f'{prefix}/{i}', v)

    sd = opt.state_dict()
    sd['preconditioner'].pop('phase_seconds', None)
    walk('', sd)
    return out


def assert_all_finite(model, opt):
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    for path, t in flat_state(opt).items():
        if t.is_floating_point():
            assert torch.isfinite(t).all(), path


def one_bad_step(model, opt, x, y, where):
    """One step with a non-finite gradient entry (``grad_nan`` /
    ``grad_inf``) or a NaN in the first layer's output (``activation``)."""
    first_param = next(model.parameters())
    handle = None
    if where == 'activation':
        first = next(m for m in model.modules()
                     if isinstance(m, (nn.Linear, nn.Conv2d)))
        handle = first.register_forward_hook(
            lambda m, i, out: out.index_fill(0, torch.tensor([0]),
                                             float('nan')))
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    if where == 'grad_nan':
        first_param.grad.view(-1)[0] = float('nan')
    elif where == 'grad_inf':
        first_param.grad.view(-1)[-1] = float('inf')
    opt.step()
    if handle is not None:
        handle.remove()


@pytest.mark.parametrize('cls,setup,hp', CASES)
@pytest.mark.parametrize('where', ['grad_nan', 'grad_inf', 'activation'])
def test_nonfinite_step_is_skipped_exactly(cls, setup, hp, where):
    hp = dict(hp, skip_nonfinite_steps=True)
    data = setup['data'](6)
    ref = setup['make']()
    run(ref, cls(ref.parameters(), model=ref, **hp), data[:3] + data[4:])

    model = setup['make']()
    opt = cls(model.parameters(), model=model, **hp)
    run(model, opt, data[:3])
    before_params = copy.deepcopy(model.state_dict())
    before_state = flat_state(opt)
    one_bad_step(model, opt, *data[3], where)
    assert opt.fallbacks.counts['nonfinite_gradient_skipped'] == 1
    assert opt.steps == 3
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before_params[k], rtol=0, atol=0)
    after_state = flat_state(opt)
    assert after_state.keys() == before_state.keys()
    for k, v in after_state.items():
        torch.testing.assert_close(v, before_state[k], rtol=0, atol=0,
                                   equal_nan=False, msg=k)
    run(model, opt, data[4:])
    for pa, pb in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize('cls,setup,hp', CASES)
@pytest.mark.parametrize('where', ['grad_nan', 'grad_inf', 'activation'])
def test_nonfinite_gradient_entries_are_zeroed_by_default(cls, setup, hp, where):
    data = setup['data'](6)
    model = setup['make']()
    opt = cls(model.parameters(), model=model, **hp)
    run(model, opt, data[:3])
    one_bad_step(model, opt, *data[3], where)
    assert opt.steps == 4  # the step was taken, with finite values only
    assert_all_finite(model, opt)
    assert opt.fallbacks.counts['nonfinite_gradient_zeroed'] >= 1
    assert 'nonfinite_gradient_skipped' not in opt.fallbacks.counts
    run(model, opt, data[4:])
    assert_all_finite(model, opt)


@pytest.mark.parametrize('cls,setup,hp', CASES)
@pytest.mark.parametrize('via', ['memory', 'checkpoint'])
def test_nonfinite_factor_is_dropped_not_used(cls, setup, hp, via):
    if via == 'memory':  # checked on statistics steps only when opted in
        hp = dict(hp, skip_nonfinite_steps=True)
    data = setup['data'](8)
    model = setup['make']()
    opt = cls(model.parameters(), model=model, **hp)
    run(model, opt, data[:3])
    name = next(iter(opt.layer_state))
    key = next(k for k, v in opt.layer_state[name].items()
               if not k.endswith(('_inv', '_root')) and v.dim() == 2)
    if via == 'memory':
        opt.layer_state[name][key][0, 0] = float('nan')
    else:
        sd = opt.state_dict()
        # the first entry, whole or packed (upper triangle, 1-D)
        sd['preconditioner']['layers'][name][key].view(-1)[0] = float('inf')
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        opt = cls(model.parameters(), model=model, **hp)
        opt.load_state_dict(torch.load(buf, weights_only=True))
        assert name not in opt.layer_state  # dropped at load
    run(model, opt, data[3:])
    assert opt.fallbacks.counts['nonfinite_state_reset'] == 1
    assert name in opt.layer_state  # restarted from new statistics
    assert_all_finite(model, opt)


def dead_channel_cnn(seed=0):
    model = tiny_net(seed)
    with torch.no_grad():  # conv channel 0 never fires: a zero row in R
        model[0].weight[0].zero_()
        model[0].bias[0] = -1.0
    return model


@pytest.mark.parametrize('cls,setup,hp', CASES)
@pytest.mark.parametrize('case', ['dead_relu', 'constant_input', 'no_rows'])
def test_singular_factors_give_finite_updates(cls, setup, hp, case):
    make, data = setup['make'], setup['data'](4)
    if case == 'dead_relu' and setup is CNN:
        make = dead_channel_cnn
    if case == 'constant_input':  # every row the same: rank-1 input factor
        data = [(torch.ones_like(x), y) for x, y in data]
    model = make()
    opt = cls(model.parameters(), model=model, **hp)
    before = [p.detach().clone() for p in model.parameters()]
    if case == 'no_rows':  # an empty batch first (a RoI head with no RoIs)
        x, y = data[0]
        opt.zero_grad()
        model(x[:0]).sum().backward()
        opt.step()
    run(model, opt, data)
    assert_all_finite(model, opt)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    for kind in ('nonfinite_direction', 'nonfinite_state_reset',
                 'nonfinite_gradient_skipped'):
        assert opt.fallbacks.counts[kind] == 0, kind
    if case == 'dead_relu' and setup is CNN and cls not in (FSGD, FAdam):
        # the factor that saw the dead channel is singular, yet was inverted
        st = opt.layer_state['2']
        r = st['R']
        assert torch.linalg.matrix_rank(r) < r.shape[0]

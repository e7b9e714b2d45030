# Copyright (c) mmprecond contributors. All rights reserved.
"""Plain and statistics steps read no device value and launch few kernels.

On a GPU a host read of a device value (``.item()``, ``bool(t)``, an error
check of ``torch.linalg``) stalls the launch queue.  The CPU tests count
those reads with a dispatch mode (:class:`~mmprecond.profiling.
DispatchCounter`), leaving out only the 0-dim CPU step counters that
``torch.optim`` itself keeps; the CUDA test asks torch to raise on any
synchronisation.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmprecond.optim import (
    FSGD,
    KFAC,
    NKFAC,
    Ada_AFOpt,
    AdamR,
    AdaNKFAC,
    AFOpt,
    FAdam,
)
from mmprecond.profiling import DispatchCounter, counter_tensors

STAT, INV = 2, 4
OPTIMS = {
    'NKFAC': (NKFAC, dict(lr=0.02), 'sgd'),
    'KFAC': (KFAC, dict(lr=0.02), 'sgd'),
    'AdaNKFAC': (AdaNKFAC, dict(lr=1e-3, weight_decay=0.05), 'adamw'),
    'FSGD': (FSGD, dict(lr=0.02, precondition_convs=True), 'sgd'),
    'FAdam': (FAdam, dict(lr=1e-3, precondition_convs=True), 'adamw'),
    'AFOpt': (AFOpt, dict(lr=0.02, precondition_convs=True), 'sgd'),
    'Ada_AFOpt': (Ada_AFOpt, dict(lr=1e-3, precondition_convs=True), 'adamw'),
    'AdamR': (AdamR, dict(lr=1e-3), 'adamw'),
}
#: Extra aten ops a plain / statistics step may dispatch per preconditioned
#: block (layer, or attention Q / K / V block) beyond torch's foreach step.
OPS_PER_BLOCK = 15
#: Plus one per parameter: the in-place ``nan_to_num_`` that keeps a
#: non-finite gradient entry out of the weights and state without a host
#: read (``PrecondOptimizer._gradients_finite``).
OPS_PER_PARAM = 1
#: and its fixed part: one ``_foreach_norm``, ``stack``, ``isfinite``,
#: ``logical_not_`` and the device counter's ``add_``.
GUARD_OPS = 5


class Net(nn.Module):
    """Convs, a self-attention block and a linear head."""

    def __init__(self, convs=2):
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.ModuleList(
            [nn.Conv2d(3, 8, 3, padding=1)] +
            [nn.Conv2d(8, 8, 3, padding=1) for _ in range(convs - 2)] +
            [nn.Conv2d(8, 8, 3, stride=2, padding=1)])
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        t = x.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t)[0]
        return self.fc(t.mean(1))


def batches(n, device):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 3, 8, 8, generator=g).to(device),
             torch.randint(0, 5, (4, ), generator=g).to(device))
            for _ in range(n)]


def iteration(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def build(name, device='cpu', convs=2):
    cls, kw, _ = OPTIMS[name]
    model = Net(convs).to(device)
    interval = 'refresh_interval' if cls is AdamR else 'refresh_interval'
    opt = cls(model.parameters(), model=model, stat_interval=STAT,
              **{interval: INV}, **kw)
    return model, opt


def blocks(opt):
    """Preconditioned layers and attention Q / K / V blocks."""
    return (sum(1 for n in opt.layers if opt.layer_state.get(n)) +
            3 * len(getattr(opt, 'attention', {})))


def counted_step(model, opt, x, y):
    """Forward/backward, then ``step()`` under a :class:`DispatchCounter`."""
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with DispatchCounter(counter_tensors(opt)) as counter:
        opt.step()
    return counter


@pytest.mark.parametrize('name', list(OPTIMS))
def test_plain_and_statistics_steps_read_no_device_value(name):
    model, opt = build(name)
    data = batches(9, 'cpu')
    for x, y in data[:INV + 1]:  # past the refresh at step INV
        iteration(model, opt, x, y)
    assert blocks(opt) >= 3
    for t, (x, y) in enumerate(data[INV + 1:], start=INV + 1):
        if t % INV == 0:
            iteration(model, opt, x, y)  # refreshes may read the device
            continue
        stat = t % STAT == 0
        # the whole iteration: statistics hooks in forward/backward too
        with DispatchCounter(counter_tensors(opt)) as it:
            iteration(model, opt, x, y)
        assert it.host_reads == 0, (t, stat, it.by_name)
    assert opt.steps == len(data)
    # the lazily counted fallbacks are readable and nothing fell back
    assert not opt.fallbacks.counts.get('nonfinite_direction')
    assert not opt.fallbacks.counts.get('nonfinite_statistics')


@pytest.mark.parametrize('name', list(OPTIMS))
def test_step_dispatches_few_ops_beyond_torch_foreach(name):
    _, _, base = OPTIMS[name]
    model, opt = build(name, convs=12)  # per-step constants amortised
    data = batches(INV + 3, 'cpu')
    for x, y in data[:INV + 1]:
        iteration(model, opt, x, y)
    plain = counted_step(model, opt, *data[INV + 1])  # step INV + 1: plain
    stats = counted_step(model, opt, *data[INV + 2])  # step INV + 2: stats
    assert (INV + 2) % STAT == 0 and (INV + 2) % INV != 0

    ref_model = Net(12)
    ref = (torch.optim.SGD(ref_model.parameters(), lr=0.02, momentum=0.9,
                           foreach=True) if base == 'sgd' else
           torch.optim.AdamW(ref_model.parameters(), lr=1e-3, foreach=True))
    for x, y in data[:2]:
        iteration(ref_model, ref, x, y)
    ref_ops = counted_step(ref_model, ref, *data[2]).ops
    n_params = sum(len(g['params']) for g in opt.param_groups)
    budget = (ref_ops + OPS_PER_BLOCK * blocks(opt) + OPS_PER_PARAM * n_params
              + GUARD_OPS)
    assert plain.ops <= budget, (plain.ops, budget, plain.by_name)
    assert stats.ops <= budget, (stats.ops, budget, stats.by_name)
    assert stats.ops > plain.ops  # the statistics were folded


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
@pytest.mark.parametrize('name', list(OPTIMS))
def test_cuda_plain_and_statistics_steps_never_synchronise(name):
    model, opt = build(name, 'cuda')
    data = batches(9, 'cuda')
    for x, y in data[:INV + 1]:
        iteration(model, opt, x, y)
    torch.cuda.synchronize()
    for t, (x, y) in enumerate(data[INV + 1:], start=INV + 1):
        if t % INV == 0:
            iteration(model, opt, x, y)
            torch.cuda.synchronize()
            continue
        torch.cuda.set_sync_debug_mode('error')
        try:  # raises on any synchronising call, statistics hooks included
            iteration(model, opt, x, y)
        finally:
            torch.cuda.set_sync_debug_mode('default')
    assert not opt.fallbacks.counts.get('nonfinite_direction')


def test_nonfinite_direction_falls_back_on_the_device_and_is_counted_lazily():
    model, opt = build('NKFAC')
    opt.param_groups[0].update(momentum=0.0, weight_decay=0.0)
    data = batches(INV + 2, 'cpu')
    for x, y in data[:INV + 1]:
        iteration(model, opt, x, y)
    fc, conv = model.fc, model.convs[0]
    opt.layer_state['fc']['R_inv'][0, 0] = float('nan')
    opt.zero_grad()
    F.cross_entropy(model(data[-1][0]), data[-1][1]).backward()
    before = {p: (p.detach().clone(), p.grad.clone())
              for p in (fc.weight, fc.bias, conv.weight)}
    with DispatchCounter(counter_tensors(opt)) as counter:
        opt.step()
    assert counter.host_reads == 0
    lr = opt.param_groups[0]['lr']
    for p in (fc.weight, fc.bias):  # the raw gradient, exactly
        w0, g = before[p]
        torch.testing.assert_close(p.detach(), w0.add(g, alpha=-lr), rtol=0,
                                   atol=0)
    w0, g = before[conv.weight]  # other layers stay preconditioned
    assert not torch.allclose(conv.weight.detach(), w0 - lr * g, atol=1e-6)
    assert opt.fallbacks.counts['nonfinite_direction'] == 1
    assert torch.isfinite(fc.weight).all()


def test_nonfinite_statistics_are_not_folded_and_are_counted_lazily():
    model, opt = build('AdaNKFAC')
    data = batches(INV + 3, 'cpu')
    for x, y in data[:INV + 2]:  # the next step, INV + 2, collects statistics
        iteration(model, opt, x, y)
    assert opt.is_stat_step(opt.steps) and opt.steps % INV != 0
    opt.zero_grad()
    F.cross_entropy(model(data[-1][0]), data[-1][1]).backward()
    opt.capture.buffers['fc'].xx[0, 0] = float('inf')
    old = {k: opt.layer_state[n][k].clone()
           for n, k in (('fc', 'R'), ('fc', 'L'))}
    old_conv = opt.layer_state['convs.0']['R'].clone()
    with DispatchCounter(counter_tensors(opt)) as counter:
        opt.step()
    assert counter.host_reads == 0
    assert torch.equal(opt.layer_state['fc']['R'], old['R'])  # not folded
    assert not torch.equal(opt.layer_state['fc']['L'], old['L'])  # folded
    assert not torch.equal(opt.layer_state['convs.0']['R'], old_conv)
    assert opt.fallbacks.counts['nonfinite_statistics'] == 1


# The related optimizers (SGDM_BK, AdamW_BK, Shampoo, AdaFisher(W), TNT_EF,
# ...) are held to zero host reads by tests/test_contract (test_host_reads:
# whole iterations, every registered optimizer).

# Copyright (c) mmprecond contributors. All rights reserved.
"""``step`` counters after a resume sit where torch's own AdamW keeps them.

MMEngine resumes with ``map_location`` set to the GPU, so a checkpoint's
0-dim ``step`` counters arrive on the device, where torch's foreach AdamW
reads each with ``.item()`` (a sync) at every step.  On the CPU no other
device exists; a counter stored as a one-element float64 vector stands in
for "not the 0-dim CPU float32 tensor torch creates", which the dispatch
counter then sees as a host read, as it would see a device counter.
"""
import copy

import pytest
import torch
from test_sync_free import INV, STAT, Net, batches, iteration

from mmprecond.optim import AdamR, AdamW_BK, AdaNKFAC
from mmprecond.profiling import DispatchCounter, counter_tensors

OPTIMS = {
    'AdaNKFAC': (AdaNKFAC, dict(lr=1e-3, weight_decay=0.05, refresh_interval=INV)),
    'AdamW_BK': (AdamW_BK, dict(lr=1e-3, weight_decay=0.05, refresh_interval=INV)),
    'AdamR': (AdamR, dict(lr=1e-3, refresh_interval=INV)),
}


def build(name, model=None):
    cls, kw = OPTIMS[name]
    model = Net() if model is None else model
    return model, cls(model.parameters(), model=model, stat_interval=STAT, **kw)


def torch_adamw_step_counter():
    """The ``step`` tensor ``torch.optim.AdamW`` creates for itself."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([p], foreach=True)
    p.grad = torch.ones(2)
    opt.step()
    return opt.state[p]['step']


@pytest.mark.parametrize('name', list(OPTIMS))
def test_loaded_step_counters_are_torch_adamw_counters_and_read_nothing(name):
    model, opt = build(name)
    data = batches(INV + 3, 'cpu')
    for x, y in data[:INV + 1]:  # past a refresh
        iteration(model, opt, x, y)
    sd = copy.deepcopy(opt.state_dict())
    moved = 0
    for st in sd['state'].values():
        if 'step' in st:
            st['step'] = st['step'].to(torch.float64).reshape(1)
            moved += 1
    assert moved > 0
    model2 = copy.deepcopy(model)
    _, opt2 = build(name, model2)
    opt2.load_state_dict(sd)
    ref = torch_adamw_step_counter()
    steps = [st['step'] for st in opt2.state.values() if 'step' in st]
    assert len(steps) == moved
    for s in steps:
        assert (s.device, s.dtype, s.shape) == (ref.device, ref.dtype, ref.shape)
    assert sorted(float(s) for s in steps) == sorted(
        float(st['step']) for st in opt.state.values() if 'step' in st)
    # the next plain and statistics steps read no device value
    for t, (x, y) in enumerate(data[INV + 1:], start=INV + 1):
        assert t % INV != 0
        with DispatchCounter(counter_tensors(opt2)) as it:
            iteration(model2, opt2, x, y)
        assert it.host_reads == 0, (t, it.by_name)
        iteration(model, opt, x, y)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)

# Copyright (c) mmprecond contributors. All rights reserved.
"""2-rank gloo DDP: same collectives on every rank, no host reads, exact counts.

The model is :class:`test_distributed.Net`: its ``head`` runs on both ranks
but gets zero rows on rank 1 (like a RoI head without RoIs there).
"""
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from ddp_recording import CollectiveLog, join_gloo, save_from_rank0
from test_distributed import Net, data, free_port, loss_fn
from torch.nn.parallel import DistributedDataParallel as DDP

from mmprecond.optim import KBFGS, SGD_PH, AdaFisher
from mmprecond.profiling import DispatchCounter, counter_tensors

STEPS = 4
BIG = 2**24 + 1  # rows no fp32 count holds exactly


def adafisher_worker(rank, world, port, path):
    join_gloo(rank, world, port)
    model = Net()
    ddp = DDP(model)
    opt = AdaFisher(model.parameters(), model=model, lr=1e-3,
                    weight_decay=1e-3, stat_interval=1)
    logs, reads = [], []
    batches = data(STEPS + 1)
    for t, (x, y, keep) in enumerate(batches):
        xs, ys, ks = x.chunk(2)[rank], y.chunk(2)[rank], keep.chunk(2)[rank]
        opt.zero_grad()
        loss_fn(ddp, xs, ys, ks, len(x), int(keep.sum())).mul(2).backward()
        if t == STEPS:  # the count check, after the DDP comparison
            flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            for buf in opt.capture.buffers.values():
                buf.h_rows += BIG
        with CollectiveLog() as log, DispatchCounter(counter_tensors(opt)) as c:
            opt.step()
        logs.append(log.calls)
        reads.append(c.host_reads)
    counts = log.int_results
    result = dict(params=flat, logs=logs, reads=reads, counts=counts,
                  state={n: {k: v.clone() for k, v in st.items()}
                         for n, st in opt.layer_state.items()})
    save_from_rank0(result, path)


def test_adafisher_counts_ride_the_device_bucket_without_host_reads(tmp_path):
    path = str(tmp_path / 'result.pt')
    mp.spawn(adafisher_worker, args=(2, free_port(), path), nprocs=2, join=True)
    r0, r1 = torch.load(path)
    assert r0['logs'] == r1['logs'], 'ranks issued different collectives'
    assert r0['reads'] == r1['reads'] == [0] * (STEPS + 1)
    # one float bucket (sums) and one int64 bucket (row counts) per step
    for calls in r0['logs']:
        assert [(n, d) for n, d, _, _ in calls] == [
            ('all_reduce', torch.float32), ('all_reduce', torch.int64)]
        assert not any(side for *_, side in calls)
    # counts above 2**24 are exact: every layer's input rows are 2 * BIG more
    # than the rows the layer saw (head: 4 on rank 0, none on rank 1)
    (counts, ) = r0['counts']
    h_rows = counts.view(-1, 2)[:, 0].tolist()
    assert h_rows == [2 * BIG + 8 * 36, 2 * BIG + 8, 2 * BIG + 4]
    assert torch.equal(r0['params'], r1['params'])
    for name, st in r0['state'].items():
        for key, value in st.items():
            assert torch.equal(value, r1['state'][name][key]), (name, key)
    model = Net()
    opt = AdaFisher(model.parameters(), model=model, lr=1e-3,
                    weight_decay=1e-3, stat_interval=1)
    for x, y, keep in data(STEPS):
        opt.zero_grad()
        loss_fn(model, x, y, keep, len(x), int(keep.sum())).backward()
        opt.step()
    single = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(r0['params'], single, rtol=1e-4, atol=1e-5)


if __name__ == '__main__':
    pytest.main([__file__, '-q'])


def kbfgs_run(model, run_model, opt, batches, rank=None, logs=None):
    """K-BFGS with a second pass each step; ``rank`` takes its half."""
    for x, y, keep in batches:
        n, k = len(x), int(keep.sum())
        if rank is not None:
            x, y, keep = x.chunk(2)[rank], y.chunk(2)[rank], keep.chunk(2)[rank]
        scale = 1 if rank is None else 2

        def closure(x=x, y=y, keep=keep, n=n, k=k, scale=scale):
            # the unwrapped model: DDP takes no part in the second pass
            return loss_fn(model, x, y, keep, n, k) * scale

        opt.zero_grad()
        (loss_fn(run_model, x, y, keep, n, k) * scale).backward()
        with CollectiveLog() as log:
            opt.step()
            opt.second_pass(closure)
        if logs is not None:
            logs.append(log.calls)


def kbfgs(model):
    return KBFGS(model.parameters(), model=model, lr=0.05, damping=1.0,
                 curvature_interval=1)


def kbfgs_worker(rank, world, port, path):
    join_gloo(rank, world, port)
    model = Net()
    opt = kbfgs(model)
    logs = []
    kbfgs_run(model, DDP(model), opt, data(STEPS), rank, logs)
    result = dict(logs=logs,
                  params=torch.cat([p.detach().reshape(-1)
                                    for p in model.parameters()]),
                  state={n: {k: v.clone() for k, v in st.items()}
                         for n, st in opt.layer_state.items()})
    save_from_rank0(result, path)


def test_kbfgs_ranks_issue_the_same_collectives_with_an_empty_head(tmp_path):
    """The head gets zero rows on rank 1 (a Linear called on a 0-row input)."""
    path = str(tmp_path / 'result.pt')
    mp.spawn(kbfgs_worker, args=(2, free_port(), path), nprocs=2, join=True)
    r0, r1 = torch.load(path)
    assert r0['logs'] == r1['logs'], 'ranks issued different collectives'
    # first pass: sums + counts, then the Hessian actions; second pass: sums
    for calls in r0['logs']:
        assert [name for name, *_ in calls] == ['all_reduce'] * 3, calls
    assert torch.equal(r0['params'], r1['params'])
    assert r0['state'].keys() == r1['state'].keys() == {'conv', 'fc', 'head'}
    model = Net()
    opt = kbfgs(model)
    kbfgs_run(model, model, opt, data(STEPS))
    single = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(r0['params'], single, rtol=1e-4, atol=1e-5)
    for name, st in opt.layer_state.items():
        for key, value in st.items():
            assert torch.equal(r0['state'][name][key], r1['state'][name][key])
            torch.testing.assert_close(r0['state'][name][key], value,
                                       rtol=1e-4, atol=1e-5,
                                       msg=f'{name}.{key}')


class _NoDoubleBackward(torch.autograd.Function):
    """``grad * mask`` that cannot be differentiated again, as many custom
    ops (some mmcv ones among them) have no double backward."""

    @staticmethod
    def forward(ctx, grad, mask):
        return grad * mask

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError('double backward is not implemented for this op')


class _OnceDifferentiableReLU(torch.autograd.Function):
    """ReLU whose backward cannot be differentiated again."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x, ) = ctx.saved_tensors
        return _NoDoubleBackward.apply(grad, (x > 0).to(grad.dtype))


class PHNet(nn.Module):
    """Conv, GroupNorm, ReLU, Linear; on ``rank`` 1 the ReLU is once
    differentiable, so the GroupNorm Hessian-vector products fail there only."""

    def __init__(self, once_differentiable_relu=False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.GroupNorm(3, 6)
        self.fc = nn.Linear(6 * 6 * 6, 4)
        self.once = once_differentiable_relu

    def forward(self, x):
        x = self.norm(self.conv(x))
        x = _OnceDifferentiableReLU.apply(x) if self.once else F.relu(x)
        return self.fc(x.flatten(1))


def sgd_ph_worker(rank, world, port, path):
    join_gloo(rank, world, port, seconds=30)
    model = PHNet(once_differentiable_relu=rank == 1)
    ddp = DDP(model)
    opt = SGD_PH(model.parameters(), model=model, lr=0.05, weight_decay=1e-3)
    g = torch.Generator().manual_seed(1)
    logs = []
    for _ in range(6):  # three rounds over the two GroupNorm tensors
        x = torch.randn(8, 3, 6, 6, generator=g)
        y = torch.randint(0, 4, (8, ), generator=g)
        loss = F.cross_entropy(ddp(x.chunk(2)[rank]), y.chunk(2)[rank])
        opt.zero_grad()
        with CollectiveLog() as log:
            opt.prepare_hessian(loss)
        loss.backward()
        with CollectiveLog() as step_log:
            opt.step()
        logs.append((log.calls, step_log.calls))
    result = dict(logs=logs, params=[p.detach().clone()
                                     for p in model.parameters()],
                  state=opt.state_dict(), fallbacks=dict(opt.fallbacks.counts))
    save_from_rank0(result, path)


def test_sgd_ph_ranks_agree_when_one_ranks_hessian_product_fails(tmp_path):
    path = str(tmp_path / 'result.pt')
    mp.spawn(sgd_ph_worker, args=(2, free_port(), path), nprocs=2, join=True)
    r0, r1 = torch.load(path)
    assert r1['fallbacks'].get('hvp_unavailable', 0) >= 1
    assert not r0['fallbacks'].get('hvp_unavailable')
    assert r0['logs'] == r1['logs'], 'ranks issued different collectives'
    for a, b in zip(r0['params'], r1['params']):
        assert torch.equal(a, b), 'ranks diverged'
    s0, s1 = r0['state'], r1['state']
    assert s0['partial_hessian']['disabled'] == s1['partial_hessian']['disabled']
    # both GroupNorm tensors failed on rank 1: disabled on both ranks
    assert s0['partial_hessian']['failed'].tolist() == [True, True]
    assert torch.equal(s0['partial_hessian']['failed'],
                       s1['partial_hessian']['failed'])
    for key, st in s0['state'].items():
        for name, value in st.items():
            assert torch.equal(value, s1['state'][key][name]), (key, name)
        if 'hessian_diag' in st:  # never folded a one-rank product
            assert not st['hessian_diag'].any()

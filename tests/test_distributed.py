# Copyright (c) mmprecond contributors. All rights reserved.
"""Real 2-process gloo DDP runs of the preconditioned optimizers."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from mmprecond.distributed import (
    BUCKET_BYTES,
    assign_by_cost,
    bucket_plan,
    group_by_key,
    run_batched,
)
from mmprecond.optim import NKFAC, AdamR, AdaNKFAC

HP = dict(stat_interval=1, refresh_interval=2, exact_inv_period=3)
# AdaNKFAC shards its inverse work over the ranks (the default); NKFAC runs
# in the 'every rank computes everything' mode.
OPTIMS = {'AdaNKFAC': (AdaNKFAC, dict(lr=1e-2, weight_decay=0.05)),
          'NKFAC': (NKFAC, dict(lr=0.05, weight_decay=1e-4,
                                shard_refresh=False)),
          'AdamR': (AdamR, dict(lr=1e-2, weight_decay=0.05, stat_interval=1,
                                refresh_interval=4, eps=1e-6)),
          # the 145-wide inputs of fc/head exceed max_factor_dim: only their
          # output sides are collected and reduced
          'NKFAC-capped': (NKFAC, dict(lr=0.05, weight_decay=1e-4,
                                       max_factor_dim=100))}
# AdamR restarts its moments at the first basis; the row of U1^T G along the
# CE head's null direction (a shift of all logits) is pure summation noise,
# which Adam's first steps divide by its own size: eps=1e-6 keeps that noise
# (~1e-9) from becoming a lr-sized step that differs between DDP and one
# process.  AdamR's eigenbases are unique only for distinct eigenvalues: with few rows
# the 145-wide input factor is rank-deficient, its (eps-shifted) null space is
# one repeated eigenvalue, and fp32 noise picks an arbitrary basis there.  So
# it gets enough rows for full-rank statistics before its first basis.
ROWS = {'AdamR': 256}


class Net(nn.Module):
    """Conv trunk plus a head that sees only the 'positive' rows (like RoIs)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.head = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x, keep):
        f = F.relu(self.conv(x)).flatten(1)
        return self.fc(f), self.head(f[keep])


def hyper(name):
    return {} if name == 'AdamR' else HP


def data(steps, n=8):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(n, 3, 6, 6, generator=g)
        y = torch.randint(0, 3, (n, ), generator=g)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[:n // 2] = True  # only rank 0's half has head rows (like RoIs)
        out.append((x, y, keep))
    return out


def loss_fn(model, x, y, keep, total_n, total_keep):
    logits, head = model(x, keep)
    # sums divided by global counts, so DDP's gradient mean equals the
    # single-process gradient of the concatenated batch
    ce = F.cross_entropy(logits, y, reduction='sum') / total_n
    return ce + head.pow(2).sum() / max(total_keep, 1)


def join(rank, world, port):
    """Join a gloo group; return the test model and its DDP wrapper."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = Net()
    return model, DDP(model)


def worker(rank, world, port, name, steps, result_path):
    model, ddp = join(rank, world, port)
    cls, kw = OPTIMS[name]
    opt = cls(model.parameters(), model=model, **hyper(name), **kw)
    for x, y, keep in data(steps, ROWS.get(name, 8)):
        xs, ys, ks = x.chunk(2)[rank], y.chunk(2)[rank], keep.chunk(2)[rank]
        opt.zero_grad()
        loss_fn(ddp, xs, ys, ks, len(x), int(keep.sum())).mul(2).backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    # every refreshed tensor (inverses, bases), as each rank holds it
    refreshed = torch.cat([v.reshape(-1) for st in opt.layer_state.values()
                           for k, v in sorted(st.items())
                           if k.endswith(('_inv', '_root')) or k in ('U1', 'U2')])
    ranks_refreshed = [torch.zeros_like(refreshed) for _ in range(world)]
    dist.all_gather(ranks_refreshed, refreshed)
    if rank == 0:
        torch.save(dict(params=gathered, state=opt.layer_state,
                        refreshed=ranks_refreshed), result_path)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def drop_logit_shift(model, flat):
    """Split a flat parameter vector at fc's cross-entropy null direction.

    Args:
        model: The ``Net`` whose parameter layout ``flat`` follows.
        flat: All parameters, flattened and concatenated in order.

    Returns:
        ``(rest, shift)``: ``flat`` with fc's per-input mean over its output
        rows removed (a common shift of all logits, invisible to the loss),
        and that mean.
    """
    rest, shifts, off = flat.clone(), [], 0
    for pname, p in model.named_parameters():
        if pname.startswith('fc.'):
            rows = rest[off:off + p.numel()].view(p.shape[0], -1)
            mean = rows.mean(0)
            rows -= mean
            shifts.append(mean)
        off += p.numel()
    return rest, torch.cat(shifts)


@pytest.mark.parametrize('name', list(OPTIMS))
def test_ddp_equals_single_process_on_concatenated_batch(name, tmp_path):
    steps = 6
    path = str(tmp_path / 'result.pt')
    mp.spawn(worker, args=(2, free_port(), name, steps, path), nprocs=2,
             join=True)
    res = torch.load(path)
    r0, r1 = res['params']
    assert torch.equal(r0, r1), 'ranks diverged'
    # sharded (batches split over the ranks, results broadcast) or
    # replicated, the refreshed inverses / bases are bit-identical
    assert res['refreshed'][0].numel() > 0
    assert torch.equal(*res['refreshed']), 'refreshed state differs'

    model = Net()
    cls, kw = OPTIMS[name]
    opt = cls(model.parameters(), model=model, **hyper(name), **kw)
    for x, y, keep in data(steps, ROWS.get(name, 8)):
        opt.zero_grad()
        loss_fn(model, x, y, keep, len(x), int(keep.sum())).backward()
        opt.step()
    single = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # Adam divides by sqrt(v): near-zero gradients amplify the fp32 summation
    # order noise of the all-reduce, so allow 1 % of one lr-sized step there
    atol = 1e-5 if name.startswith('NKFAC') else 1e-4
    if name == 'AdamR':
        # Measured: every DDP - single difference beyond 3e-6 relative lies
        # along fc's logit shift (the mean over its output rows), where the
        # CE gradient is zero analytically; the rotated Adam step there is
        # summation noise over its own size (1.2e-4 on a 7e-2 bias after six
        # steps).  The loss cannot see that direction, so it is compared
        # separately, to a tenth of one lr-sized step, and everything else
        # at the usual tolerance.
        r0, single = (drop_logit_shift(model, t) for t in (r0, single))
        torch.testing.assert_close(r0[1], single[1], rtol=0, atol=0.1 * 1e-2)
        r0, single = r0[0], single[0]
    if name == 'NKFAC-capped':
        assert set(opt.layer_state['head']) == {'L', 'L_inv'}
    torch.testing.assert_close(r0, single, rtol=1e-4, atol=atol)
    # the head ran on rank 0 only, yet its factors exist and match
    for key, value in opt.layer_state['head'].items():
        got = res['state']['head'][key]
        if not value.is_floating_point():  # counters
            assert torch.equal(got, value), key
            continue
        err = (got - value).norm() / value.norm()
        assert err < 1e-4, (key, float(err))


BATCH_KEYS = [17, 4, 17, 17, 9, 4, 17, 17]  # item sizes: three batches


def batched_worker(rank, world, port, result_path):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    items = [torch.full((n, n), float(i)) for i, n in enumerate(BATCH_KEYS)]
    ran = []

    def work(chunk):
        ran.append(chunk.items)
        # the result says which rank computed it
        stacked = torch.stack([items[i] for i in chunk.items]) + 100 * rank
        return [stacked, torch.tensor(chunk.items, dtype=torch.float32)]

    out = run_batched(BATCH_KEYS, work, lambda n: float(n)**3,
                      lambda n, k: [((k, n, n), torch.float32, torch.device('cpu')),
                                    ((k, ), torch.float32, torch.device('cpu'))])
    flat = torch.cat([t.reshape(-1) for _, ts in out for t in ts])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    calls = [None] * world
    dist.all_gather_object(calls, ran)
    if rank == 0:
        torch.save(dict(flat=gathered, calls=calls,
                        chunks=[((c.key, c.items, c.offset, c.batch_size), ts)
                                for c, ts in out]), result_path)
    dist.destroy_process_group()


def test_run_batched_splits_batches_over_ranks_and_shares_results(tmp_path):
    path = str(tmp_path / 'batched.pt')
    mp.spawn(batched_worker, args=(2, free_port(), path), nprocs=2, join=True)
    res = torch.load(path)
    assert torch.equal(*res['flat']), 'ranks hold different results'
    # each batch is cut in at most 2 near-equal chunks, in key order
    assert [c for c, _ in res['chunks']] == [
        (17, [0, 2], 0, 5), (17, [3, 6, 7], 2, 5), (4, [1], 0, 2),
        (4, [5], 1, 2), (9, [4], 0, 1)]
    # every chunk ran exactly once, and both ranks had work
    ran = res['calls']
    assert all(ran)
    assert sorted(i for calls in ran for c in calls for i in c) == list(range(8))
    owners = set()
    for (_, items, _, _), (stacked, ids) in res['chunks']:
        assert ids.tolist() == items  # results come back in place
        for j, i in enumerate(items):
            owner = int(stacked[j, 0, 0]) - i  # 0 or 100 * rank
            assert owner in (0, 100)
            assert torch.equal(stacked[j], torch.full_like(stacked[j], i + owner))
            owners.add(owner)
    assert owners == {0, 100}


def test_group_by_key_keeps_first_appearance_order():
    assert group_by_key(BATCH_KEYS) == {17: [0, 2, 3, 6, 7], 4: [1, 5], 9: [4]}
    # one process: one chunk per batch
    out = run_batched(BATCH_KEYS, lambda c: [torch.tensor(c.items)],
                      lambda n: 1.0)
    assert [(c.key, r.tolist()) for c, (r, ) in out] == [
        (17, [0, 2, 3, 6, 7]), (4, [1, 5]), (9, [4])]
    # max_items caps the chunks (cache-sized CPU batches)
    out = run_batched(BATCH_KEYS, lambda c: [torch.tensor(c.items)],
                      lambda n: 1.0, max_items=lambda n: 2)
    assert [(c.key, c.items, c.offset) for c, _ in out] == [
        (17, [0, 2], 0), (17, [3], 2), (17, [6, 7], 3), (4, [1, 5], 0),
        (9, [4], 0)]


def traffic_worker(rank, world, port, steps, result_path):
    """NKFAC with reduce_statistics='before_refresh'; logs every all-reduce."""
    model, ddp = join(rank, world, port)
    opt = NKFAC(model.parameters(), model=model, lr=0.05, weight_decay=1e-4,
                reduce_statistics='before_refresh', **HP)
    calls, orig = [], dist.all_reduce

    def logged(tensor, *args, **kwargs):
        calls.append((opt.steps, tensor.dtype, tensor.numel()))
        return orig(tensor, *args, **kwargs)

    for x, y, keep in data(steps):
        xs, ys, ks = x.chunk(2)[rank], y.chunk(2)[rank], keep.chunk(2)[rank]
        opt.zero_grad()
        loss_fn(ddp, xs, ys, ks, len(x), int(keep.sum())).mul(2).backward()
        dist.all_reduce = logged
        try:
            opt.step()
        finally:
            dist.all_reduce = orig
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save(dict(params=gathered, calls=calls,
                        factor_numel=sum(st[k].numel()
                                         for st in opt.layer_state.values()
                                         for k in ('L', 'R') if k in st)),
                   result_path)
    dist.destroy_process_group()


def test_before_refresh_reduces_only_running_factors_and_ranks_agree(tmp_path):
    steps = 6  # refresh_interval=2: refreshes at 0, 2, 4
    path = str(tmp_path / 'result.pt')
    mp.spawn(traffic_worker, args=(2, free_port(), steps, path), nprocs=2,
             join=True)
    res = torch.load(path)
    r0, r1 = res['params']
    assert torch.equal(r0, r1), 'ranks diverged'
    floats = [(t, n) for t, dtype, n in res['calls'] if dtype.is_floating_point]
    ints = [t for t, dtype, _ in res['calls'] if dtype == torch.int64]
    # statistics steps reduce only host row counts; factors once per refresh
    assert sorted(set(ints)) == list(range(steps))
    assert sorted({t for t, _ in floats}) == [0, 2, 4]
    assert sum(n for t, n in floats if t == 4) == res['factor_numel']
    # not the single-process result (a mean of per-rank Frobenius-normalised
    # statistics is not the normalised total), but close to it
    model = Net()
    opt = NKFAC(model.parameters(), model=model, lr=0.05, weight_decay=1e-4,
                **HP)
    for x, y, keep in data(steps):
        opt.zero_grad()
        loss_fn(model, x, y, keep, len(x), int(keep.sum())).backward()
        opt.step()
    single = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    err = float((r0 - single).norm() / single.norm())
    assert 1e-6 < err < 0.05, err


def test_assign_by_cost_balances_and_is_deterministic():
    costs = [8.0, 1.0, 1.0, 4.0, 4.0, 2.0]
    owner = assign_by_cost(costs, 2)
    loads = [sum(c for c, o in zip(costs, owner) if o == r) for r in range(2)]
    assert sorted(loads) == [10.0, 10.0]
    assert owner == assign_by_cost(costs, 2)
    assert assign_by_cost(costs, 1) == [0] * 6


def test_bucket_plan_groups_in_order_and_splits_by_size_and_dtype():
    ts = [torch.zeros(10), torch.zeros(10), torch.zeros(30),
          torch.zeros(2, dtype=torch.float64), torch.zeros(100)]
    # 4-byte floats: 40 + 40 fit in 100 bytes, the 120-byte one is alone
    assert bucket_plan(ts, bucket_bytes=100) == [[0, 1], [2], [3], [4]]
    assert bucket_plan(ts, bucket_bytes=10**6) == [[0, 1, 2], [3], [4]]


def test_resnet50_fpn_statistics_take_a_handful_of_all_reduces():
    """The real R50-FPN Faster R-CNN: every stat step's reduction, planned."""
    pytest.importorskip('mmdet')
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.hub import get_config

    from mmprecond.curvature.capture import factor_dims

    register_all_modules()
    cfg = get_config('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    opt = AdaNKFAC(model.parameters(), model=model)
    # the tensors _reduced_statistics passes, as shapes only (meta device)
    tensors = []
    for name, module in opt.layers.items():
        want_x, want_g = opt.capture.sides[name]
        d_out, d_in = factor_dims(module)
        if want_x:
            tensors.append(torch.empty(d_in, d_in, device='meta'))
        if want_g:
            tensors.append(torch.empty(d_out, d_out, device='meta'))
    # (row counts travel as one int64 tensor at the end of the same bucket)
    assert len(opt.layers) > 50 and len(tensors) > 100
    # shared_fcs.0's 12545-wide input Gram is never formed
    assert opt.capture.sides['roi_head.bbox_head.shared_fcs.0'] == (False, True)
    total = sum(t.numel() * 4 for t in tensors)
    assert 0.6e9 < total < 0.9e9  # 0.74 GB of fp32 Gram matrices
    assert len(bucket_plan(tensors, BUCKET_BYTES)) <= 4

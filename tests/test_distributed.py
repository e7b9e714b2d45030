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

from mmprecond.distributed import BUCKET_BYTES, assign_by_cost, bucket_plan
from mmprecond.optim import NKFAC, AdamR, AdaNKFAC

HP = dict(stat_interval=1, inv_interval=2, exact_inv_period=3)
# AdaNKFAC shards its inverse work over the ranks (the default); NKFAC runs
# in the 'every rank computes everything' mode.
OPTIMS = {'AdaNKFAC': (AdaNKFAC, dict(lr=1e-2, weight_decay=0.05)),
          'NKFAC': (NKFAC, dict(lr=0.05, weight_decay=1e-4,
                                shard_inverses=False)),
          'AdamR': (AdamR, dict(lr=1e-2, weight_decay=0.05, stat_interval=1,
                                basis_interval=4, eps=1e-6)),
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


def worker(rank, world, port, name, steps, result_path):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = Net()
    ddp = DDP(model)
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
    if rank == 0:
        torch.save(dict(params=gathered, state=opt.layer_state), result_path)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('name', list(OPTIMS))
def test_ddp_equals_single_process_on_concatenated_batch(name, tmp_path):
    steps = 6
    path = str(tmp_path / 'result.pt')
    mp.spawn(worker, args=(2, free_port(), name, steps, path), nprocs=2,
             join=True)
    res = torch.load(path)
    r0, r1 = res['params']
    assert torch.equal(r0, r1), 'ranks diverged'

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
        tensors.append(torch.empty(2, device='meta'))
    assert len(opt.layers) > 50 and len(tensors) > 150
    # shared_fcs.0's 12545-wide input Gram is never formed
    assert opt.capture.sides['roi_head.bbox_head.shared_fcs.0'] == (False, True)
    total = sum(t.numel() * 4 for t in tensors)
    assert 0.6e9 < total < 0.9e9  # 0.74 GB of fp32 Gram matrices
    assert len(bucket_plan(tensors, BUCKET_BYTES)) <= 4

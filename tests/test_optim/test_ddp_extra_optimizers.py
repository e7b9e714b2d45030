# Copyright (c) mmprecond contributors. All rights reserved.
"""2-process gloo DDP runs of SGD_PH and AdaFisher(W).

SGDM_BK, AdamW_BK and Shampoo moved to the contract suite
(``tests/test_contract``: DDP equals one process with a layer that gets no
rows on one rank, and both ranks issue the same collectives).  SGD_PH stays
for its check that the Hessian diagonal was used, AdaFisher(W) because the
contract case skips them (its learning rate is far beyond theirs: see the
contract's EXCEPTIONS) and for AdaFisherW's ``statistics='paper'``.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from test_distributed import free_port
from torch.nn.parallel import DistributedDataParallel as DDP

from mmprecond.optim import SGD_PH, AdaFisher, AdaFisherW

OPTIMS = {
    'SGD_PH': (SGD_PH, dict(lr=0.05, weight_decay=1e-3)),
    'AdaFisher': (AdaFisher, dict(lr=1e-3, weight_decay=1e-3, stat_interval=1)),
    'AdaFisherW-paper': (AdaFisherW, dict(lr=1e-4, weight_decay=0.05,
                                          stat_interval=2, statistics='paper')),
}


def net():
    torch.manual_seed(0)
    gn = nn.GroupNorm(3, 6)  # per-sample normalisation: DDP-exact
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), gn, nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 4))


def data(steps, n=8):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 6, 6, generator=g),
             torch.randint(0, 4, (n, ), generator=g))
            for _ in range(steps)]


def train_step(model, opt, x, y, scale):
    # summed over local rows / global rows, times the world size: DDP's
    # gradient mean is the gradient of the concatenated batch
    loss = F.cross_entropy(model(x), y, reduction='sum') * scale
    opt.zero_grad()
    if getattr(opt, 'prepares_hessian', False):
        opt.prepare_hessian(loss)  # DDP rejects backward(create_graph=True)
    loss.backward()
    opt.step()


def worker(rank, world, port, name, steps, path):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = net()
    ddp = DDP(model)
    cls, kw = OPTIMS[name]
    opt = cls(model.parameters(), model=model, **kw)
    for x, y in data(steps):
        train_step(ddp, opt, x.chunk(world)[rank], y.chunk(world)[rank],
                   world / len(x))
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save(gathered, path)
    dist.destroy_process_group()


@pytest.mark.parametrize('name', list(OPTIMS))
def test_ddp_equals_single_process_on_concatenated_batch(name, tmp_path):
    steps, path = 5, str(tmp_path / 'params.pt')
    mp.spawn(worker, args=(2, free_port(), name, steps, path), nprocs=2, join=True)
    r0, r1 = torch.load(path)
    assert torch.equal(r0, r1), 'ranks diverged'
    model = net()
    cls, kw = OPTIMS[name]
    opt = cls(model.parameters(), model=model, **kw)
    for x, y in data(steps):
        train_step(model, opt, x, y, 1 / len(x))
    if name == 'SGD_PH':
        assert all(opt.state[p]['hessian_diag'].any()
                   for p in opt.partial_hessian.params)
    elif name.startswith('AdaFisher'):
        assert set(opt.layer_state) == {'0', '1', '4'}
    single = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(r0, single, rtol=1e-4, atol=1e-5)

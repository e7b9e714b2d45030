# Copyright (c) mmprecond contributors. All rights reserved.
"""2-rank gloo DDP: same collectives on every rank, no host reads, exact counts.

The model is :class:`test_distributed.Net`: its ``head`` runs on both ranks
but gets zero rows on rank 1 (like a RoI head without RoIs there).
"""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ddp_recording import CollectiveLog, gather_objects, join_gloo
from test_distributed import Net, data, free_port, loss_fn
from torch.nn.parallel import DistributedDataParallel as DDP

from mmprecond.optim import KBFGS, AdaFisher
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
    everyone = gather_objects(result)
    if rank == 0:
        torch.save(everyone, path)
    dist.destroy_process_group()


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
    everyone = gather_objects(result)
    if rank == 0:
        torch.save(everyone, path)
    dist.destroy_process_group()


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

# Copyright (c) mmprecond contributors. All rights reserved.
"""Statistics traffic on 2 ranks: reduce every statistics step, or before refresh.

``reduce_statistics='every_step'`` (the default) all-reduces each statistics
step's ``X^T X`` / ``Delta^T Delta`` sums, so DDP equals one process on the
concatenated batch.  ``'before_refresh'`` (the NKFAC authors' code) folds each
rank's own statistics and averages the running factors right before a
refresh.  This runs NKFAC on a real 2-process gloo DDP (CPU) with both modes
in one run and prints, per mode:

* bytes all-reduced and wall time of ``step()`` on a statistics-only step and
  on a refresh step, and the bytes amortised per iteration at the thesis
  intervals (``T_stat=100``, ``T_inv=1000``);
* how far the result is from one process on the concatenated batch: relative
  Frobenius difference of every running factor after the run (median / max
  over factors) and of the parameters.

Run::

    python benchmarks/bench_stat_reduction.py [--steps 9] [--width 32]
"""
import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

STAT, INV = 1, 4  # every step collects; refreshes at 0, 4, 8
THESIS_STAT, THESIS_INV = 100, 1000


class Net(nn.Module):
    """A small VGG-style conv net with a linear head (real conv / fc layers)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(2 * w * 4 * 4, 10)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def data(steps: int, n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 3, 16, 16, generator=g),
             torch.randint(0, 10, (n, ), generator=g)) for _ in range(steps)]


def build(width: int, mode: str):
    from mmprecond.optim import NKFAC
    model = Net(width)
    opt = NKFAC(model.parameters(), model=model, lr=0.05, stat_interval=STAT,
                refresh_interval=INV, reduce_statistics=mode, shard_refresh=False)
    return model, opt


class Traffic:
    """Wraps ``dist.all_reduce`` to add up the bytes it moves."""

    def __init__(self) -> None:
        self.bytes = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def counted(tensor, *args, **kwargs):
            self.bytes += tensor.numel() * tensor.element_size()
            return self._orig(tensor, *args, **kwargs)

        dist.all_reduce = counted
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def worker(rank, world, port, mode, args, path):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, opt = build(args.width, mode)
    ddp = DDP(model)
    rows = []
    for t, (x, y) in enumerate(data(args.steps, 2 * args.batch)):
        opt.zero_grad()
        F.cross_entropy(ddp(x.chunk(2)[rank]), y.chunk(2)[rank]).backward()
        dist.barrier()
        with Traffic() as traffic:
            t0 = time.perf_counter()
            opt.step()
            seconds = time.perf_counter() - t0
        rows.append((t, traffic.bytes, seconds))
    if rank == 0:
        torch.save(dict(rows=rows, state=opt.layer_state,
                        params=[p.detach() for p in model.parameters()]), path)
    dist.destroy_process_group()


def single(args):
    model, opt = build(args.width, 'every_step')
    for x, y in data(args.steps, 2 * args.batch):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt.layer_state, [p.detach() for p in model.parameters()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--steps', type=int, default=9)
    parser.add_argument('--width', type=int, default=32)
    parser.add_argument('--batch', type=int, default=8, help='per rank')
    args = parser.parse_args()
    torch.set_num_threads(1)
    ref_state, ref_params = single(args)
    print(f'NKFAC, 2 ranks (gloo, CPU), conv width {args.width}, batch '
          f'{args.batch}/rank, T_stat={STAT}, T_inv={INV}, {args.steps} steps; '
          f'torch {torch.__version__}')
    print(f"{'mode':<15} {'stat-step MB':>12} {'stat-step ms':>12} "
          f"{'refresh MB':>10} {'MB/iter @100/1000':>17} "
          f"{'factor diff med/max':>20} {'param diff':>10}")
    for mode in ('every_step', 'before_refresh'):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'out.pt')
            with socket.socket() as s:
                s.bind(('127.0.0.1', 0))
                port = s.getsockname()[1]
            mp.spawn(worker, args=(2, port, mode, args, path), nprocs=2,
                     join=True)
            res = torch.load(path)
        stat_rows = [r for r in res['rows'] if r[0] % INV != 0 and r[0] > 0]
        ref_rows = [r for r in res['rows'] if r[0] % INV == 0 and r[0] > 0]
        stat_mb = statistics.median(r[1] for r in stat_rows) / 2**20
        stat_ms = 1e3 * statistics.median(r[2] for r in stat_rows)
        refresh_mb = statistics.median(r[1] for r in ref_rows) / 2**20
        if mode == 'every_step':  # every statistics step moves the sums
            per_iter = stat_mb / THESIS_STAT
        else:  # counts every statistics step, factors once per refresh
            per_iter = stat_mb / THESIS_STAT + (refresh_mb - stat_mb) / THESIS_INV
        diffs = [rel(res['state'][n][k], ref_state[n][k])
                 for n in ref_state for k in ('L', 'R') if k in ref_state[n]]
        pdiff = rel(torch.cat([p.reshape(-1) for p in res['params']]),
                    torch.cat([p.reshape(-1) for p in ref_params]))
        print(f'{mode:<15} {stat_mb:>12.3f} {stat_ms:>12.1f} {refresh_mb:>10.3f} '
              f'{per_iter:>17.4f} {statistics.median(diffs):>10.2e}/'
              f'{max(diffs):<9.2e} {pdiff:>10.2e}')


if __name__ == '__main__':
    main()

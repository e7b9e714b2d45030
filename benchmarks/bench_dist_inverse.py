# Copyright (c) mmprecond contributors. All rights reserved.
"""Wall time of the inverse phase with 1 vs N ranks (gloo on CPU, NCCL on GPU).

Every rank builds the same stack of ``Linear`` layers (widths chosen to span
the factor sizes of a detector's convs), collects one statistics step, and
then times ``update_preconditioners`` when every factor is refreshed:

* ``nkfac``: a warm-started Newton step per factor, batched by size
  (NKFAC / AdaNKFAC / KFAC share this phase);
* ``adamr``: an fp64 eigendecomposition per factor (AdamR's basis update).

Each is run sharded (the default: each batch of equal-sized factors cut
into one chunk per rank, chunks balanced by ``n^3``, results broadcast)
and replicated (every rank computes everything).  Each process uses one
thread, so the ranks do not compete for the same cores.

Run::

    python benchmarks/bench_dist_inverse.py [--ranks 1 2] [--optimizers nkfac adamr]
"""
import argparse
import os
import socket
import statistics
import tempfile
import time
from typing import List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, widths: List[int], shard: bool,
           repeat: int, out: str, kind: str) -> None:
    from mmprecond.optim import NKFAC, AdamR

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
    model = nn.Sequential(*layers)
    if kind == 'nkfac':
        opt = NKFAC(model.parameters(), model=model, shard_refresh=shard,
                    refresh_interval=1000)
        refresh_step = 3000  # a Newton refresh of every factor
    else:
        opt = AdamR(model.parameters(), model=model, shard_refresh=shard,
                    refresh_interval=1000)
        refresh_step = 1000  # an eigendecomposition of every factor
    model(torch.randn(4 * max(widths), widths[0])).square().mean().backward()
    opt.step()
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        opt.update_preconditioners(refresh_step)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        with open(out, 'w') as f:
            f.write(str(statistics.median(times)))
    dist.destroy_process_group()


def measure(world: int, widths: List[int], shard: bool, repeat: int,
            kind: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 't')
        mp.spawn(worker,
                 args=(world, free_port(), widths, shard, repeat, out, kind),
                 nprocs=world, join=True)
        with open(out) as f:
            return float(f.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--ranks', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--widths', type=int, nargs='+',
                        default=[1152, 576, 1152, 256, 768, 512, 1024, 256])
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--optimizers', nargs='+', default=['nkfac', 'adamr'],
                        choices=['nkfac', 'adamr'])
    args = parser.parse_args()
    dims = sorted({d for w in args.widths for d in (w, w + 1)})
    print(f'gloo/CPU, 1 thread per rank, {len(args.widths) - 1} Linear layers, '
          f'factor sizes {dims[0]}..{dims[-1]}')
    print(f"{'optimizer':>9} {'ranks':>5} {'mode':>10} {'refresh s':>10} "
          f"{'vs 1 rank':>10}")
    for kind in args.optimizers:
        base = None
        for world in args.ranks:
            for shard in ((False, ) if world == 1 else (True, False)):
                t = measure(world, args.widths, shard, args.repeat, kind)
                base = t if base is None else base
                mode = 'sharded' if shard else 'replicated'
                print(f'{kind:>9} {world:>5} {mode:>10} {t:>10.3f} '
                      f'{t / base:>10.2f}', flush=True)


if __name__ == '__main__':
    main()

# Copyright (c) mmprecond contributors. All rights reserved.
"""Wall time of the inverse phase with 1 vs N ranks (gloo on CPU, NCCL on GPU).

Every rank builds the same stack of ``Linear`` layers (widths chosen to span
the factor sizes of a detector's convs), collects one statistics step, and
then times ``update_preconditioners`` at a Newton step, i.e. the refresh of
every factor: sharded (the default: each factor on one rank, results
broadcast) and replicated (every rank computes everything).  Each process
uses one thread, so the ranks do not compete for the same cores.

Run::

    python benchmarks/bench_dist_inverse.py [--ranks 1 2] [--widths ...]
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
           repeat: int, out: str) -> None:
    from mmprecond.optim import NKFAC

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]
    model = nn.Sequential(*layers)
    opt = NKFAC(model.parameters(), model=model, shard_inverses=shard,
                inv_interval=1000)
    model(torch.randn(4 * max(widths), widths[0])).square().mean().backward()
    opt.step()
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        opt.update_preconditioners(3000)  # a Newton refresh of every factor
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        with open(out, 'w') as f:
            f.write(str(statistics.median(times)))
    dist.destroy_process_group()


def measure(world: int, widths: List[int], shard: bool, repeat: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 't')
        mp.spawn(worker, args=(world, free_port(), widths, shard, repeat, out),
                 nprocs=world, join=True)
        with open(out) as f:
            return float(f.read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--ranks', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--widths', type=int, nargs='+',
                        default=[1152, 576, 1152, 256, 768, 512, 1024, 256])
    parser.add_argument('--repeat', type=int, default=3)
    args = parser.parse_args()
    dims = sorted({d for w in args.widths for d in (w, w + 1)})
    print(f'gloo/CPU, 1 thread per rank, {len(args.widths) - 1} Linear layers, '
          f'factor sizes {dims[0]}..{dims[-1]}')
    print(f"{'ranks':>5} {'mode':>10} {'inverse phase s':>16} {'vs 1 rank':>10}")
    base = None
    for world in args.ranks:
        for shard in ((False, ) if world == 1 else (True, False)):
            t = measure(world, args.widths, shard, args.repeat)
            base = t if base is None else base
            mode = 'sharded' if shard else 'replicated'
            print(f'{world:>5} {mode:>10} {t:>16.3f} {t / base:>10.2f}')


if __name__ == '__main__':
    main()

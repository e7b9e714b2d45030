# Copyright (c) mmprecond contributors. All rights reserved.
"""AdamR vs AdamW: time per iteration and optimizer-state memory.

Trains two copies of the demo Faster R-CNN (same initial weights, same
batches) in one process, alternating one AdamW iteration and one AdamR
iteration, so that both see the same machine load.  Each iteration is a
full ``model.train_step`` (forward, backward, clipping, optimizer step) on
batches held in memory.

AdamR runs with short intervals (``--stat-interval``, ``--basis-interval``)
so that each kind of step is timed:

* *rotated*: a step with a basis and no statistics (most steps);
* *statistics*: a step that also collects and folds ``L``, ``R``;
* *basis*: a step that also eigendecomposes every factor (fp64).

The amortised cost at the thesis' intervals (``T_s=100``, ``T_u=1000``) is
``rotated + (statistics - rotated) / 100 + (basis - statistics) / 1000``.
Times are medians over the iterations of each kind.

Run::

    python benchmarks/bench_adamr.py [--iters 60] [--device cpu]
"""
import argparse
import copy
import itertools
import statistics
import tempfile
import time
from typing import Dict, List

import torch
from adamr_common import demo_config, ensure_data, optim_wrapper, state_bytes
from mmengine.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS, init_default_scope
from mmengine.runner import Runner


def build(model: torch.nn.Module, wrapper_cfg: dict):
    """An optim wrapper for ``model`` through the mmprecond constructor."""
    wrapper_cfg = copy.deepcopy(wrapper_cfg)
    constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(
        dict(type=wrapper_cfg.pop('constructor'),
             optim_wrapper_cfg=wrapper_cfg,
             paramwise_cfg=wrapper_cfg.pop('paramwise_cfg', None)))
    return constructor(model)


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-root', default=None,
                        help='synthetic COCO root (default: a temporary one)')
    parser.add_argument('--iters', type=int, default=60)
    parser.add_argument('--batches', type=int, default=8,
                        help='distinct batches cycled through')
    parser.add_argument('--stat-interval', type=int, default=5)
    parser.add_argument('--basis-interval', type=int, default=20)
    parser.add_argument('--max-factor-dim', type=int, default=8192)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=0,
                        help='torch CPU threads (0: leave as is)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = args.data_root or tempfile.mkdtemp(prefix='bench_adamr_')
    ensure_data(root, num_train=4 * args.batches, num_val=1)
    cfg = demo_config(root)
    init_default_scope(cfg.default_scope)
    import mmprecond  # noqa: F401  (registers AdamR and the constructor)

    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    batches = list(itertools.islice(iter(loader), args.batches))
    torch.manual_seed(0)
    base = MODELS.build(cfg.model).to(args.device)
    base.init_weights()
    models = dict(AdamW=base, AdamR=copy.deepcopy(base))
    hp = dict(lr=2e-3, weight_decay=0.05)
    wrappers = dict(
        AdamW=build(models['AdamW'], optim_wrapper('AdamW', **hp)),
        AdamR=build(models['AdamR'], optim_wrapper(
            'AdamR', stat_interval=args.stat_interval,
            refresh_interval=args.refresh_interval,
            max_factor_dim=args.max_factor_dim, **hp)))
    times: Dict[str, List[float]] = {name: [] for name in models}
    for it in range(args.iters):
        data = batches[it % len(batches)]
        for name, model in models.items():
            model.train()
            sync(args.device)
            start = time.perf_counter()
            model.train_step(data, wrappers[name])
            sync(args.device)
            times[name].append(time.perf_counter() - start)

    s, u, skip = args.stat_interval, args.refresh_interval, 2
    adamw = statistics.median(times['AdamW'][skip:])
    kinds: Dict[str, List[float]] = dict(rotated=[], statistics=[], basis=[])
    for t, dt in enumerate(times['AdamR']):
        if t < u:
            continue  # identity basis: not representative
        kind = 'basis' if t % u == 0 else 'statistics' if t % s == 0 else 'rotated'
        kinds[kind].append(dt)
    med = {k: statistics.median(v) for k, v in kinds.items() if v}
    amortised = (med['rotated'] + (med['statistics'] - med['rotated']) / 100 +
                 (med['basis'] - med['statistics']) / 1000)
    mem = {name: state_bytes(w.optimizer) for name, w in wrappers.items()}
    adamw_mb = sum(mem['AdamW'].values()) / 2**20

    n_params = sum(p.numel() for p in base.parameters())
    print(f'\ndemo Faster R-CNN ({n_params / 1e6:.2f} M params), '
          f'{args.device}, {torch.get_num_threads()} threads, '
          f'{args.iters} iterations (median ms)')
    print('| optimizer / step | ms / iter | x AdamW |')
    print('|---|---|---|')
    print(f'| AdamW | {adamw * 1e3:.0f} | 1.00 |')
    for kind in ('rotated', 'statistics', 'basis'):
        if kind in med:
            print(f'| AdamR, {kind} step (n={len(kinds[kind])}) | '
                  f'{med[kind] * 1e3:.0f} | {med[kind] / adamw:.2f} |')
    print(f'| AdamR, amortised at T_s=100, T_u=1000 | {amortised * 1e3:.0f} | '
          f'{amortised / adamw:.2f} |')
    print('\n| optimizer | state MB | moments | factors L,R | bases U1,U2 | '
          'x AdamW |')
    print('|---|---|---|---|---|---|')
    for name, parts in mem.items():
        total = sum(parts.values()) / 2**20
        print(f"| {name} | {total:.2f} | {parts['moments'] / 2**20:.2f} | "
              f"{parts['factors'] / 2**20:.2f} | {parts['bases'] / 2**20:.2f} | "
              f'{total / adamw_mb:.2f} |')


if __name__ == '__main__':
    main()

# Copyright (c) mmprecond contributors. All rights reserved.
"""AdamR moment handling at a basis change: ``'keep'`` vs ``'project'``.

Trains the demo Faster R-CNN (ResNet-18-tiny FPN) on the synthetic shapes
set once per variant, from the same seed (same initial weights, same data
order), with the demo's AdamW hyper-parameters and schedule shortened to
``--iters``, and reports

* the mean training loss of the first and of the last ``--window``
  iterations,
* bbox mAP / mAP@0.5 on the validation split after training,
* wall-clock training time.

AdamW itself can be added as a reference (``--variants keep project adamw``).
Results go to stdout as a table and to ``<work-dir>/adamr_moments.json``.

Run::

    python benchmarks/adamr_moments.py --iters 1000 --stat-interval 10 \
        --basis-interval 100 --variants keep project adamw
"""
import argparse
import json
import os
import os.path as osp
import time
from typing import Any, Dict, List

from adamr_common import demo_config, ensure_data, optim_wrapper
from mmengine.hooks import Hook
from mmengine.runner import Runner


class LossRecorder(Hook):
    """Keeps the total training loss of every iteration."""

    def __init__(self) -> None:
        self.losses: List[float] = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        self.losses.append(float(outputs['loss']))


def train_one(variant: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Train and evaluate one variant; return its numbers."""
    work_dir = osp.join(args.work_dir, variant)
    cfg = demo_config(args.data_root, work_dir)
    common = dict(lr=args.lr, weight_decay=args.weight_decay)
    if variant == 'adamw':
        cfg.optim_wrapper = optim_wrapper('AdamW', **common)
    else:
        cfg.optim_wrapper = optim_wrapper(
            'AdamR', stat_interval=args.stat_interval,
            basis_interval=args.basis_interval, moment_projection=variant,
            max_factor_dim=args.max_factor_dim,
            **common)
    iters = args.iters
    warmup = max(1, iters // 10)
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters + 1  # evaluated once, below
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
             end=warmup),
        dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup, end=iters,
             T_max=iters - warmup, eta_min=args.lr * 0.01),
    ]
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 50
    cfg.randomness = dict(seed=args.seed)
    runner = Runner.from_cfg(cfg)
    recorder = LossRecorder()
    runner.register_hook(recorder)
    start = time.perf_counter()
    runner.train()
    train_s = time.perf_counter() - start
    metrics = runner.val_loop.run()
    losses, w = recorder.losses, args.window
    out = dict(
        variant=variant,
        first_loss=sum(losses[:w]) / w,
        final_loss=sum(losses[-w:]) / w,
        bbox_mAP=float(metrics['coco/bbox_mAP']),
        bbox_mAP_50=float(metrics['coco/bbox_mAP_50']),
        train_s=train_s,
        losses=losses)
    optimizer = runner.optim_wrapper.optimizer
    if hasattr(optimizer, 'fallbacks'):
        out['fallbacks'] = dict(optimizer.fallbacks.counts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--data-root', default=osp.join('data', 'synthetic_coco'))
    parser.add_argument('--num-train', type=int, default=400)
    parser.add_argument('--num-val', type=int, default=100)
    parser.add_argument('--work-dir', default=osp.join('work_dirs', 'adamr_moments'))
    parser.add_argument('--iters', type=int, default=1000)
    parser.add_argument('--window', type=int, default=50,
                        help='iterations averaged for first / final loss')
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--weight-decay', type=float, default=0.05)
    parser.add_argument('--stat-interval', type=int, default=10)
    parser.add_argument('--basis-interval', type=int, default=100)
    parser.add_argument('--max-factor-dim', type=int, default=8192)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--variants', nargs='+', default=['keep', 'project'],
                        choices=['keep', 'project', 'adamw'])
    args = parser.parse_args()
    ensure_data(args.data_root, args.num_train, args.num_val, seed=0)
    os.makedirs(args.work_dir, exist_ok=True)
    results = []
    for variant in args.variants:
        results.append(train_one(variant, args))
        with open(osp.join(args.work_dir, 'adamr_moments.json'), 'w') as f:
            json.dump(dict(args=vars(args), results=results), f, indent=1)
    print(f'\n{args.iters} iterations, T_s={args.stat_interval}, '
          f'T_u={args.basis_interval}, lr={args.lr}, wd={args.weight_decay}, '
          f'seed={args.seed}')
    w = args.window
    print(f'| variant | loss (first {w}) | loss (last {w}) | bbox mAP | '
          'mAP@0.5 | train s |')
    print('|---|---|---|---|---|---|')
    for r in results:
        print(f"| {r['variant']} | {r['first_loss']:.4f} | {r['final_loss']:.4f} "
              f"| {r['bbox_mAP']:.3f} | {r['bbox_mAP_50']:.3f} | "
              f"{r['train_s']:.0f} |")


if __name__ == '__main__':
    main()

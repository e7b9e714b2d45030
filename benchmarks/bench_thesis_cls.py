# Copyright (c) mmprecond contributors. All rights reserved.
"""K-BFGS, K-BFGS(L), TNT and TNT-EF vs SGD-m and AdamW on a real classifier.

Trains the demo classifier (mmpretrain ResNet-18, 4x narrower) on the
synthetic shapes set with each optimizer's config from ``configs/kbfgs``
and ``configs/tnt`` (SGD-m and AdamW as references, measured in the same
run), ``--epochs`` epochs per run, for every seed of ``--seeds``; each run
starts from the seed's initial weights and data order.  Reports, as mean ±
std over seeds:

* the mean training loss of the first and of the last ``--window``
  iterations,
* top-1 accuracy on the validation split after training,
* training seconds per iteration, and its ratio to SGD-m and to AdamW.

Run (one process; 18 runs, about 21 minutes on 2 shared cores)::

    python benchmarks/bench_thesis_cls.py --epochs 6 --num-train 640 \
        --window 20 --seeds 0 1 2

Results (torch 2.14.1, CPU): see "Measured cost" in README.md.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import sys
import time
from typing import Any, Dict, List

from adamr_moments import LossRecorder
from mmengine.config import Config
from mmengine.runner import Runner

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = dict(
    sgd='configs/demo/resnet18-tiny_adamw_synthetic-cls.py',
    adamw='configs/demo/resnet18-tiny_adamw_synthetic-cls.py',
    kbfgs='configs/kbfgs/resnet18-tiny_kbfgs_synthetic-cls.py',
    kbfgs_l='configs/kbfgs/resnet18-tiny_kbfgs-l_synthetic-cls.py',
    tnt='configs/tnt/resnet18-tiny_tnt_synthetic-cls.py',
    tnt_ef='configs/tnt/resnet18-tiny_tnt-ef_synthetic-cls.py',
)
#: SGD with momentum on the demo classifier (torch semantics, lr tuned the
#: same way as the others, see --help).
SGD = dict(type='SGD', lr=0.05, momentum=0.9, weight_decay=5e-4)


def build_cfg(variant: str, args: argparse.Namespace, seed: int) -> Config:
    cfg = Config.fromfile(osp.join(REPO, CONFIGS[variant]))
    if variant == 'sgd':
        cfg.optim_wrapper.optimizer = SGD
    for split in ('train', 'val', 'test'):
        loader = cfg[f'{split}_dataloader']
        loader.dataset.data_root = args.data_root + '/'
        loader.num_workers = 0
        loader.persistent_workers = False
    cfg.train_cfg.max_epochs = args.epochs
    cfg.train_cfg.val_interval = args.epochs + 1  # evaluated once, below
    warmup = 1 if args.epochs > 1 else 0
    cfg.param_scheduler = ([
        dict(type='LinearLR', start_factor=0.1, by_epoch=True, begin=0,
             end=warmup, convert_to_iter_based=True)
    ] if warmup else []) + [
        dict(type='CosineAnnealingLR', by_epoch=True, begin=warmup,
             end=args.epochs, eta_min_ratio=0.01, convert_to_iter_based=True)
    ]
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 50
    cfg.randomness = dict(seed=seed)
    cfg.work_dir = osp.join(args.work_dir, f'{variant}_seed{seed}')
    return cfg


def train_one(variant: str, args: argparse.Namespace, seed: int) -> Dict[str, Any]:
    runner = Runner.from_cfg(build_cfg(variant, args, seed))
    recorder = LossRecorder()
    runner.register_hook(recorder)
    start = time.perf_counter()
    runner.train()
    train_s = time.perf_counter() - start
    metrics = runner.val_loop.run()
    losses, w = recorder.losses, args.window
    return dict(
        variant=variant, seed=seed, iters=len(losses),
        loss_first=sum(losses[:w]) / w, loss_last=sum(losses[-w:]) / w,
        top1=float(metrics['accuracy/top1']),
        s_per_iter=train_s / len(losses))


def mean_std(values: List[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.3f} ± {sd:.3f}'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--variants', nargs='+', default=list(CONFIGS))
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=4)
    parser.add_argument('--window', type=int, default=20)
    parser.add_argument('--num-train', type=int, default=1000)
    parser.add_argument('--num-val', type=int, default=250)
    parser.add_argument('--data-root', default='data/synthetic_cls')
    parser.add_argument('--work-dir', default='work_dirs/bench_thesis_cls')
    args = parser.parse_args()
    from mmprecond.datasets import ensure_synthetic_cls
    ensure_synthetic_cls(args.data_root, num_train=args.num_train,
                         num_val=args.num_val, seed=0)
    os.makedirs(args.work_dir, exist_ok=True)
    runs = [train_one(v, args, s) for s in args.seeds for v in args.variants]
    rows = {v: [r for r in runs if r['variant'] == v] for v in args.variants}
    ref = {
        k: statistics.mean(r['s_per_iter'] for r in rows[k])
        for k in ('sgd', 'adamw') if k in rows
    }
    print(f'\n{args.epochs} epochs, seeds {args.seeds}, '
          f'{rows[args.variants[0]][0]["iters"]} iterations per run')
    print('| optimizer | loss first | loss last | top-1 (%) | s/iter | '
          'x SGD-m | x AdamW |')
    print('|---|---|---|---|---|---|---|')
    for v, rs in rows.items():
        t = statistics.mean(r['s_per_iter'] for r in rs)
        ratios = [f'{t / ref[k]:.2f}' if k in ref else '-' for k in ('sgd', 'adamw')]
        print(f'| {v} | {mean_std([r["loss_first"] for r in rs])} | '
              f'{mean_std([r["loss_last"] for r in rs])} | '
              f'{mean_std([r["top1"] for r in rs])} | {t:.3f} | '
              f'{ratios[0]} | {ratios[1]} |')
    with open(osp.join(args.work_dir, 'results.json'), 'w') as f:
        json.dump(runs, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())

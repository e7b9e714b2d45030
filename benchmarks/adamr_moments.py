# Copyright (c) mmprecond contributors. All rights reserved.
"""AdamR variants vs AdamW on the two demos, several seeds.

Trains, for every ``--variants`` x ``--seeds``, either the demo Faster R-CNN
(``--task det``: ``configs/demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py``,
ResNet-18-tiny FPN on the synthetic shapes set) or the demo classifier
(``--task cls``: ``configs/demo/resnet18-tiny_adamw_synthetic-cls.py``) with
the demo's AdamW hyper-parameters, the schedule shortened to ``--iters``
(linear warm-up over the first 10 %, then cosine), and the optimizer
swapped.  Each run appends one JSON line (first / final training loss,
bbox mAP or top-1, time, fallback counts) to ``<work-dir>/runs.jsonl``;
``--summarize`` prints mean +- std per variant from that file.

Variants (:data:`VARIANTS`): ``adamw``; ``adamr`` (AdamR's defaults);
``rotate`` (the previous default, with which the docs' rows labelled
``'rotate'`` were measured);
``algorithm6`` (the thesis box: moments carried over unchanged, also at the
first basis); ``old-project`` (the previous default: squared-rotation
projection, no reset at the first basis); ``adamr-power`` (defaults plus a
power-step refresh every ``T_s``).

Run (one process, runs one after another)::

    python benchmarks/adamr_moments.py --task det --iters 1000 \
        --variants adamw adamr --seeds 0 1 2
    python benchmarks/adamr_moments.py --task det --summarize
"""
import argparse
import json
import os
import os.path as osp
import statistics
import time
from typing import Any, Dict, List

from adamr_common import REPO_ROOT, demo_config, ensure_data, optim_wrapper
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

CLS_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo',
                      'resnet18-tiny_adamw_synthetic-cls.py')

#: Optimizer of each variant: (type, extra keyword arguments).
VARIANTS: Dict[str, tuple] = {
    'adamw': ('AdamW', {}),
    'adamr': ('AdamR', {}),
    'rotate': ('AdamR', dict(moment_projection='rotate')),
    'algorithm6': ('AdamR', dict(moment_projection='algorithm6')),
    'old-project': ('AdamR', dict(moment_projection='project',
                                  reset_first_basis=False)),
    'adamr-power': ('AdamR', dict(power_interval='stat')),
}

#: The evaluation metric of each task.
METRIC = dict(det='coco/bbox_mAP', cls='accuracy/top1')


class LossRecorder(Hook):
    """Keeps the total training loss of every iteration."""

    def __init__(self) -> None:
        self.losses: List[float] = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        self.losses.append(float(outputs['loss']))


def cls_config(data_root: str, work_dir: str) -> Config:
    """The classification demo reading ``data_root``, iteration-based."""
    cfg = Config.fromfile(CLS_CONFIG)
    for split in ('train', 'val', 'test'):
        loader = cfg[f'{split}_dataloader']
        loader.dataset.data_root = osp.join(data_root, '')
        loader.num_workers = 0
        loader.persistent_workers = False
    cfg.work_dir = work_dir
    cfg.log_processor = dict(by_epoch=False)
    return cfg


def build_config(variant: str, seed: int, args: argparse.Namespace) -> Config:
    """The config of one run."""
    work_dir = osp.join(args.work_dir, f'{variant}_seed{seed}')
    if args.task == 'det':
        cfg = demo_config(args.data_root, work_dir)
    else:
        cfg = cls_config(args.data_root, work_dir)
    kind, extra = VARIANTS[variant]
    kwargs = dict(lr=args.lr, weight_decay=args.weight_decay)
    if kind == 'AdamR':
        kwargs.update(stat_interval=args.stat_interval,
                      refresh_interval=args.refresh_interval,
                      max_factor_dim=args.max_factor_dim, **extra)
        if kwargs.get('power_interval') == 'stat':
            kwargs['power_interval'] = args.stat_interval
    wrapper = optim_wrapper(kind, **kwargs)
    if args.task == 'cls':
        wrapper.pop('clip_grad')  # the classification demo does not clip
    cfg.optim_wrapper = wrapper
    iters = args.iters
    warmup = max(1, iters // 10)
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters,
                         val_interval=iters + 1)  # evaluated once, below
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
             end=warmup),
        dict(type='CosineAnnealingLR', by_epoch=False, begin=warmup, end=iters,
             T_max=iters - warmup, eta_min=args.lr * 0.01),
    ]
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = 50
    cfg.randomness = dict(seed=seed)
    return cfg


def train_one(variant: str, seed: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Train and evaluate one run; return its numbers."""
    runner = Runner.from_cfg(build_config(variant, seed, args))
    recorder = LossRecorder()
    runner.register_hook(recorder)
    start = time.perf_counter()
    runner.train()
    train_s = time.perf_counter() - start
    metrics = runner.val_loop.run()
    losses, w = recorder.losses, args.window
    out = dict(
        task=args.task, variant=variant, seed=seed, iters=args.iters,
        stat_interval=args.stat_interval, refresh_interval=args.refresh_interval,
        first_loss=sum(losses[:w]) / w, final_loss=sum(losses[-w:]) / w,
        metric=float(metrics[METRIC[args.task]]), train_s=train_s)
    optimizer = runner.optim_wrapper.optimizer
    if hasattr(optimizer, 'sync_fallbacks'):
        optimizer.sync_fallbacks()
    if hasattr(optimizer, 'fallbacks'):
        out['fallbacks'] = dict(optimizer.fallbacks.counts)
    return out


def summarize(path: str, task: str) -> None:
    """Print mean +- std per variant (and schedule) of ``runs.jsonl``."""
    with open(path) as f:
        runs = [json.loads(line) for line in f if line.strip()]
    rows: Dict[tuple, List[dict]] = {}
    for r in runs:
        if r['task'] == task:
            key = (r['variant'], r['iters'], r['stat_interval'],
                   r['refresh_interval'])
            rows.setdefault(key, []).append(r)
    name = 'bbox mAP' if task == 'det' else 'top-1 (%)'
    print(f'| variant | iters | T_s / T_u | seeds | final loss | {name} |')
    print('|---|---|---|---|---|---|')
    for (variant, iters, ts, tu), rs in rows.items():
        print(f'| {variant} | {iters} | {ts} / {tu} | '
              f"{','.join(str(r['seed']) for r in rs)} | "
              f"{_mean_std([r['final_loss'] for r in rs])} | "
              f"{_mean_std([r['metric'] for r in rs])} |")


def _mean_std(values: List[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.4f} +- {std:.4f}'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--task', choices=['det', 'cls'], default='det')
    parser.add_argument('--data-root', default=None,
                        help='default: data/synthetic_coco or data/synthetic_cls')
    parser.add_argument('--work-dir', default=None,
                        help='default: work_dirs/adamr_moments_<task>')
    parser.add_argument('--iters', type=int, default=1000)
    parser.add_argument('--window', type=int, default=50,
                        help='iterations averaged for first / final loss')
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--weight-decay', type=float, default=0.05)
    parser.add_argument('--stat-interval', type=int, default=10)
    parser.add_argument('--basis-interval', type=int, default=100)
    parser.add_argument('--max-factor-dim', type=int, default=8192)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--variants', nargs='+', default=['adamw', 'adamr'],
                        choices=list(VARIANTS))
    parser.add_argument('--summarize', action='store_true',
                        help='only print the table of the runs so far')
    args = parser.parse_args()
    args.data_root = args.data_root or osp.join(
        'data', 'synthetic_coco' if args.task == 'det' else 'synthetic_cls')
    args.work_dir = args.work_dir or osp.join('work_dirs',
                                              f'adamr_moments_{args.task}')
    path = osp.join(args.work_dir, 'runs.jsonl')
    if args.summarize:
        summarize(path, args.task)
        return
    if args.task == 'det':
        ensure_data(args.data_root, num_train=400, num_val=100, seed=0)
    else:
        from mmprecond.datasets import ensure_synthetic_cls
        ensure_synthetic_cls(args.data_root, seed=0)
    os.makedirs(args.work_dir, exist_ok=True)
    for seed in args.seeds:
        for variant in args.variants:
            result = train_one(variant, seed, args)
            with open(path, 'a') as f:
                f.write(json.dumps(result) + '\n')
            print(json.dumps(result), flush=True)
    summarize(path, args.task)


if __name__ == '__main__':
    main()

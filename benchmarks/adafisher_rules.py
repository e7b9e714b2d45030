# Copyright (c) mmprecond contributors. All rights reserved.
"""AdaFisher's two statistics rules, measured on the synthetic tasks.

The paper (eq. 3) and the released code fold the Kronecker diagonals
differently (see :class:`mmprecond.optim.AdaFisher`); at equal ``lr`` the
paper's rule takes steps up to ``1 / damping`` times smaller.  This trains
the demo detector (Faster R-CNN R18-tiny, synthetic COCO) or the demo
classifier (ResNet-18-tiny, synthetic shapes) with AdaFisher under each
rule, for several seeds, and prints the final training loss and the
validation metric (bbox mAP / top-1) as mean +- std.

Run (one process, minutes on 2 CPU cores)::

    python benchmarks/adafisher_rules.py --task det --iters 100 --seeds 0 1 2
    python benchmarks/adafisher_rules.py --task cls --epochs 20 --seeds 0 1 2
"""
import argparse
import os.path as osp
import statistics
import tempfile
import time
from typing import Dict, List

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO = dict(
    det=osp.join(REPO, 'configs/demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py'),
    cls=osp.join(REPO, 'configs/demo/resnet18-tiny_adamw_synthetic-cls.py'))
METRIC = dict(det='coco/bbox_mAP', cls='accuracy/top1')


def build_cfg(args, rule: str, seed: int, work_dir: str):
    from mmengine.config import Config

    from mmprecond.datasets import ensure_synthetic_cls, ensure_synthetic_coco

    cfg = Config.fromfile(DEMO[args.task])
    root = osp.join(REPO, 'data', f'bench_{args.task}')
    if args.task == 'det':
        ensure_synthetic_coco(root, num_train=64, num_val=16, seed=0)
    else:
        ensure_synthetic_cls(root, num_train=320, num_val=160, seed=0)
    for split in ('train', 'val', 'test'):
        loader = cfg[f'{split}_dataloader']
        loader.dataset.data_root = root + '/'
        loader.num_workers = 0
        loader.persistent_workers = False
        if args.task == 'det' and split != 'train':
            cfg[f'{split}_evaluator'].ann_file = (
                root + '/annotations/instances_val.json')
    if args.task == 'det':
        cfg.train_cfg.pop('_delete_', None)
        cfg.train_cfg.update(max_iters=args.iters, val_interval=args.iters)
        warm = args.iters // 10
        cfg.param_scheduler = [
            dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
                 end=warm),
            dict(type='CosineAnnealingLR', by_epoch=False, begin=warm,
                 end=args.iters, T_max=args.iters - warm, eta_min=0.0)]
    else:
        cfg.train_cfg.update(max_epochs=args.epochs, val_interval=args.epochs)
        cfg.param_scheduler = [dict(type='CosineAnnealingLR', by_epoch=True,
                                    T_max=args.epochs, eta_min=0.0)]
    cfg.optim_wrapper = dict(
        type='OptimWrapper', constructor='PrecondOptimWrapperConstructor',
        optimizer=dict(type='AdaFisher', lr=args.lr, weight_decay=args.wd,
                       damping=1e-3, gamma=0.8,
                       stat_interval=args.stat_interval, statistics=rule),
        clip_grad=dict(max_norm=10.0))
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10**6)
    cfg.default_hooks.logger.interval = 50
    cfg.randomness = dict(seed=seed)
    # one Runner after another in this process: MMEngine keeps visualizers
    # by name, so each run needs its own (else it writes to a removed dir)
    cfg.visualizer.name = f'adafisher_{rule}_{seed}_{time.time_ns()}'
    cfg.experiment_name = cfg.visualizer.name
    cfg.work_dir = work_dir
    cfg.log_level = 'WARNING'
    return cfg


def one_run(args, rule: str, seed: int) -> Dict[str, float]:
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    losses: List[float] = []

    class Losses(Hook):

        def after_train_iter(self, runner, batch_idx, data_batch=None,
                             outputs=None):
            losses.append(float(outputs['loss']))

    with tempfile.TemporaryDirectory() as work_dir:
        runner = Runner.from_cfg(build_cfg(args, rule, seed, work_dir))
        runner.register_hook(Losses())
        start = time.perf_counter()
        runner.train()
        seconds = time.perf_counter() - start
        metrics = runner.val_loop.run()
    tail = losses[-max(1, len(losses) // 10):]
    return dict(loss=sum(tail) / len(tail), metric=float(metrics[METRIC[args.task]]),
                seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--task', choices=('det', 'cls'), default='det')
    parser.add_argument('--iters', type=int, default=300, help='det only')
    parser.add_argument('--epochs', type=int, default=6, help='cls only')
    parser.add_argument('--lr', type=float, default=None)
    parser.add_argument('--wd', type=float, default=1e-4)
    parser.add_argument('--stat-interval', type=int, default=10)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--rules', nargs='+', default=['code', 'paper'])
    args = parser.parse_args()
    if args.lr is None:  # code rule: step ~ lr / damping, i.e. SGD-like 0.02 / 0.1
        args.lr = 2e-4 if args.task == 'det' else 1e-3

    rows = {}
    for rule in args.rules:
        rows[rule] = []
        for s in args.seeds:
            r = one_run(args, rule, s)
            rows[rule].append(r)
            print(f'{args.task} {rule:5s} seed {s}: loss {r["loss"]:.4f} '
                  f'{METRIC[args.task]} {r["metric"]:.4f} ({r["seconds"]:.0f} s)',
                  flush=True)
    print(f'task={args.task} lr={args.lr} wd={args.wd} '
          f'stat_interval={args.stat_interval} seeds={args.seeds}')
    for rule, runs in rows.items():
        cells = []
        for key in ('loss', 'metric'):
            vals = [r[key] for r in runs]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f'{key} {statistics.mean(vals):.4f} +- {std:.4f}')
        print(f'{rule:5s} ' + '  '.join(cells))


if __name__ == '__main__':
    main()

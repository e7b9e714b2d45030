# Copyright (c) mmprecond contributors. All rights reserved.
"""AFOpt / FSGD vs SGD and Ada_AFOpt / FAdam vs AdamW: time and state memory.

Trains copies of one small Swin detector (``configs/afopt`` RetinaNet or
Mask R-CNN with embed_dims 32, one block per stage, window 7, no
pretrained weights) on the synthetic shapes set, same initial weights and
same batches, in one process.  The optimizers take turns, one full
``model.train_step`` (forward, backward, clipping, step) each, so that they
see the same machine load.

The preconditioned optimizers run with short intervals
(``--stat-interval``, ``--inv-interval``) so that each kind of step is timed:

* *plain*: preconditioning only (most steps);
* *statistics*: a step that also records the statistics (attention:
  ``X``, ``Q``, ``K``, ``V``, ``A_s``; FSGD layers: ``X``) and folds them;
* *refresh*: a statistics step that also damps and inverts every statistic.

The amortised cost at the thesis' intervals (``T_s = 50``, ``T_u = 500``)
is ``plain + (statistics - plain) / 50 + (refresh - statistics) / 500``.
Times are medians over the iterations of each kind (the first refresh, at
step 0, is left out as warm-up).

Run::

    python benchmarks/bench_afopt.py [--iters 60] [--detector retinanet]
"""
import argparse
import copy
import itertools
import os.path as osp
import statistics
import tempfile
import time
from typing import Dict, List

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, OPTIM_WRAPPER_CONSTRUCTORS, init_default_scope
from mmengine.runner import Runner

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DETECTORS = dict(
    retinanet=('retinanet_swin-t-p4-w7_fpn_afopt-1x_coco.py',
               'synthetic_coco_detection.py'),
    mask_rcnn=('mask-rcnn_swin-t-p4-w7_fpn_ada-afopt-1x_coco.py',
               'synthetic_coco_instance.py'))
#: (optimizer, baseline it is compared with, hyper-parameters)
OPTIMIZERS = [
    ('SGD', 'SGD', dict(lr=0.01, momentum=0.9, weight_decay=1e-4)),
    ('FSGD', 'SGD', dict(lr=0.01, momentum=0.9, weight_decay=1e-4)),
    ('AFOpt', 'SGD', dict(lr=0.01, momentum=0.9, weight_decay=1e-4)),
    ('AdamW', 'AdamW', dict(lr=1e-4, weight_decay=0.05)),
    ('FAdam', 'AdamW', dict(lr=1e-4, weight_decay=0.05)),
    ('Ada_AFOpt', 'AdamW', dict(lr=1e-4, weight_decay=0.05)),
]


def small_swin_config(detector: str, data_root: str) -> Config:
    """The ``configs/afopt`` detector, shrunk, reading ``data_root``."""
    config, data_base = DETECTORS[detector]
    cfg = Config.fromfile(osp.join(REPO_ROOT, 'configs', 'afopt', config))
    data = Config.fromfile(
        osp.join(REPO_ROOT, 'configs', '_base_', 'datasets', data_base))
    cfg.train_dataloader = data.train_dataloader
    cfg.train_dataloader.update(batch_size=2, num_workers=0,
                                persistent_workers=False)
    cfg.train_dataloader.dataset.data_root = osp.join(data_root, '')
    cfg.model.backbone.update(embed_dims=32, depths=(1, 1, 1, 1),
                              num_heads=(1, 2, 4, 8), window_size=7,
                              drop_path_rate=0.0, init_cfg=None)
    widths = [32 * 2**i for i in range(4)]
    cfg.model.neck.in_channels = widths[-len(cfg.model.neck.in_channels):]
    cfg.model.neck.out_channels = 64
    if 'bbox_head' in cfg.model:
        cfg.model.bbox_head.update(in_channels=64, feat_channels=64,
                                   stacked_convs=2, num_classes=5)
    else:
        cfg.model.rpn_head.update(in_channels=64, feat_channels=64)
        roi = cfg.model.roi_head
        roi.bbox_roi_extractor.out_channels = 64
        roi.bbox_head.update(in_channels=64, fc_out_channels=128, num_classes=5)
        roi.mask_roi_extractor.out_channels = 64
        roi.mask_head.update(in_channels=64, conv_out_channels=64, num_convs=2,
                             num_classes=5)
        cfg.model.train_cfg.rcnn.sampler.num = 64
    return cfg


def build(model: torch.nn.Module, cfg: Config, optimizer: dict):
    """An optim wrapper (the config's paramwise_cfg, clipping 10)."""
    wrapper = copy.deepcopy(cfg.optim_wrapper.to_dict())
    wrapper['optimizer'] = optimizer
    wrapper['clip_grad'] = dict(max_norm=10.0)
    constructor = OPTIM_WRAPPER_CONSTRUCTORS.build(
        dict(type=wrapper.pop('constructor'), optim_wrapper_cfg=wrapper,
             paramwise_cfg=wrapper.pop('paramwise_cfg', None)))
    return constructor(model)


def state_mb(optimizer: torch.optim.Optimizer) -> Dict[str, float]:
    """MB of optimizer state: per-parameter buffers, statistics, inverses."""
    out = dict(buffers=0.0, statistics=0.0, inverses=0.0)
    for st in optimizer.state.values():
        out['buffers'] += sum(v.numel() * v.element_size()
                              for v in st.values() if torch.is_tensor(v)) / 2**20
    for st in getattr(optimizer, 'layer_state', {}).values():
        for key, v in st.items():
            kind = 'inverses' if key.endswith('_inv') else 'statistics'
            out[kind] += v.numel() * v.element_size() / 2**20
    return out


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--detector', choices=sorted(DETECTORS), default='retinanet')
    parser.add_argument('--data-root', default=None,
                        help='synthetic COCO root (default: a temporary one)')
    parser.add_argument('--iters', type=int, default=60)
    parser.add_argument('--batches', type=int, default=4,
                        help='distinct batches cycled through')
    parser.add_argument('--stat-interval', type=int, default=5)
    parser.add_argument('--inv-interval', type=int, default=20)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (0: leave as is)')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import mmprecond  # noqa: F401  (registers the optimizers, constructor)
    from mmprecond.datasets import ensure_synthetic_coco

    root = args.data_root or tempfile.mkdtemp(prefix='bench_afopt_')
    ensure_synthetic_coco(root, num_train=2 * args.batches, num_val=1, seed=0)
    cfg = small_swin_config(args.detector, root)
    init_default_scope('mmdet')
    loader = Runner.build_dataloader(cfg.train_dataloader, seed=0)
    batches = list(itertools.islice(iter(loader), args.batches))
    torch.manual_seed(0)
    base = MODELS.build(cfg.model).to(args.device)
    base.init_weights()
    intervals = dict(stat_interval=args.stat_interval,
                     refresh_interval=args.refresh_interval)
    models, wrappers = {}, {}
    for name, _, hp in OPTIMIZERS:
        models[name] = copy.deepcopy(base)
        extra = {} if name in ('SGD', 'AdamW') else intervals
        wrappers[name] = build(models[name], cfg, dict(type=name, **hp, **extra))
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

    s, u = args.stat_interval, args.refresh_interval
    rows = {}
    for name, baseline, _ in OPTIMIZERS:
        if name == baseline:
            rows[name] = dict(plain=statistics.median(times[name][2:]))
            continue
        kinds: Dict[str, List[float]] = dict(plain=[], statistics=[], refresh=[])
        for t, dt in enumerate(times[name]):
            if t == 0:
                continue
            kind = 'refresh' if t % u == 0 else 'statistics' if t % s == 0 else 'plain'
            kinds[kind].append(dt)
        med = {k: statistics.median(v) for k, v in kinds.items() if v}
        med['amortised'] = (med['plain'] + (med['statistics'] - med['plain']) / 50
                            + (med.get('refresh', med['statistics'])
                               - med['statistics']) / 500)
        rows[name] = med

    n_params = sum(p.numel() for p in base.parameters())
    print(f'\nsmall Swin {args.detector} ({n_params / 1e6:.2f} M params), '
          f'{args.device}, {torch.get_num_threads()} thread(s), {args.iters} '
          f'iterations, intervals {s}/{u} (median ms per iteration)')
    print('| optimizer | plain | statistics | refresh | amortised 50/500 | '
          'x baseline |')
    print('|---|---|---|---|---|---|')
    for name, baseline, _ in OPTIMIZERS:
        r = rows[name]
        ref = rows[baseline]['plain']
        if name == baseline:
            print(f"| {name} | {r['plain'] * 1e3:.0f} | | | | 1.00 |")
            continue
        print(f"| {name} | {r['plain'] * 1e3:.0f} | {r['statistics'] * 1e3:.0f} | "
              f"{r.get('refresh', float('nan')) * 1e3:.0f} | "
              f"{r['amortised'] * 1e3:.0f} | {r['amortised'] / ref:.2f} |")
    print('\n| optimizer | state MB | per-parameter buffers | statistics | '
          'inverses | x baseline |')
    print('|---|---|---|---|---|---|')
    mem = {name: state_mb(w.optimizer) for name, w in wrappers.items()}
    for name, baseline, _ in OPTIMIZERS:
        total = sum(mem[name].values())
        ref = sum(mem[baseline].values())
        m = mem[name]
        print(f"| {name} | {total:.2f} | {m['buffers']:.2f} | "
              f"{m['statistics']:.2f} | {m['inverses']:.2f} | {total / ref:.2f} |")
    print(f'\nparameters: {n_params * 4 / 2**20:.2f} MB in fp32')


if __name__ == '__main__':
    main()

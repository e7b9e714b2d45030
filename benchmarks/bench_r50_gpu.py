# Copyright (c) mmprecond contributors. All rights reserved.
"""Real-scale step time on a GPU: R50-FPN Faster R-CNN at 1333x800, batch 2.

The model is torchvision's ``fasterrcnn_resnet50_fpn`` (the same ResNet-50
FPN Faster R-CNN architecture as mmdet's ``faster-rcnn_r50_fpn_1x_coco``,
randomly initialised, every layer trainable); it runs where mmdet cannot,
because mmdet's RoI ops need mmcv's compiled CUDA extension.  The images are
random 1333x800 tensors with 8 random boxes each: only time is measured.

Each optimizer is timed by kind of step and amortised over its own
intervals, as ``bench_train_step.py`` does on the CPU::

    Kronecker (NKFAC, AdaNKFAC, KFAC):
        t_plain + (t_stat - t_plain) / T_stat + t_newton / T_inv
                + (t_exact - t_newton) / (C T_inv)
    AdamR:
        t_plain + (t_stat - t_plain) / T_s + t_basis / T_u

``t_*`` are whole iterations (forward, backward, ``step``), medians of CUDA-
synchronised wall times; refreshes are timed alone.  With ``--sync-check``
three plain and three statistics ``step()`` calls (after the first
refresh) run under ``torch.cuda.set_sync_debug_mode('warn')``, and the
synchronisation warnings each one raises are counted.

Run::

    python benchmarks/bench_r50_gpu.py [--iters 10] [--amp]
"""
import argparse
import copy
import json
import statistics
import time
import warnings
from typing import Callable, Dict, List, Optional

import torch

#: lr 0.002 for the SGD family: with mmdet's 0.02 (meant for 16 images and
#: pre-trained weights) the randomly initialised model diverges to NaN, and
#: the Kronecker optimizers would be timed on their non-finite fallbacks.
OPTIMIZERS = {
    'SGD': dict(type='SGD', lr=0.002, momentum=0.9, weight_decay=1e-4),
    'AdamW': dict(type='AdamW', lr=1e-4, weight_decay=0.05),
    'NKFAC': dict(type='NKFAC', lr=0.002, weight_decay=1e-4),
    'AdaNKFAC': dict(type='AdaNKFAC', lr=1e-4, weight_decay=0.2),
    'KFAC': dict(type='KFAC', lr=0.002, weight_decay=1e-4),
    'AdamR': dict(type='AdamR', lr=1e-4, weight_decay=0.05),
}


def build_optimizer(model: torch.nn.Module, cfg: dict) -> torch.optim.Optimizer:
    import mmprecond.optim as precond

    cfg = dict(cfg)
    kind = cfg.pop('type')
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == 'SGD':
        return torch.optim.SGD(params, foreach=True, **cfg)
    if kind == 'AdamW':
        return torch.optim.AdamW(params, foreach=True, **cfg)
    return getattr(precond, kind)(params, model=model, **cfg)


def timed(fn: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        total += sum(v.numel() * v.element_size() for v in st.values()
                     if torch.is_tensor(v))
    for st in getattr(opt, 'layer_state', {}).values():
        total += sum(v.numel() * v.element_size() for v in st.values()
                     if torch.is_tensor(v))
    return total


def measure(name: str, model0: torch.nn.Module, images: List[torch.Tensor],
            targets: List[dict], iters: int, sync_check: bool,
            amp: bool) -> dict:
    model = copy.deepcopy(model0).train()
    opt = build_optimizer(model, OPTIMIZERS[name])
    scaler = torch.amp.GradScaler('cuda') if amp else None
    if scaler is not None and hasattr(opt, 'attach_grad_scaler'):
        opt.attach_grad_scaler(scaler)

    def step(counts: Optional[List[int]] = None) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            if counts is not None:
                torch.cuda.set_sync_debug_mode('warn')
            try:
                if scaler is not None:
                    scaler.step(opt)
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        if counts is not None:
            counts.append(sum('synchroniz' in str(w.message).lower()
                              for w in caught))

    def iteration(counts: Optional[List[int]] = None) -> None:
        with torch.autocast('cuda', dtype=torch.float16, enabled=amp):
            losses = model(images, targets)
        loss = sum(losses.values())
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        step(counts)
        if scaler is not None:
            scaler.update()

    iteration()  # step 0: first statistics and preconditioners
    iteration()
    if hasattr(opt, 'refresh_interval'):  # AdamR: rotate every layer first
        opt.update_preconditioners(opt.refresh_interval)
    row: Dict[str, object] = {}
    if sync_check:  # count syncs inside step() on plain and statistics steps
        plain_counts: List[int] = []
        stat_counts: List[int] = []
        for _ in range(3):
            if getattr(opt, 'capture', None) is not None:
                opt.capture.active = False
            iteration(plain_counts)
        if getattr(opt, 'capture', None) is not None:
            for _ in range(3):
                opt.capture.active = True
                steps = opt.steps
                stat_int = opt.stat_interval
                opt.stat_interval = 1
                iteration(stat_counts)
                opt.stat_interval = stat_int
                assert opt.steps == steps + 1
        row['syncs_plain'] = plain_counts
        row['syncs_stat'] = stat_counts
    row['plain'] = timed(iteration, iters)
    row['iter'] = row['plain']
    if hasattr(opt, 'refresh_interval'):
        s_int, i_int = opt.stat_interval, opt.refresh_interval
        c = opt.exact_inv_period
        opt.stat_interval, opt.refresh_interval = 1, 10**9
        opt.capture.active = True
        row['stat'] = timed(iteration, max(3, iters // 2))
        opt.stat_interval, opt.refresh_interval = s_int, i_int
        row['newton'] = timed(lambda: opt.update_preconditioners(3 * i_int), 2)
        row['exact'] = timed(lambda: opt.update_preconditioners(0), 2)
        row['iter'] = (row['plain'] + (row['stat'] - row['plain']) / s_int +
                       row['newton'] / i_int +
                       (row['exact'] - row['newton']) / (c * i_int))
        row['intervals'] = [s_int, i_int, c]
    elif hasattr(opt, 'refresh_interval'):
        s_int, u_int = opt.stat_interval, opt.refresh_interval
        opt.stat_interval, opt.refresh_interval = 1, 10**9
        opt.capture.active = True
        row['stat'] = timed(iteration, max(3, iters // 2))
        opt.stat_interval, opt.refresh_interval = s_int, u_int
        row['basis'] = timed(lambda: opt.update_preconditioners(u_int), 2)
        # the timed basis refreshes made every layer rotated: re-time plain
        row['plain'] = timed(iteration, iters)
        row['iter'] = (row['plain'] + (row['stat'] - row['plain']) / s_int +
                       row['basis'] / u_int)
        row['intervals'] = [s_int, u_int]
    row['state_MB'] = state_bytes(opt) / 2**20
    row['layers'] = len(getattr(opt, 'layers', {}))
    fallbacks = getattr(opt, 'fallbacks', None)
    if fallbacks is not None:
        row['fallbacks'] = {k: int(v) for k, v in dict(fallbacks.counts).items()}
    return row


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--iters', type=int, default=10)
    parser.add_argument('--optimizers', nargs='+', default=list(OPTIMIZERS))
    parser.add_argument('--sync-check', action='store_true')
    parser.add_argument('--amp', action='store_true', help='fp16 autocast + '
                        'GradScaler')
    parser.add_argument('--json', default=None, help='write results here')
    args = parser.parse_args(argv)

    import torchvision

    torch.manual_seed(0)
    dev = torch.device('cuda')
    model0 = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=81).to(dev)
    gen = torch.Generator(device='cpu').manual_seed(0)
    images = [torch.rand(3, 800, 1333, generator=gen).to(dev) for _ in range(2)]
    targets = []
    for _ in range(2):
        xy = torch.rand(8, 2, generator=gen) * torch.tensor([1000., 600.])
        wh = 40 + torch.rand(8, 2, generator=gen) * 200
        targets.append(dict(boxes=torch.cat([xy, xy + wh], 1).to(dev),
                            labels=torch.randint(1, 81, (8, ), generator=gen).to(dev)))
    params = sum(p.numel() for p in model0.parameters())
    results = {}
    for name in args.optimizers:
        results[name] = measure(name, model0, images, targets, args.iters,
                                args.sync_check, args.amp)
        print(name, json.dumps(results[name]), flush=True)
    print(f'torchvision fasterrcnn_resnet50_fpn params={params / 1e6:.1f}M '
          f'1333x800 batch 2 torch={torch.__version__} '
          f'{torch.cuda.get_device_name()} amp={args.amp}')
    base = results.get('AdamW', {}).get('iter')
    print(f"{'optimizer':<9} {'plain s':>8} {'stat s':>8} {'refresh s':>14} "
          f"{'amort s/it':>10} {'vs AdamW':>8} {'state MB':>9} {'syncs plain/stat':>6}")
    for name, r in results.items():
        refresh = ('-' if 'newton' not in r and 'basis' not in r else
                   f"{r.get('newton', r.get('basis')):.3f}/"
                   f"{r.get('exact', float('nan')):.3f}")
        ratio = f"{r['iter'] / base:.3f}" if base else '-'
        stat = f"{r['stat']:.4f}" if 'stat' in r else '-'
        syncs = f"{r.get('syncs_plain', '-')}/{r.get('syncs_stat', '-')}"
        print(f"{name:<9} {r['plain']:>8.4f} {stat:>8} {refresh:>14} "
              f"{r['iter']:>10.4f} {ratio:>8} {r['state_MB']:>9.1f} {syncs}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()

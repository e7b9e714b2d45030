# Copyright (c) mmprecond contributors. All rights reserved.
"""Memory and FLOP budget of Kronecker factors vs ``max_factor_dim``.

Builds a real mmdet model (default: Faster R-CNN R50-FPN 1x) and, for each
``max_factor_dim`` policy, counts what NKFAC would hold and compute:

* factor memory: running factor + inverse per formed side, fp32;
* preconditioning FLOPs per step: ``2 (d_out^2 d_in + d_out d_in^2)`` with
  a skipped side costing nothing;
* refresh FLOPs per inverse interval: ``~4 d^3`` per side (one Newton step).

It also times, on this machine, the per-step preconditioning product of the
largest layer with and without its big side, to turn FLOPs into seconds.

Run::

    python benchmarks/factor_budget.py [--config mmdet::...] [--time]
"""
import argparse
import time

import torch


def layer_shapes(config: str):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.hub import get_config

    from mmprecond.curvature.capture import factor_dims, supported_reason

    register_all_modules()
    cfg = get_config(config)
    if 'init_cfg' in cfg.model.get('backbone', {}):
        cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    shapes = []
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and \
                supported_reason(m) is None and m.weight.requires_grad:
            shapes.append((name, *factor_dims(m)))
    return shapes


def budget(shapes, max_dim):
    mem = flops = refresh = 0
    skipped = []
    for name, d_out, d_in in shapes:
        sides = [d for d in (d_out, d_in) if d <= max_dim]
        if not sides:
            skipped.append(name)
            continue
        mem += sum(2 * d * d * 4 for d in sides)
        if d_out <= max_dim:
            flops += 2 * d_out * d_out * d_in
        if d_in <= max_dim:
            flops += 2 * d_out * d_in * d_in
        refresh += sum(4 * d**3 for d in sides)
    return mem, flops, refresh, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config',
                        default='mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    parser.add_argument('--time', action='store_true',
                        help='time the largest layer product on this machine')
    args = parser.parse_args()
    shapes = layer_shapes(args.config)
    top = sorted(shapes, key=lambda s: -(s[1]**2 * s[2] + s[1] * s[2]**2))[:5]
    print(f'{len(shapes)} preconditionable layers; largest by per-step cost:')
    for name, d_out, d_in in top:
        gf = 2 * (d_out**2 * d_in + d_out * d_in**2) / 1e9
        print(f'  {name:<40} {d_out:>5} x {d_in:<6} {gf:8.1f} GFLOP/step')
    print(f"{'max_factor_dim':>14} {'factor GB':>10} {'precond GFLOP/step':>19} "
          f"{'refresh TFLOP':>14} {'layers w/o precond':>19}")
    for max_dim in (10**9, 8192, 4096, 2048, 1024):
        mem, flops, refresh, skipped = budget(shapes, max_dim)
        label = 'none' if max_dim == 10**9 else str(max_dim)
        print(f'{label:>14} {mem / 1e9:>10.2f} {flops / 1e9:>19.1f} '
              f'{refresh / 1e12:>14.2f} {len(skipped):>19}')
    if args.time:
        name, d_out, d_in = top[0]
        g = torch.randn(d_out, d_in)
        left = torch.randn(d_out, d_out)
        right = torch.randn(d_in, d_in)
        for label, fn in (('both sides', lambda: left @ g @ right),
                          ('output side only', lambda: left @ g)):
            fn()
            t0 = time.perf_counter()
            fn()
            print(f'{name} ({label}): {time.perf_counter() - t0:.3f} s on '
                  f'{torch.get_num_threads()} CPU threads')


if __name__ == '__main__':
    main()

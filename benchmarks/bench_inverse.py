# Copyright (c) mmprecond contributors. All rights reserved.
"""Inverse-update cost: warm-started Newton vs Cholesky inverse vs eigh.

For every distinct Kronecker-factor size of mmdet's ResNet-50 FPN Faster
R-CNN (read off the real model built by mmdet), times one refresh
of a damped factor by

* ``newton``: one warm-started Newton-Schulz step (NKFAC, K=1),
* ``inv``: the Cholesky inverse used for exact refreshes,
* ``eigh``: an fp32 eigendecomposition followed by ``V diag(1/w) V^T``,

and reports the relative error ``||B - A^-1||_F / ||A^-1||_F`` of the Newton
result.  The warm start is the exact inverse of the factor as it was one
refresh earlier; the new factor mixes in ``1 - 0.95^10 = 40 %`` of fresh
statistics, which is what 10 EMA updates between two refreshes do with the
thesis' defaults (T_stat=100, T_inv=1000, alpha=0.95).

Run::

    python benchmarks/bench_inverse.py [--max-dim 4609] [--device cuda]
"""
import argparse
import collections
import time
from typing import Callable, Dict, List

import torch

from mmprecond.linalg import damp, exact_inverse, newton_inverse


def model_factor_dims() -> Dict[int, int]:
    """Distinct factor sizes of the real Faster R-CNN R50-FPN."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.hub import get_config

    register_all_modules()
    cfg = get_config('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    from mmprecond.curvature.capture import factor_dims, supported_reason
    dims: Dict[int, int] = collections.Counter()
    for _, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and \
                supported_reason(m) is None:
            for d in factor_dims(m):
                dims[d] += 1
    return dict(dims)


def random_factor(d: int, rows: int, gen: torch.Generator,
                  device: str) -> torch.Tensor:
    """A Frobenius-normalised Gram matrix of correlated random features."""
    mix = torch.randn(d, d, generator=gen) / d**0.5
    x = torch.randn(rows, d, generator=gen) @ mix
    a = (x.T @ x).to(device)
    return a / torch.linalg.matrix_norm(a)


def timed(fn: Callable[[], torch.Tensor], device: str, repeat: int) -> float:
    fn()  # warm-up
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def measure_size(d: int, gen: torch.Generator, device: str,
                 repeat: int) -> tuple:
    """``(t_newton, t_inv, t_eigh, err_warm_start, err_newton)`` for size d."""
    old = random_factor(d, 2 * d, gen, device)
    new = 0.6 * old + 0.4 * random_factor(d, 2 * d, gen, device)
    a_old, a_new = damp(old, 0.01), damp(new, 0.01)
    prev = exact_inverse(a_old)
    exact = exact_inverse(a_new)
    b, _ = newton_inverse(a_new, prev, 1)
    norm = torch.linalg.matrix_norm(exact)
    err = float(torch.linalg.matrix_norm(b - exact) / norm)
    err_prev = float(torch.linalg.matrix_norm(prev - exact) / norm)

    def eigh_inverse() -> torch.Tensor:
        w, v = torch.linalg.eigh(a_new)
        return (v / w) @ v.T

    t_newton = timed(lambda: newton_inverse(a_new, prev, 1), device, repeat)
    t_inv = timed(lambda: exact_inverse(a_new), device, repeat)
    t_eigh = timed(eigh_inverse, device, repeat)
    return t_newton, t_inv, t_eigh, err_prev, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--max-dim', type=int, default=4609,
                        help='skip larger sizes (12545 takes minutes on CPU)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--repeat', type=int, default=2)
    args = parser.parse_args()
    dims = model_factor_dims()
    gen = torch.Generator().manual_seed(0)
    rows: List[tuple] = []
    totals = collections.Counter()
    for d in sorted(dims):
        if d > args.max_dim or d < 64:
            continue
        row = measure_size(d, gen, args.device, args.repeat)
        n = dims[d]
        totals.update(newton=n * row[0], inv=n * row[1], eigh=n * row[2])
        rows.append((d, n, *row))
    print(f'device={args.device}  torch={torch.__version__}  '
          f'threads={torch.get_num_threads()}')
    print(f"{'dim':>6} {'count':>5} {'newton ms':>10} {'inv ms':>9} "
          f"{'eigh ms':>9} {'inv/newton':>10} {'eigh/newton':>11} "
          f"{'err(warm)':>9} {'err(newton)':>11}")
    for d, n, tn, ti, te, e0, e1 in rows:
        print(f'{d:>6} {n:>5} {tn * 1e3:>10.2f} {ti * 1e3:>9.2f} '
              f'{te * 1e3:>9.2f} {ti / tn:>10.2f} {te / tn:>11.2f} '
              f'{e0:>9.2e} {e1:>11.2e}')
    print(f"all factors <= {args.max_dim}: newton {totals['newton']:.2f} s, "
          f"inv {totals['inv']:.2f} s ({totals['inv'] / totals['newton']:.2f}x), "
          f"eigh {totals['eigh']:.2f} s "
          f"({totals['eigh'] / totals['newton']:.2f}x) per refresh")


if __name__ == '__main__':
    main()

# Copyright (c) mmprecond contributors. All rights reserved.
"""Whole-model refresh: batched vs per-factor; Newton vs Cholesky vs eigh.

Refreshes every Kronecker factor of mmdet's Faster R-CNN R50-FPN (the
trainable layers that AdaNKFAC preconditions with its default
``max_factor_dim``; sizes in :data:`R50_FPN_FACTORS`) the way the
optimizers do, with three methods:

* ``newton``: ``lambda_max`` (Lanczos), damping, one warm-started
  Newton-Schulz step and the residual guard (NKFAC's regular refresh);
* ``cholesky``: ``lambda_max``, damping and the Cholesky inverse (NKFAC's
  exact refreshes, KFAC, FSGD);
* ``eigh``: the fp64 eigendecomposition of AdamR's basis refresh;

each run ``batched`` (factors of one size stacked, one call of each kernel
per size: what the optimizers do; on the CPU at most ~1 MB of factors per
call, see ``mmprecond.linalg.batch_limit``) and ``per-factor`` (the same
routines called once per factor: what they did before).  Printed: seconds per whole
refresh (best of ``--repeat`` interleaved runs), the per-factor / batched
ratio, each method against Newton, and the Newton result's error per size.

The warm start is the exact inverse of the factor as it was one refresh
earlier; the new factor mixes in ``1 - 0.95^10 = 40 %`` of fresh
statistics (new rows from the same feature distribution), which is what 10
EMA updates between two refreshes do with the thesis' defaults
(T_stat=100, T_inv=1000, alpha=0.95).  The factors of one
size are scaled copies of one random pair (the cost does not depend on
the values).

Needs torch and mmprecond (hence mmengine), not mmcv / mmdet.  Run::

    python benchmarks/bench_inverse.py                 # CPU: sizes <= 1100
    python benchmarks/bench_inverse.py --device cuda --max-dim 5000
"""
import argparse
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

from mmprecond.linalg import (
    batch_limit,
    damp,
    eigh_batch,
    exact_inverse_batch,
    refresh_inverse,
)

#: ``{factor size: count}`` of the 57 trainable Linear / Conv2d layers of
#: mmdet 3.3.0's ``faster-rcnn_r50_fpn_1x_coco`` (``frozen_stages=1``: the
#: stem and ``layer1`` are frozen), bias column included, without the
#: 12545-wide input side of ``roi_head.bbox_head.shared_fcs.0`` (above the
#: default ``max_factor_dim``): 113 factors.  Derived from the model built
#: by mmdet (``mmprecond.curvature.capture.factor_dims`` of every layer).
R50_FPN_FACTORS: Dict[int, int] = {
    3: 1, 12: 1, 81: 1, 128: 12, 256: 29, 257: 3, 320: 1, 512: 19, 513: 1,
    1024: 16, 1025: 4, 1152: 4, 2048: 6, 2049: 1, 2304: 6, 2305: 5, 4608: 3
}

DAMPING = 0.01
PROBES = 4


def random_factor(mix: Tensor, gen: torch.Generator) -> Tensor:
    """A Frobenius-normalised Gram matrix of ``2 d`` rows of features
    correlated by ``mix`` (one layer's feature distribution)."""
    d = mix.shape[0]
    x = torch.randn(2 * d, d, generator=gen, device=mix.device) @ mix
    a = x.T @ x
    return a / torch.linalg.matrix_norm(a)


Factors = Dict[int, Tuple[List[Tensor], List[Tensor], Tensor]]


def make_factors(dims: Dict[int, int], device: str) -> Factors:
    """``{d: (factors, warm starts, probes)}``: one tensor per layer's factor
    (as the optimizers keep them) and the size's ``(count, d, p)`` probes."""
    gen = torch.Generator(device=device).manual_seed(0)
    out = {}
    for d, count in dims.items():
        mix = torch.randn(d, d, generator=gen, device=device) / d**0.5
        old = random_factor(mix, gen)
        new = 0.6 * old + 0.4 * random_factor(mix, gen)
        prev = exact_inverse_batch(damp(old[None], DAMPING))[0][0]
        scales = [1 + 0.5 * i / max(count - 1, 1) for i in range(count)]
        out[d] = ([new * c for c in scales], [prev / c for c in scales],
                  torch.randn(count, d, PROBES, generator=gen, device=device))
    return out


def newton(s: Tensor, prev: Tensor, probes: Tensor) -> Tensor:
    return refresh_inverse(s, DAMPING, prev=prev, probes=probes)[0]


def cholesky(s: Tensor, prev: Tensor, probes: Tensor) -> Tensor:
    return refresh_inverse(s, DAMPING)[0]


def eigh(s: Tensor, prev: Tensor, probes: Tensor) -> Tensor:
    return eigh_batch(s)[1]


METHODS: Dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = dict(
    newton=newton, cholesky=cholesky, eigh=eigh)


def whole_refresh(method: Callable, factors: Factors, batched: bool) -> None:
    for d, (s, prev, probes) in factors.items():
        if not batched:
            for i in range(len(s)):
                method(s[i][None], prev[i][None], probes[i:i + 1])
            continue
        # as the optimizers do: stack the size's factors, at most
        # batch_limit at once (all on an accelerator, ~1 MB on the CPU)
        dtype = torch.float64 if method is eigh else s[0].dtype
        step = batch_limit(d, dtype, s[0].device)
        for lo in range(0, len(s), step):
            hi = lo + step
            method(torch.stack(s[lo:hi]), torch.stack(prev[lo:hi]), probes[lo:hi])


def timed(fns: List[Callable[[], None]], device: str, repeat: int) -> List[float]:
    """Best-of-``repeat`` seconds of each ``fn`` after one warm-up each.

    The runs are interleaved, in alternating order (A B, B A, ...): on a
    shared CPU machine the one that runs second after the other was
    measured up to 1.5x slower, whichever it was.
    """
    def once(fn: Callable[[], None]) -> float:
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in fns:
        once(fn)
    best = [float('inf')] * len(fns)
    for r in range(repeat):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            best[i] = min(best[i], once(fns[i]))
    return best


def newton_errors(factors: Factors) -> List[Tuple[int, float, float]]:
    """``(d, err(warm start), err(Newton))`` relative to the exact inverse."""
    rows = []
    for d, (s, prev, probes) in factors.items():
        exact = cholesky(s[0][None], prev[0][None], probes[:1])
        b = newton(s[0][None], prev[0][None], probes[:1])
        norm = torch.linalg.matrix_norm(exact)
        rows.append((d, float(torch.linalg.matrix_norm(prev[0] - exact) / norm),
                     float(torch.linalg.matrix_norm(b - exact) / norm)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--max-dim', type=int, default=None,
                        help='skip larger factors (default: 1100 on CPU, '
                        'all on CUDA)')
    parser.add_argument('--repeat', type=int, default=4,
                        help='timed runs of each variant (the best is kept)')
    parser.add_argument('--methods', nargs='+', default=list(METHODS),
                        choices=list(METHODS))
    args = parser.parse_args()
    max_dim = args.max_dim or (1100 if args.device == 'cpu' else 1 << 30)
    dims = {d: n for d, n in R50_FPN_FACTORS.items() if d <= max_dim}
    factors = make_factors(dims, args.device)
    name = (torch.cuda.get_device_name(args.device)
            if args.device.startswith('cuda') else 'cpu')
    print(f'device={args.device} ({name})  torch={torch.__version__}  '
          f'threads={torch.get_num_threads()}  factors={sum(dims.values())} '
          f'of R50-FPN\'s {sum(R50_FPN_FACTORS.values())} (sizes <= {max_dim}, '
          f'{len(dims)} distinct)')
    times = {}
    print(f"{'method':>9} {'batched s':>10} {'per-factor s':>13} "
          f"{'per-factor/batched':>19}")
    for method in args.methods:
        fn = METHODS[method]
        tb, tp = timed([lambda fn=fn: whole_refresh(fn, factors, True),
                        lambda fn=fn: whole_refresh(fn, factors, False)],
                       args.device, args.repeat)
        times[method] = (tb, tp)
        print(f'{method:>9} {tb:>10.4f} {tp:>13.4f} {tp / tb:>19.2f}', flush=True)
    if 'newton' in times:
        base = times['newton']
        print('against Newton (batched, per-factor): ' + ', '.join(
            f'{m} {tb / base[0]:.2f}x, {tp / base[1]:.2f}x'
            for m, (tb, tp) in times.items() if m != 'newton'))
    print(f"{'dim':>6} {'count':>5} {'err(warm)':>10} {'err(newton)':>12}")
    for d, e0, e1 in newton_errors(factors):
        print(f'{d:>6} {dims[d]:>5} {e0:>10.2e} {e1:>12.2e}')


if __name__ == '__main__':
    main()

# Copyright (c) mmprecond contributors. All rights reserved.
"""Cost of AdamR's two basis refreshes: fp64 ``eigh`` vs one QR power step.

For ``--copies`` random SPD factors of each size in ``--sizes`` (sizes of
the kind a ResNet's convs give: ``C_in k^2 + 1``), times

* the eigh refresh as AdamR runs it: ``torch.linalg.eigh`` of the damped
  factor in fp64, one factor at a time, and
* the power-step refresh (``power_interval``): ``qr(F U)`` in fp32 through
  :func:`mmprecond.optim.adamr.power_step_basis`, batched over the copies,

and prints seconds per refresh of all copies and the ratio power / eigh.
Medians of ``--repeats``.

Run::

    python benchmarks/adamr_refresh_cost.py [--sizes 65 289 577 1153] [--device cpu]
"""
import argparse
import statistics
import time

import torch

from mmprecond.optim.adamr import power_step_basis


def timed(fn, repeats: int, device: str) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after a warm-up)."""
    fn()
    out = []
    for _ in range(repeats):
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def eigh_refresh(factors: torch.Tensor) -> None:
    """AdamR's eigh refresh: one fp64 ``eigh`` of each damped factor."""
    for f in factors:
        damped = f.double()
        damped.diagonal().add_(0.01)
        torch.linalg.eigh(damped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+',
                        default=[65, 145, 289, 577, 1153])
    parser.add_argument('--copies', type=int, default=4)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f'{args.copies} factors per size, {args.device}, '
          f'{args.threads} thread(s); seconds per refresh of all of them')
    print('| size | eigh fp64 (per factor) | QR power step (batched) | '
          'power / eigh |')
    print('|---|---|---|---|')
    for n in args.sizes:
        a = torch.randn(args.copies, n, 2 * n, generator=g)
        factors = (a @ a.mT / (2 * n)).to(args.device)
        bases = torch.linalg.eigh(factors.double()).eigenvectors.float()

        t_eigh = timed(lambda f=factors: eigh_refresh(f), args.repeats,
                       args.device)
        t_power = timed(lambda f=factors, u=bases: power_step_basis(f, u),
                        args.repeats, args.device)
        print(f'| {n} | {t_eigh:.4f} | {t_power:.4f} | '
              f'{t_power / t_eigh:.3f} |')


if __name__ == '__main__':
    main()

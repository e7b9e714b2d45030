# Copyright (c) mmprecond contributors. All rights reserved.
"""AdamR on an ill-conditioned least-squares problem: does the rotation pay?

One ``nn.Linear(64, 16, bias=False)`` from zero fits targets ``W* x + noise``
whose inputs ``x = Q diag(s) z / 30`` (``z`` standard normal, ``Q`` a random
rotation, ``s`` log-spaced from 1 to 10^1.5) have a covariance that is far
from diagonal in the parameter coordinates, so AdamW's per-coordinate scaling
cannot fix it but Adam in the covariance's eigenbasis can.  Each step draws a
fresh batch of 256; lr 0.03, no weight decay.  The score of a run is its mean
loss over the last ``--window`` steps divided by AdamW's on the same seed and
batches; the table gives mean +- std over ``--seeds``.

Variants (``--variants``; each is AdamR with the keyword arguments in
:data:`VARIANTS` on top of ``stat_interval``/``refresh_interval``, or a
reference):

* ``adamw``: ``torch.optim.AdamW`` (the denominator);
* ``oracle``: Adam in the true eigenbasis of the input covariance from step 1
  (the noise floor a rotation can reach);
* moment policies at a basis change (``moment_projection`` with and without
  the reset at a layer's first basis), the first basis at ``t = T_s`` or
  ``t = T_u``, and the power-step refresh (``power_interval``).

Run::

    python benchmarks/adamr_least_squares.py --seeds 0 1 2
"""
import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

#: AdamR keyword arguments of each variant (on top of the two intervals).
VARIANTS: Dict[str, dict] = {
    "algorithm6 (= old 'keep')": dict(moment_projection='algorithm6'),
    "old 'project' (no reset)": dict(moment_projection='project',
                                     reset_first_basis=False),
    'reset at 1st basis, then keep (default)': dict(),
    'reset at 1st basis, then project': dict(moment_projection='project'),
    'reset at 1st basis, then rotate': dict(moment_projection='rotate'),
    'reset at 1st basis, then reset': dict(moment_projection='reset'),
    'reset, keep; 1st basis at T_s': dict(first_basis='stat_interval'),
    'reset, project; 1st basis at T_s': dict(moment_projection='project',
                                             first_basis='stat_interval'),
    'reset, rotate; 1st basis at T_s': dict(moment_projection='rotate',
                                            first_basis='stat_interval'),
    'reset, reset; 1st basis at T_s': dict(moment_projection='reset',
                                           first_basis='stat_interval'),
    "'rotate' + power step every T_s": dict(moment_projection='rotate',
                                             power_interval='stat'),
    "'rotate', eigh every T_s": dict(moment_projection='rotate',
                                     refresh_interval='stat'),
    'eigh once at T_s, then only power steps every T_s': dict(
        refresh_interval=10**9, first_basis='stat_interval',
        power_interval='stat', moment_projection='rotate'),
}


class LeastSquares:
    """The problem: a fixed input rotation / spectrum and target weights.

    Args:
        seed (int): Seed of ``Q``, ``W*`` and of the batch stream.
        d_in (int): Input width. Defaults to 64.
        d_out (int): Output width. Defaults to 16.
        batch (int): Rows per step. Defaults to 256.
        drift (float): Angle-like amount by which the input eigenbasis
            turns over a run (``Q_t = Q expm(drift t / steps A)``, ``A`` a
            random skew matrix of unit spectral norm), so that later basis
            refreshes matter.  Defaults to 0 (a fixed basis).
    """

    def __init__(self, seed: int, d_in: int = 64, d_out: int = 16,
                 batch: int = 256, drift: float = 0.0) -> None:
        g = torch.Generator().manual_seed(seed)
        q = torch.linalg.qr(torch.randn(d_in, d_in, generator=g)).Q
        spectrum = torch.logspace(0, 1.5, d_in)
        self.mix = (q * spectrum) / 30  # x = z @ mix.T
        self.eigvecs = q  # of the input covariance, ascending spectrum
        self.target = torch.randn(d_out, d_in, generator=g)
        self.spectrum = spectrum
        skew = torch.randn(d_in, d_in, generator=g)
        skew = skew - skew.T
        self.skew = skew / torch.linalg.matrix_norm(skew, 2)
        self.drift = drift
        self.seed, self.batch, self.d_in, self.d_out = seed, batch, d_in, d_out

    def batches(self, steps: int) -> List[tuple]:
        """The same ``steps`` batches ``(x, y)`` for every optimizer."""
        g = torch.Generator().manual_seed(self.seed + 1000)
        out = []
        for t in range(steps):
            mix = self.mix
            if self.drift:
                turn = torch.linalg.matrix_exp(self.drift * t / steps * self.skew)
                mix = (self.eigvecs @ turn * self.spectrum) / 30
            x = torch.randn(self.batch, self.d_in, generator=g) @ mix.T
            noise = 0.01 * torch.randn(self.batch, self.d_out, generator=g)
            out.append((x, x @ self.target.T + noise))
        return out

    def model(self) -> nn.Module:
        """``nn.Sequential(nn.Linear(d_in, d_out, bias=False))`` at zero."""
        model = nn.Sequential(nn.Linear(self.d_in, self.d_out, bias=False))
        nn.init.zeros_(model[0].weight)
        return model


def train(problem: LeastSquares, make_opt: Callable[[nn.Module], object],
          steps: int = 400, rotate_inputs: Optional[torch.Tensor] = None
          ) -> List[float]:
    """Train a fresh model; return the loss of every step.

    ``rotate_inputs`` (the oracle): feed ``x @ U`` to a model that learns
    ``W U``, i.e. Adam in the basis ``U`` of the input side.
    """
    model = problem.model()
    opt = make_opt(model)
    losses = []
    for x, y in problem.batches(steps):
        if rotate_inputs is not None:
            x = x @ rotate_inputs
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def adamr_factory(lr: float, stat_interval: int, refresh_interval: int,
                  variant: dict) -> Callable[[nn.Module], object]:
    """An ``AdamR`` builder with ``wd = 0`` and a variant's arguments.

    A variant's ``'stat'`` for ``refresh_interval`` / ``power_interval``
    stands for ``stat_interval``.
    """
    from mmprecond.optim import AdamR
    kwargs = dict(dict(refresh_interval=refresh_interval), **variant)
    for key in ('power_interval', 'refresh_interval'):
        if kwargs.get(key) == 'stat':
            kwargs[key] = stat_interval
    return lambda m: AdamR(m.parameters(), model=m, lr=lr, weight_decay=0.0,
                           stat_interval=stat_interval, **kwargs)


def adamw_factory(lr: float) -> Callable[[nn.Module], object]:
    """``torch.optim.AdamW`` with ``wd = 0``."""
    return lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)


def final_loss(losses: List[float], window: int) -> float:
    """Mean of the last ``window`` losses."""
    return sum(losses[-window:]) / window


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--steps', type=int, default=400)
    parser.add_argument('--window', type=int, default=20)
    parser.add_argument('--lr', type=float, default=0.03)
    parser.add_argument('--stat-interval', type=int, default=5)
    parser.add_argument('--basis-interval', type=int, default=20)
    parser.add_argument('--drift', type=float, default=0.0,
                        help='turn of the input eigenbasis over the run')
    parser.add_argument('--variants', nargs='+',
                        default=['oracle'] + list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    ratios: Dict[str, List[float]] = {v: [] for v in args.variants}
    areas: Dict[str, List[float]] = {v: [] for v in args.variants}
    seconds: Dict[str, float] = {v: 0.0 for v in args.variants}
    for seed in args.seeds:
        problem = LeastSquares(seed, drift=args.drift)
        ref_losses = train(problem, adamw_factory(args.lr), args.steps)
        ref = final_loss(ref_losses, args.window)
        ref_area = sum(ref_losses)
        print(f'seed {seed}: AdamW final loss {ref:.4g}')
        for variant in args.variants:
            start = time.perf_counter()
            if variant == 'oracle':
                losses = train(problem, adamw_factory(args.lr), args.steps,
                               rotate_inputs=problem.eigvecs)
            else:
                losses = train(
                    problem,
                    adamr_factory(args.lr, args.stat_interval,
                                  args.refresh_interval, VARIANTS[variant]),
                    args.steps)
            seconds[variant] += time.perf_counter() - start
            ratios[variant].append(final_loss(losses, args.window) / ref)
            areas[variant].append(sum(losses) / ref_area)
    print(f'\n{args.steps} steps, lr {args.lr}, T_s={args.stat_interval}, '
          f'T_u={args.refresh_interval}, drift {args.drift}, seeds {args.seeds};'
          f' final loss (mean of the last {args.window}) and mean loss of '
          'all steps, each / AdamW\'s')
    print('| variant | final loss / AdamW | mean loss / AdamW | s/run |')
    print('|---|---|---|---|')
    for variant in args.variants:
        print(f'| {variant} | {_mean_std(ratios[variant])} | '
              f'{_mean_std(areas[variant])} | '
              f'{seconds[variant] / len(args.seeds):.2f} |')


def _mean_std(values: List[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.4f} +- {std:.4f}'


if __name__ == '__main__':
    main()

# Copyright (c) mmprecond contributors. All rights reserved.
"""Turn captured sums into batch statistics and fold them into factors.

The capture (:mod:`.capture`) only accumulates ``X^T X``, ``Delta^T Delta``
and row counts.  This module decides what one iteration's statistic is and
how it enters the running factor; it knows nothing about inverses.

Example:
    >>> import torch
    >>> running = None
    >>> running = ema_update(running, torch.eye(2), decay=0.95)
    >>> round(float(running[0, 0]), 6)
    0.05
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .capture import StatBuffer


@dataclass
class BatchStatistics:
    """One iteration's statistics of one layer (either side may be missing).

    Attributes:
        xx (Tensor, optional): ``E[x x^T]`` over the input rows.
        gg (Tensor, optional): ``sum Delta^T Delta`` over the output rows,
            divided by the squared AMP loss scale.
    """
    xx: Optional[Tensor] = None
    gg: Optional[Tensor] = None


def batch_statistics(buf: StatBuffer, grad_scale: float = 1.0) -> BatchStatistics:
    """Statistics of one iteration from a layer's (possibly reduced) sums.

    Sides with zero rows (module not called, empty input) or non-finite
    values (an overflowing AMP step) are returned as ``None``.  The
    finiteness test reads the device; :func:`batched_statistics` with
    :func:`ema_fold` does without.
    """
    out = BatchStatistics()
    if buf.xx is not None and buf.x_rows > 0:
        xx = buf.xx / buf.x_rows
        if bool(torch.isfinite(xx).all()):
            out.xx = xx
    if buf.gg is not None and buf.g_rows > 0:
        gg = buf.gg / (grad_scale * grad_scale)
        if bool(torch.isfinite(gg).all()):
            out.gg = gg
    return out


def batched_statistics(buffers: Dict[str, StatBuffer],
                       grad_scale: Union[float, Tensor] = 1.0
                       ) -> Dict[str, BatchStatistics]:
    """:func:`batch_statistics` of many layers, with batched kernels.

    The means ``X^T X / rows`` of all layers take one foreach division and
    the loss-scale correction of all ``Delta^T Delta`` another; nothing is
    read from the device, so non-finite values pass through (fold them with
    :func:`ema_fold`, which substitutes them on the device).
    """
    out = {name: BatchStatistics() for name in buffers}
    xs = [(n, b) for n, b in buffers.items() if b.xx is not None and b.x_rows > 0]
    if xs:
        means = torch._foreach_div([b.xx for _, b in xs],
                                   [float(b.x_rows) for _, b in xs])
        for (name, _), xx in zip(xs, means):
            out[name].xx = xx
    gs = [(n, b) for n, b in buffers.items() if b.gg is not None and b.g_rows > 0]
    if gs:
        ggs = [b.gg for _, b in gs]
        if not (isinstance(grad_scale, (int, float)) and grad_scale == 1):
            ggs = torch._foreach_div(ggs, grad_scale * grad_scale)
        for (name, _), gg in zip(gs, ggs):
            out[name].gg = gg
    return out


def frobenius_normalize(a: Tensor, eps: float = 1e-12) -> Tensor:
    """``a / (||a||_F + eps)``: the per-batch normalisation of the NKFAC code.

    It makes the factors invariant to the loss scale, to the batch size and
    to how gradients are averaged across ranks.
    """
    return a / (torch.linalg.matrix_norm(a) + eps)


def ema_update(running: Optional[Tensor], new: Tensor, decay: float) -> Tensor:
    """``running + (1 - decay) (new - running)``, ``running`` starting at 0."""
    if running is None:
        return new * (1 - decay)
    return running.add_(new - running, alpha=1 - decay)


def mean_update(running: Optional[Tensor], new: Tensor, count: int) -> Tensor:
    """Running mean: ``running + (new - running) / count`` (``count`` is 1-based)."""
    if running is None or count <= 1:
        return new.clone()
    return running.add_(new - running, alpha=1.0 / count)


def ema_fold(running: List[Optional[Tensor]], new: List[Tensor], decay: float,
             normalize: bool = False,
             eps: float = 1e-12) -> Tuple[List[Tensor], Tensor]:
    """Fold many statistics into their EMAs with a few batched kernels.

    For each pair, ``running <- running + (1 - decay) (new - running)``
    (``running`` starting at zero), with ``new`` first divided by
    ``||new||_F + eps`` if ``normalize``.  A ``new`` that is not finite
    leaves its ``running`` unchanged; the test and the substitution happen
    on the device (no value is read on the host), and the returned flags
    tell the caller which were folded.  A statistic whose first value is
    not finite therefore starts at zero instead of being absent.

    Args:
        running (list[Tensor | None]): Running factors (updated in place;
            ``None`` for factors not formed yet).
        new (list[Tensor]): This iteration's statistics, same shapes, all on
            one device.
        decay (float): EMA weight of the old value.
        normalize (bool): Frobenius-normalise ``new`` first (NKFAC).
        eps (float): Added to the norm.

    Returns:
        tuple[list[Tensor], Tensor]: The running factors and a boolean
        vector, ``True`` where ``new`` was finite and folded.

    Example:
        >>> import torch
        >>> out, ok = ema_fold([None, torch.ones(1, 1)],
        ...                    [torch.eye(1), torch.full((1, 1), float('nan'))],
        ...                    decay=0.5)
        >>> [float(t) for t in out], ok.tolist()
        ([0.5, 1.0], [True, False])
    """
    return fold_statistics_(running, new, 1 - decay, normalize, eps)


def fold_statistics_(running: List[Optional[Tensor]], new: List[Tensor],
                     weight: Union[float, Sequence[float]],
                     normalize: bool = False,
                     eps: float = 1e-12) -> Tuple[List[Tensor], Tensor]:
    """``running <- running + w (new - running)`` for many pairs, on the device.

    The common core of :func:`ema_fold` (``w = 1 - decay``) and of running
    means (``w = 1 / k`` per pair, ``k`` the host-side count): ``running``
    starts at zero, a non-finite ``new`` leaves its ``running`` unchanged
    (tested and substituted on the device), and the flags of the folded
    pairs are returned.

    Args:
        running (list[Tensor | None]): Running factors (updated in place).
        new (list[Tensor]): Statistics, same shapes, all on one device.
        weight (float | Sequence[float]): Weight of ``new``, one for all
            pairs or one per pair.
        normalize (bool): Frobenius-normalise ``new`` first.
        eps (float): Added to the norm.

    Returns:
        tuple[list[Tensor], Tensor]: The running factors and the boolean
        vector of pairs whose ``new`` was finite.
    """
    norms = torch._foreach_norm(new)
    ok = torch.isfinite(torch.stack(norms))
    if normalize:
        new = torch._foreach_div(new, torch._foreach_add(norms, eps))
    running = [torch.zeros_like(n) if r is None else r
               for r, n in zip(running, new)]
    # a non-finite statistic is replaced by the running value, which the
    # interpolation then leaves exactly unchanged
    safe = [torch.where(f, n, r) for f, n, r in zip(ok.unbind(), new, running)]
    # ``running.add_(new - running, alpha=w)``, the arithmetic of
    # :func:`ema_update` / :func:`mean_update`, one foreach add per weight
    diff = torch._foreach_sub(safe, running)
    weights = ([float(weight)] * len(running) if isinstance(weight, (int, float))
               else [float(w) for w in weight])
    by_weight: Dict[float, List[int]] = {}
    for i, w in enumerate(weights):
        by_weight.setdefault(w, []).append(i)
    for w, idx in by_weight.items():
        torch._foreach_add_([running[i] for i in idx], [diff[i] for i in idx],
                            alpha=w)
    return running, ok

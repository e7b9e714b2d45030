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
        xx_present (Tensor, optional): Device flag, ``False`` where no rank
            had input rows (``xx`` is then a zero placeholder that must not
            be folded); ``None`` when the host knows the statistic exists.
        gg_present (Tensor, optional): The same for ``gg``.
    """
    xx: Optional[Tensor] = None
    gg: Optional[Tensor] = None
    xx_present: Optional[Tensor] = None
    gg_present: Optional[Tensor] = None


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
                       grad_scale: Union[float, Tensor] = 1.0,
                       rows: Optional[Tensor] = None,
                       present: Optional[Tensor] = None,
                       inplace: bool = False) -> Dict[str, BatchStatistics]:
    """:func:`batch_statistics` of many layers, with batched kernels.

    The means ``X^T X / rows`` of all layers take one foreach division and
    the loss-scale correction of all ``Delta^T Delta`` another; nothing is
    read from the device, so non-finite values pass through (fold them with
    :func:`ema_fold`, which substitutes them on the device).

    Args:
        buffers (dict[str, StatBuffer]): The layers' sums.
        grad_scale (float | Tensor): Loss scale (``Delta^T Delta`` is divided
            by its square).
        rows (Tensor, optional): Row counts on the device, ``[x_0, g_0, x_1,
            g_1, ...]`` in the order of ``buffers`` (e.g. summed over
            ranks); ``X^T X`` is then divided by ``max(x_i, 1)`` and every
            formed sum is returned, whatever the host-side counts say.
        present (Tensor, optional): Device flags of the same layout, stored
            as each statistic's ``*_present``; with it too every formed sum
            is returned (the host-side counts still divide ``X^T X`` unless
            ``rows`` is given).
        inplace (bool): Divide the buffers' sums in place (the buffers then
            hold the statistics) instead of allocating a copy of them.

    Example:
        >>> import torch
        >>> buf = StatBuffer(xx=torch.full((2, 2), 6.0), x_rows=3)
        >>> float(batched_statistics({'fc': buf})['fc'].xx[0, 0])
        2.0
    """
    out = {name: BatchStatistics() for name in buffers}
    device_counts = rows is not None or present is not None
    xs, gs = [], []
    for i, (name, b) in enumerate(buffers.items()):
        if b.xx is not None and (device_counts or b.x_rows > 0):
            xs.append((i, name, b))
        if b.gg is not None and (device_counts or b.g_rows > 0):
            gs.append((i, name, b))
    if xs:
        sums = [b.xx for _, _, b in xs]
        if rows is not None:
            counts = rows.clamp_min(1).to(sums[0].dtype)
            divisors = [counts[2 * i] for i, _, _ in xs]
        else:
            divisors = [float(max(b.x_rows, 1)) for _, _, b in xs]
        if inplace:
            torch._foreach_div_(sums, divisors)
            means = sums
        else:
            means = torch._foreach_div(sums, divisors)
        for (i, name, _), xx in zip(xs, means):
            out[name].xx = xx
            if present is not None:
                out[name].xx_present = present[2 * i]
    if gs:
        ggs = [b.gg for _, _, b in gs]
        if not (isinstance(grad_scale, (int, float)) and grad_scale == 1):
            square = grad_scale * grad_scale
            if inplace:
                torch._foreach_div_(ggs, square)
            else:
                ggs = torch._foreach_div(ggs, square)
        for (i, name, _), gg in zip(gs, ggs):
            out[name].gg = gg
            if present is not None:
                out[name].gg_present = present[2 * i + 1]
    return out


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
                     eps: float = 1e-12,
                     present: Optional[Tensor] = None,
                     reuse_new: bool = False) -> Tuple[List[Tensor], Tensor]:
    """``running <- running + w (new - running)`` for many pairs, on the device.

    The common core of :func:`ema_fold` (``w = 1 - decay``) and of running
    means (``w = 1 / k`` per pair, ``k`` the host-side count): ``running``
    starts at zero, a non-finite ``new`` leaves its ``running`` unchanged
    (tested and substituted on the device), and the flags of the folded
    pairs are returned.

    The difference ``new - running`` is formed once and zeroed where a pair
    is not folded (``masked_fill_``), which is exactly what substituting
    ``running`` for ``new`` gives; with ``reuse_new`` it is formed in the
    storage of ``new`` itself, so the fold allocates no copy of the
    statistics at all.

    Args:
        running (list[Tensor | None]): Running factors (updated in place).
        new (list[Tensor]): Statistics, same shapes, all on one device.
        weight (float | Sequence[float]): Weight of ``new``, one for all
            pairs or one per pair.
        normalize (bool): Frobenius-normalise ``new`` first.
        eps (float): Added to the norm.
        present (Tensor, optional): Device flags, one per pair; a pair whose
            flag is ``False`` (a statistic no rank had rows for) is left
            unchanged without counting as non-finite.
        reuse_new (bool): Overwrite ``new`` (the caller's scratch).

    Returns:
        tuple[list[Tensor], Tensor]: The running factors and the boolean
        vector of pairs whose ``new`` was finite.
    """
    norms = torch._foreach_norm(new)
    ok = torch.isfinite(torch.stack(norms))
    skip = ok.logical_not() if present is None else (ok & present).logical_not_()
    running = [torch.zeros_like(n) if r is None else r
               for r, n in zip(running, new)]
    if normalize:
        denom = torch._foreach_add(norms, eps)
        if reuse_new:
            torch._foreach_div_(new, denom)
        else:
            new = torch._foreach_div(new, denom)
        reuse_new = True  # a fresh scratch now
    # ``running.add_(new - running, alpha=w)``, the arithmetic of
    # :func:`ema_update` / :func:`mean_update`, one foreach add per weight
    if reuse_new:
        torch._foreach_sub_(new, running)
        diff = list(new)
    else:
        diff = torch._foreach_sub(new, running)
    # a pair left out gets a zero difference: running + w * 0 == running
    for d, s in zip(diff, skip.unbind()):
        d.masked_fill_(s, 0.0)
    weights = ([float(weight)] * len(running) if isinstance(weight, (int, float))
               else [float(w) for w in weight])
    by_weight: Dict[float, List[int]] = {}
    for i, w in enumerate(weights):
        by_weight.setdefault(w, []).append(i)
    for w, idx in by_weight.items():
        torch._foreach_add_([running[i] for i in idx], [diff[i] for i in idx],
                            alpha=w)
    return running, ok

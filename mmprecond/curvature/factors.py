# Copyright (c) mmprecond contributors. All rights reserved.
"""Turn captured sums into batch statistics and fold them into factors.

The capture (:mod:`.capture`) only accumulates ``X^T X``, ``Delta^T Delta``
and row counts.  This module decides what one iteration's statistic is and
how it enters the running factor; it knows nothing about inverses.

Example:
    >>> import torch
    >>> running = None
    >>> running = ema_update(running, torch.eye(2), decay=0.95)
    >>> float(running[0, 0])
    0.05
"""
from dataclasses import dataclass
from typing import Optional

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
    values (an overflowing AMP step) are returned as ``None``.
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

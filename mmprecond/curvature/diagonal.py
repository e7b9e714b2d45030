# Copyright (c) mmprecond contributors. All rights reserved.
"""Diagonals of Kronecker factors, without forming the factors.

For AdaFisher only the diagonals of ``E[x x^T]`` and ``E[delta delta^T]`` are
needed, so each layer contributes per-feature sums of squares:

* ``nn.Linear``: ``sum_rows x_i^2`` (plus the row count for the bias's ones
  column) and ``sum_rows delta_o^2``;
* ``nn.Conv2d`` (ungrouped, numeric padding): the patch diagonal
  ``sum_{n, l} patch_{n,l,j}^2`` is ``unfold(x^2)`` summed, with no
  ``C_in k k``-square product; ``delta`` summed over samples and positions;
* normalisation layers (BatchNorm / GroupNorm: per channel, dim 1;
  LayerNorm: per element of ``normalized_shape``): ``sum x^2`` of the
  module input and ``sum delta^2`` of its output gradient.

Hooks follow :mod:`.capture`: a forward hook plus a tensor hook on the
output (robust to later in-place ops), active only on statistics steps,
fp32, summed over calls and micro-batches.

Example:
    >>> import torch, torch.nn as nn
    >>> lin = nn.Linear(3, 2)
    >>> cap = DiagonalCapture({'fc': lin})
    >>> cap.active = True
    >>> lin(torch.ones(4, 3)).sum().backward()
    >>> cap.buffers['fc'].h.tolist(), cap.buffers['fc'].s.tolist()
    ([4.0, 4.0, 4.0, 4.0], [4.0, 4.0])
"""
import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def diagonal_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` gets no diagonal statistics, or ``None`` if it does."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f'grouped conv (groups={module.groups})'
        if isinstance(module.padding, str) or module.padding_mode != 'zeros':
            return 'string padding or non-zero padding_mode'
        return None
    if isinstance(module, NORM_TYPES):
        if getattr(module, 'weight', None) is None:
            return 'normalisation without affine parameters'
        return None
    return f'unsupported type {type(module).__name__}'


def _norm_rows(module: nn.Module, t: Tensor) -> Tensor:
    """Rows x features view of a normalisation layer's input / output."""
    if isinstance(module, nn.LayerNorm):
        return t.reshape(-1, module.weight.numel())
    return t.transpose(0, 1).reshape(t.shape[1], -1).T  # channels on dim 1


def input_diagonal(module: nn.Module, x: Tensor) -> Tuple[Tensor, int]:
    """``(sum_rows x^2 per feature, rows)``; bias adds a trailing ``rows``."""
    x = x.detach().float()
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        cols = F.unfold(x * x, module.kernel_size, dilation=module.dilation,
                        padding=module.padding, stride=module.stride)
        h, rows = cols.sum((0, 2)), x.shape[0] * cols.shape[2]
    elif isinstance(module, nn.Linear):
        x = x.reshape(-1, x.shape[-1])
        h, rows = (x * x).sum(0), x.shape[0]
    else:
        x = _norm_rows(module, x)
        return (x * x).sum(0), x.shape[0]
    if module.bias is not None:
        h = torch.cat([h, h.new_full((1, ), float(rows))])
    return h, rows


def output_grad_diagonal(module: nn.Module, g: Tensor) -> Tuple[Tensor, int]:
    """``(sum_rows delta^2 per output feature, rows)``."""
    g = g.detach().float()
    if isinstance(module, nn.Conv2d):
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return (g * g).sum((0, 2, 3)), g.shape[0] * g.shape[2] * g.shape[3]
    if isinstance(module, nn.Linear):
        g = g.reshape(-1, g.shape[-1])
    else:
        g = _norm_rows(module, g)
    return (g * g).sum(0), g.shape[0]


@dataclass
class DiagBuffer:
    """Per-iteration sums of one layer."""
    h: Optional[Tensor] = None
    h_rows: int = 0
    s: Optional[Tensor] = None
    s_rows: int = 0


class _Hook:

    def __init__(self, capture: 'DiagonalCapture', name: str) -> None:
        self.capture_ref = weakref.ref(capture)
        self.name = name

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        cap = self.capture_ref()
        if cap is None or not cap.active or cap.modules.get(self.name) is not module:
            return
        if not (module.training and torch.is_grad_enabled()):
            return
        if not inputs or not isinstance(inputs[0], Tensor) or inputs[0].numel() == 0:
            return
        if not isinstance(output, Tensor) or not output.requires_grad:
            return
        buf = cap.buffers[self.name]
        with torch.autocast(output.device.type, enabled=False):
            h, rows = input_diagonal(module, inputs[0])
        buf.h = h if buf.h is None else buf.h + h
        buf.h_rows += rows
        name = self.name

        def grad_hook(grad: Tensor) -> None:
            with torch.autocast(grad.device.type, enabled=False):
                s, s_rows = output_grad_diagonal(module, grad)
            gbuf = cap.buffers[name]  # looked up now: clear() may have run
            gbuf.s = s if gbuf.s is None else gbuf.s + s
            gbuf.s_rows += s_rows
            cap.has_backward = True

        output.register_hook(grad_hook)


class DiagonalCapture:
    """Collects per-feature sums of squares of inputs and output gradients.

    Args:
        modules (dict[str, nn.Module]): Layers to hook, by name; each must
            pass :func:`diagonal_reason`.

    Attributes:
        active (bool): Collect on the next forward/backward passes.
        buffers (dict[str, DiagBuffer]): Sums since the last :meth:`clear`.
        has_backward (bool): Whether a backward ran since :meth:`clear`.
    """

    def __init__(self, modules: Dict[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.active = False
        self.has_backward = False
        self.buffers: Dict[str, DiagBuffer] = {}
        self.clear()
        self._handles = [
            m.register_forward_hook(_Hook(self, n)) for n, m in self.modules.items()
        ]

    def clear(self) -> None:
        self.buffers = {n: DiagBuffer() for n in self.modules}
        self.has_backward = False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __del__(self) -> None:
        self.remove()

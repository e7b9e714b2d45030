# Copyright (c) mmprecond contributors. All rights reserved.
"""Per-layer means for K-BFGS's secant pairs, recorded by light hooks.

K-BFGS needs, on its curvature steps only, per preconditioned layer:

* first pass (before the update): the layer inputs (kept until ``step()``
  turns them into ``A~ s_A``; they are the tensors autograd keeps anyway),
  the mean patch ``a-bar``, the mean pre-activation ``h-bar`` and the mean
  per-sample output gradient ``Dh-bar``;
* second pass (after the update, same minibatch): ``h-bar+`` and
  ``Dh-bar+``.

With ``m`` the samples of the layer's first call in the pass (Conv2d: the
batch; Linear: every input row) and ``R`` all output rows of the pass
(samples x locations, over every call), ``h-bar = sum_rows h / R`` and
``Dh-bar = sum_rows grad_h * m / R``: the per-sample gradient of a
mean-reduced loss is ``m`` times the output gradient, averaged over samples
and locations (thesis Eqs. 3.12-3.13).

The hooks follow :mod:`mmprecond.curvature.capture`: a forward hook plus a
tensor hook on the output (safe with in-place activations), weak references,
and no effect on deep copies of the model.
"""
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn as nn
from torch import Tensor

from .bfgs_updates import layer_rows, mean_patch_sum


@dataclass
class SecantRecord:
    """Sums of one pass for one layer."""
    samples: int = 0  # m of the first call
    locations: int = 0  # |T| of the first call
    rows: int = 0
    h_sum: Optional[Tensor] = None
    g_sum: Optional[Tensor] = None
    a_sum: Optional[Tensor] = None
    inputs: List[Tensor] = field(default_factory=list)

    def h_mean(self) -> Tensor:
        return self.h_sum / self.rows

    def g_mean(self) -> Tensor:
        return self.g_sum * (self.samples / self.rows)


def _channel_sum(module: nn.Module, t: Tensor) -> Tensor:
    t = t.detach().float()
    if isinstance(module, nn.Conv2d):
        if t.dim() == 3:
            t = t.unsqueeze(0)
        return t.sum(dim=(0, 2, 3))
    return t.reshape(-1, t.shape[-1]).sum(0)


class _SecantForwardHook:

    def __init__(self, recorder: 'SecantRecorder', name: str) -> None:
        self.recorder_ref = weakref.ref(recorder)
        self.name = name

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        rec = self.recorder_ref()
        if rec is None or rec.mode is None:
            return
        if rec.modules.get(self.name) is not module:
            return
        if not (module.training and torch.is_grad_enabled()):
            return
        if not inputs or not isinstance(inputs[0], Tensor):
            return
        x = inputs[0]
        if x.numel() == 0 or not isinstance(output, Tensor):
            return
        m, locs = layer_rows(module, x)
        if self.name not in rec.locations:
            rec.locations[self.name] = locs
        if rec.mode == 'locations':
            return
        record = rec.records.setdefault(self.name, SecantRecord())
        if record.rows == 0:
            record.samples, record.locations = m, locs
        record.rows += m * locs
        if rec.mode == 'samples' or not output.requires_grad:
            return
        h = _channel_sum(module, output)
        record.h_sum = h if record.h_sum is None else record.h_sum + h
        if rec.mode == 'first':
            record.inputs.append(x.detach())
            a = mean_patch_sum(module, x)
            record.a_sum = a if record.a_sum is None else record.a_sum + a
        output.register_hook(_SecantGradHook(record, module))


class _SecantGradHook:

    def __init__(self, record: SecantRecord, module: nn.Module) -> None:
        self.record = record
        self.module_ref = weakref.ref(module)

    def __call__(self, grad: Tensor) -> None:
        module = self.module_ref()
        if module is None:
            return None
        g = _channel_sum(module, grad)
        rec = self.record
        rec.g_sum = g if rec.g_sum is None else rec.g_sum + g
        return None


class SecantRecorder:
    """Records K-BFGS's per-layer means on demand.

    Args:
        modules (dict[str, nn.Module]): Name to module map of the model.
        names (Iterable[str]): Layers to hook.

    Attributes:
        mode (str, optional): ``None`` (hooks idle), ``'locations'`` (only
            each layer's ``|T|``), ``'samples'`` (also samples and rows),
            ``'first'`` or ``'second'`` (a pass).
        records (dict[str, SecantRecord]): What the current pass recorded.
        locations (dict[str, int]): ``|T|`` of each layer's first call ever
            seen.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        >>> rec = SecantRecorder(dict(net.named_modules()), ['0'])
        >>> rec.mode = 'first'
        >>> net(torch.randn(2, 3, 6, 6)).sum().backward()
        >>> rec.locations['0'], rec.records['0'].g_sum.shape
        (16, torch.Size([4]))
    """

    def __init__(self, modules: Dict[str, nn.Module], names: Iterable[str]) -> None:
        self.names = list(names)
        self.modules = {n: modules[n] for n in self.names}
        self.mode: Optional[str] = None
        self.records: Dict[str, SecantRecord] = {}
        self.locations: Dict[str, int] = {}
        self._handles = [
            self.modules[n].register_forward_hook(_SecantForwardHook(self, n))
            for n in self.names
        ]

    def take(self) -> Dict[str, SecantRecord]:
        """Return and forget the current pass's records."""
        out, self.records = self.records, {}
        return out

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __del__(self) -> None:
        self.remove()

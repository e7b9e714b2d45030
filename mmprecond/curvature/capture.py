# Copyright (c) mmprecond contributors. All rights reserved.
"""Per-layer input / output-gradient statistics for Kronecker factors.

For a layer ``z = W x (+ b)`` the capture collects, on statistics steps only,

* ``X^T X`` summed over every input row (a row is a sample, a token, or a
  convolution patch; a trailing ``1`` is appended when the layer has a bias,
  so the bias is preconditioned jointly with the weight as an extra input
  column), together with the number of rows;
* ``Delta^T Delta`` summed over every output-gradient row.

Design points (the traps public K-FAC libraries document):

* **Forward hook + tensor hook.**  The gradient w.r.t. the output is taken
  from a hook registered on the output tensor inside the forward hook, not
  from ``register_full_backward_hook``, which raises when the output is
  later modified in place (``ConvModule`` + ``ReLU(inplace=True)``).  A tensor
  hook registered before an in-place op receives the gradient of the
  tensor's value before that op, which is exactly ``dL/dz``.
* **Sums and counts.**  A module called several times in one iteration (a
  shared FPN head) or over several micro-batches (gradient accumulation)
  adds to the same buffers; the optimizer turns them into one statistic in
  ``step()``.  Inputs with zero rows (no RoIs) add nothing.
* **Only when needed.**  Hooks return immediately unless :attr:`active` is
  set (statistics step), grad mode is on and the module is training, so a
  non-statistics step costs two Python calls per layer.
* **fp32.**  Activations from autocast regions are cast to fp32 before the
  products.
* **Deep copies.**  Hooks hold a weak reference to the capture and the
  module's name; a deep-copied model (``EMAHook``) carries hooks that find
  their module is not the registered one and do nothing, and they do not
  keep the optimizer alive.

Example:
    >>> import torch, torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> cap = LayerCapture(dict(net.named_modules()), ['0', '2'])
    >>> cap.active = True
    >>> net(torch.randn(5, 4)).sum().backward()
    >>> cap.buffers['0'].xx.shape, cap.buffers['0'].gg.shape
    (torch.Size([5, 5]), torch.Size([3, 3]))
"""
import math
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

#: Elements of one im2col chunk (fp32): bounds the extra memory of a conv's
#: statistics to about 256 MB whatever the feature-map size.
IM2COL_CHUNK_ELEMENTS = 1 << 26


def supported_reason(module: nn.Module) -> Optional[str]:
    """Why ``module`` cannot be Kronecker-factored, or ``None`` if it can.

    ``nn.Linear`` and ``nn.Conv2d`` (and subclasses, e.g. mmcv's wrappers)
    are supported.  Grouped / depthwise convs and convs with a non-zero
    ``padding_mode`` are not: their weight is not one ``C_out x C_in k k``
    matrix acting on zero-padded patches.
    """
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f'grouped conv (groups={module.groups})'
        if module.padding_mode != 'zeros':
            return f"padding_mode='{module.padding_mode}'"
        return None
    return f'unsupported type {type(module).__name__}'


def factor_dims(module: nn.Module) -> Tuple[int, int]:
    """``(d_out, d_in)`` of the layer's Kronecker factors (bias included)."""
    shape = module.weight.shape  # from the shape: no tensor op
    d_in = math.prod(shape[1:]) + (1 if module.bias is not None else 0)
    return shape[0], d_in


def gradient_matrix(module: nn.Module) -> Optional[Tensor]:
    """The layer gradient as a ``d_out x d_in`` matrix (bias as last column)."""
    gw = module.weight.grad
    if gw is None:
        return None
    g = gw.reshape(gw.shape[0], -1)
    if module.bias is not None:
        gb = module.bias.grad
        gb = torch.zeros_like(g[:, :1]) if gb is None else gb.reshape(-1, 1)
        g = torch.cat([g, gb], dim=1)
    return g


def split_gradient_matrix(module: nn.Module,
                          g: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """Inverse of :func:`gradient_matrix`: ``(weight_grad, bias_grad)``."""
    weight = module.weight
    if module.bias is None:
        return g.reshape(weight.shape), None
    return g[:, :-1].reshape(weight.shape), g[:, -1].reshape(module.bias.shape)


def _conv_padding(module: nn.Conv2d) -> Tuple[int, int]:
    pad = module.padding
    if isinstance(pad, str):
        if pad == 'valid':
            return 0, 0
        # 'same' (stride 1 only in torch): total padding d*(k-1), split so
        # that the extra element goes to the right/bottom, as torch does.
        raise ValueError('padding="same" is handled by _same_pad')
    return int(pad[0]), int(pad[1])


def input_rows_gram(module: nn.Module, x: Tensor) -> Tuple[Tensor, int]:
    """``(X^T X, n_rows)`` of a layer input, computed in fp32 in chunks.

    Linear: every leading index is a row.  Conv2d: every output position of
    every sample is a row holding the (dilated, strided, zero-padded) patch,
    column order matching ``weight.view(C_out, -1)``.
    """
    has_bias = module.bias is not None
    x = x.detach()
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        if isinstance(module.padding, str) and module.padding == 'same':
            kh, kw = module.kernel_size
            dh, dw = module.dilation
            th, tw = dh * (kh - 1), dw * (kw - 1)
            x = F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2))
            padding = (0, 0)
        else:
            padding = _conv_padding(module)
        n = x.shape[0]
        per_sample = x[0].numel() * module.kernel_size[0] * module.kernel_size[1]
        chunk = max(1, IM2COL_CHUNK_ELEMENTS // max(per_sample, 1))
        gram = None
        rows = 0
        for start in range(0, n, chunk):
            cols = F.unfold(
                x[start:start + chunk].float(),
                module.kernel_size,
                dilation=module.dilation,
                padding=padding,
                stride=module.stride)  # (b, C k k, L)
            part = cols.transpose(1, 2).reshape(-1, cols.shape[1])
            part_gram, part_rows = _gram_with_bias(part, has_bias)
            gram = part_gram if gram is None else gram + part_gram
            rows += part_rows
        if gram is None:
            d = factor_dims(module)[1]
            gram = x.new_zeros((d, d), dtype=torch.float32)
        return gram, rows
    rows_mat = x.reshape(-1, x.shape[-1]).float()
    return _gram_with_bias(rows_mat, has_bias)


def _gram_with_bias(rows: Tensor, has_bias: bool) -> Tuple[Tensor, int]:
    """Gram matrix of ``[rows, 1]`` without materialising the ones column."""
    n = rows.shape[0]
    gram = rows.T @ rows
    if not has_bias:
        return gram, n
    col_sum = rows.sum(0)
    d = gram.shape[0] + 1
    out = rows.new_empty((d, d))
    out[:-1, :-1] = gram
    out[:-1, -1] = col_sum
    out[-1, :-1] = col_sum
    # fill_ takes the count as a kernel argument; item assignment of a Python
    # number would copy it from the host (a synchronising copy on a GPU)
    out[-1, -1].fill_(n)
    return out, n


def output_grad_gram(module: nn.Module, g: Tensor) -> Tuple[Tensor, int]:
    """``(Delta^T Delta, n_rows)`` of the gradient w.r.t. the layer output."""
    g = g.detach().float()
    if isinstance(module, nn.Conv2d):
        if g.dim() == 3:
            g = g.unsqueeze(0)
        rows = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    else:
        rows = g.reshape(-1, g.shape[-1])
    return rows.T @ rows, rows.shape[0]


@dataclass
class StatBuffer:
    """Per-iteration sums for one layer (see :class:`LayerCapture`)."""
    xx: Optional[Tensor] = None
    x_rows: int = 0
    gg: Optional[Tensor] = None
    g_rows: int = 0
    calls: int = 0

    def add_input(self, gram: Tensor, rows: int) -> None:
        self.xx = gram if self.xx is None else self.xx + gram
        self.x_rows += rows
        self.calls += 1

    def add_grad(self, gram: Tensor, rows: int) -> None:
        self.gg = gram if self.gg is None else self.gg + gram
        self.g_rows += rows


class _ForwardHook:
    """Forward hook bound weakly to a capture and to one module name."""

    def __init__(self, capture: 'LayerCapture', name: str) -> None:
        self.capture_ref = weakref.ref(capture)
        self.name = name

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        capture = self.capture_ref()
        if capture is None or not capture.active:
            return
        if capture.modules.get(self.name) is not module:
            return  # a deep copy of the model, or a stale hook
        if not (module.training and torch.is_grad_enabled()):
            return
        if not inputs or not isinstance(inputs[0], Tensor):
            return
        x = inputs[0]
        if x.numel() == 0 or not isinstance(output, Tensor):
            return  # e.g. zero RoIs: nothing to learn from
        if not output.requires_grad:
            return
        # fp32 products even inside an autocast region (autocast would run
        # the matmuls in fp16/bf16 whatever the inputs' dtype)
        want_x, _ = capture.sides[self.name]
        if want_x:
            with torch.autocast(x.device.type, enabled=False):
                gram, rows = input_rows_gram(module, x)
            capture.buffers[self.name].add_input(gram, rows)
        # registered even when Delta^T Delta is not wanted: it also tells the
        # optimizer that a backward pass ran
        output.register_hook(_GradHook(capture, self.name, module))


class _GradHook:
    """Tensor hook on a layer output, recording ``Delta^T Delta``."""

    def __init__(self, capture: 'LayerCapture', name: str,
                 module: nn.Module) -> None:
        self.capture_ref = weakref.ref(capture)
        self.name = name
        self.module_ref = weakref.ref(module)

    def __call__(self, grad: Tensor) -> None:
        capture = self.capture_ref()
        module = self.module_ref()
        if capture is None or module is None:
            return None
        if capture.sides[self.name][1]:
            with torch.autocast(grad.device.type, enabled=False):
                gram, rows = output_grad_gram(module, grad)
            capture.buffers[self.name].add_grad(gram, rows)
        capture.has_backward = True
        return None


class LayerCapture:
    """Collects ``X^T X`` and ``Delta^T Delta`` sums for chosen layers.

    Args:
        modules (dict[str, nn.Module]): Name → module map of the model
            (``dict(model.named_modules())``).
        names (Iterable[str]): Names of the layers to hook; each must be
            supported (see :func:`supported_reason`).
        sides (dict[str, tuple[bool, bool]], optional): Per layer, whether
            ``X^T X`` and ``Delta^T Delta`` are formed.  A side the optimizer
            does not use (wider than ``max_factor_dim``, or FSGD's output
            side) costs nothing: no product, no memory, no all-reduce.
            Defaults to both sides for every layer.

    Attributes:
        active (bool): Collect on the next forward/backward passes.  The
            optimizer sets it for statistics steps only.
        buffers (dict[str, StatBuffer]): Sums since the last :meth:`clear`.
        has_backward (bool): Whether any gradient statistic was recorded
            since the last :meth:`clear`.
    """

    def __init__(self,
                 modules: Dict[str, nn.Module],
                 names: Iterable[str],
                 sides: Optional[Dict[str, Tuple[bool, bool]]] = None) -> None:
        self.names: List[str] = list(names)
        self.modules: Dict[str, nn.Module] = {n: modules[n] for n in self.names}
        sides = sides or {}
        self.sides: Dict[str, Tuple[bool, bool]] = {
            n: tuple(bool(v) for v in sides.get(n, (True, True)))
            for n in self.names
        }
        self.active = False
        self.has_backward = False
        self.buffers: Dict[str, StatBuffer] = {n: StatBuffer() for n in self.names}
        self._handles = [
            self.modules[n].register_forward_hook(_ForwardHook(self, n))
            for n in self.names
        ]

    def clear(self) -> None:
        """Drop everything collected so far."""
        self.buffers = {n: StatBuffer() for n in self.names}
        self.has_backward = False

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __del__(self) -> None:  # hooks must not outlive the optimizer
        self.remove()

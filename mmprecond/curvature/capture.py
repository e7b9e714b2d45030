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

#: Entries of one im2col chunk (fp32): bounds the extra memory of a conv's
#: input statistic to about 128 MiB (plus the Gram matrix and one band of
#: input rows) whatever the feature-map size; a sample larger than this is
#: unfolded a band of output rows at a time.
IM2COL_CHUNK_ELEMENTS = 1 << 25


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


def _conv_padding(module: nn.Conv2d) -> Tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding of a conv's input.

    ``'same'`` (stride 1 only in torch) pads ``d (k - 1)`` in total per
    axis, the odd element going to the bottom / right, as torch does.
    """
    pad = module.padding
    if isinstance(pad, str):
        if pad == 'valid':
            return 0, 0, 0, 0
        kh, kw = module.kernel_size
        dh, dw = module.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return th // 2, th - th // 2, tw // 2, tw - tw // 2
    ph, pw = int(pad[0]), int(pad[1])
    return ph, ph, pw, pw


def _conv_input_gram(module: nn.Conv2d, x: Tensor, has_bias: bool,
                     chunk_elements: int) -> Tuple[Tensor, int]:
    """``X^T X`` of a conv's patch rows, unfolded a bounded slice at a time.

    A chunk is a run of whole samples when one sample's patch matrix fits in
    ``chunk_elements`` entries, otherwise a band of output rows of one
    sample: the input rows that band reads (its receptive field, so bands
    overlap by ``d (k - 1) + 1 - s`` input rows) are cut out and zero-padded
    explicitly, and unfolded without padding.  Every patch is unfolded
    exactly once, so the sum is that of the whole patch matrix; the extra
    memory is one chunk plus its input band.  The ``(C k k, L)`` layout of
    ``F.unfold`` is multiplied as is (``cols @ cols.T``), without the
    transposed copy into rows.
    """
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    top, bottom, left, right = _conv_padding(module)
    n, c, h, w = x.shape
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    out_h = (h + top + bottom - span_h) // sh + 1
    out_w = (w + left + right - span_w) // sw + 1
    k = c * kh * kw
    d = k + (1 if has_bias else 0)
    if n == 0 or out_h <= 0 or out_w <= 0:
        return x.new_zeros((d, d), dtype=torch.float32), 0
    per_row = k * out_w  # unfolded entries of one output row of one sample
    per_sample = per_row * out_h
    if per_sample <= chunk_elements:
        spans = [(b, min(b + max(1, chunk_elements // per_sample), n), 0, out_h)
                 for b in range(0, n, max(1, chunk_elements // per_sample))]
    else:
        band = max(1, chunk_elements // per_row)
        spans = [(b, b + 1, r, min(r + band, out_h)) for b in range(n)
                 for r in range(0, out_h, band)]
    gram = x.new_zeros((k, k), dtype=torch.float32)
    col_sum = x.new_zeros((k, ), dtype=torch.float32) if has_bias else None
    for b0, b1, r0, r1 in spans:
        # input rows read by output rows r0..r1-1, in padded coordinates
        lo = r0 * sh - top
        hi = (r1 - 1) * sh - top + span_h
        part = x[b0:b1, :, max(lo, 0):min(hi, h)].float()
        pads = (left, right, max(0, -lo), max(0, hi - h))
        if any(pads):
            part = F.pad(part, pads)
        cols = F.unfold(part, (kh, kw), dilation=(dh, dw), stride=(sh, sw))
        del part
        _add_patch_gram_(gram, col_sum, cols)
        del cols  # freed before the next chunk is unfolded
    rows = n * out_h * out_w
    # bmm / addmm sums need not be bit-symmetric; the upper triangle is
    # mirrored so the factor is exactly symmetric (and stored packed)
    gram = gram.triu() + gram.triu(1).mT
    if not has_bias:
        return gram, rows
    out = gram.new_empty((d, d))
    out[:-1, :-1] = gram
    out[:-1, -1] = col_sum
    out[-1, :-1] = col_sum
    out[-1, -1].fill_(rows)  # a kernel argument, no host-to-device copy
    return out, rows


def _add_patch_gram_(gram: Tensor, col_sum: Optional[Tensor],
                     cols: Tensor) -> None:
    """``gram += sum_b cols[b] cols[b]^T`` (and the column sums) in place.

    A function of its own so that no loop variable keeps a view of ``cols``
    (and its whole chunk) alive after the caller drops it.
    """
    k = cols.shape[1]
    if len(cols) > 1 and k <= cols.shape[2]:  # (b, k, k) is within the chunk
        gram += torch.bmm(cols, cols.transpose(1, 2)).sum(0)
    else:
        for sample in cols:  # (C k k, L) times its transposed view: no copy
            gram.addmm_(sample, sample.T)
    if col_sum is not None:
        col_sum += cols.sum((0, 2))


def input_rows_gram(module: nn.Module, x: Tensor,
                    chunk_elements: Optional[int] = None) -> Tuple[Tensor, int]:
    """``(X^T X, n_rows)`` of a layer input, computed in fp32 in chunks.

    Linear: every leading index is a row.  Conv2d: every output position of
    every sample is a row holding the (dilated, strided, zero-padded) patch,
    column order matching ``weight.view(C_out, -1)``; the patches are
    unfolded at most ``chunk_elements`` entries at a time (default
    :data:`IM2COL_CHUNK_ELEMENTS`), within a sample if need be.

    Example:
        >>> import torch, torch.nn as nn
        >>> conv = nn.Conv2d(2, 3, 3, padding=1)
        >>> gram, rows = input_rows_gram(conv, torch.randn(1, 2, 4, 4))
        >>> tuple(gram.shape), rows
        ((19, 19), 16)
    """
    has_bias = module.bias is not None
    x = x.detach()
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:  # unbatched input
            x = x.unsqueeze(0)
        limit = IM2COL_CHUNK_ELEMENTS if chunk_elements is None else chunk_elements
        return _conv_input_gram(module, x, has_bias, max(1, int(limit)))
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

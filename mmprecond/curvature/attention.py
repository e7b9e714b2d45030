# Copyright (c) mmprecond contributors. All rights reserved.
"""Adapters that read queries, keys, values and probabilities of attention.

Attention-aware optimizers (AFOpt) need, for every call of a self-attention
module, its input ``X``, the per-head queries ``Q``, keys ``K`` and values
``V``, and the attention probabilities ``A_s``.  Real modules hide these in
different ways: Q, K, V come out of one fused ``qkv`` projection, the logits
get a relative-position bias and a shift mask before the softmax, and some
modules (mmpretrain's ``WindowMSAV2``, ``torch.nn.MultiheadAttention``) call
their projection functionally, so hooks on a ``Linear`` never fire.

An :class:`AttentionAdapter` knows one module type: how the projection
weight splits into the Q, K, V blocks and heads (:meth:`~AttentionAdapter.
layout`) and how to rebuild an :class:`AttentionRecord` from one call
(:meth:`~AttentionAdapter.extract`).  Adapters are looked up by the module's
class in :data:`ATTENTION_ADAPTERS`; :func:`register_attention_adapter`
adds one for another class.  :class:`AttentionTap` installs the hooks and
hands each record to a callback; it knows nothing about optimizers.

How the probabilities are obtained:

* modules with an ``nn.Softmax`` child (Swin ``WindowMSA`` of mmdet and
  mmpretrain, ``WindowMSAV2``): a forward hook on that child returns the
  exact ``A_s``, relative-position bias and shift mask included;
* modules that call ``softmax`` / ``scaled_dot_product_attention``
  functionally (mmpretrain ``MultiheadAttention``, torch's): the
  probabilities are recomputed from the call's input and masks.

Queries, keys and values are always recomputed from the call's input with
the current weights, in fp32 with autocast off (one extra projection per
statistics step).  Probabilities are taken before attention dropout, as in
the thesis' ``X_P = F_V A_s``.

Hooks follow the rules of :mod:`.capture`: they do nothing unless the tap is
:attr:`~AttentionTap.active` (statistics steps), the module is training and
grad mode is on; they hold the tap weakly and check module identity, so a
``copy.deepcopy`` of the model (``EMAHook``) records nothing; every tensor is
read inside the hook, before any later in-place operation can change it.

Example:
    >>> import torch, torch.nn as nn
    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> records = []
    >>> tap = AttentionTap({'attn': mha}, lambda n, r: records.append(r))
    >>> tap.active = True
    >>> x = torch.randn(3, 5, 8)
    >>> out, _ = mha(x, x, x)
    >>> rec = records[0]
    >>> rec.q.shape, rec.probs.shape
    (torch.Size([3, 2, 5, 4]), torch.Size([3, 2, 5, 5]))
    >>> xp = merge_heads(rec.probs @ rec.v)  # the input of out_proj
    >>> bool(torch.allclose(mha.out_proj(xp), out, atol=1e-5))
    True
"""
import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class UnsupportedCall(Exception):
    """Raised by an adapter for a call it cannot describe (e.g. cross-attention)."""


@dataclass(eq=False)
class ProjectionBlock:
    """The rows of a (possibly fused) projection that produce Q, K or V.

    Attributes:
        weight (nn.Parameter): The whole projection weight, e.g. a fused
            ``qkv.weight`` of shape ``(3 C, C_in)``.
        rows (slice): Rows of ``weight`` producing this block (head ``h``
            owns rows ``h * d : (h + 1) * d`` inside it).
        bias (nn.Parameter, optional): The parameter holding this block's
            bias, or ``None`` if the block has none.
        bias_rows (slice): Entries of ``bias`` belonging to this block.
    """
    weight: nn.Parameter
    rows: slice
    bias: Optional[nn.Parameter] = None
    bias_rows: slice = field(default_factory=lambda: slice(None))

    def weight_block(self) -> Tensor:
        """This block's weight rows, ``(H d, C_in)``."""
        return self.weight[self.rows]

    def bias_block(self) -> Optional[Tensor]:
        """This block's bias, ``(H d,)``, or ``None``."""
        return None if self.bias is None else self.bias[self.bias_rows]


@dataclass(eq=False)
class AttentionLayout:
    """How an attention module's Q, K, V projections are laid out.

    Attributes:
        num_heads (int): Number of heads ``H``.
        head_dim (int): Per-head dimension ``d`` of queries and keys.
        in_dim (int): Input dimension ``C_in`` of the projections.
        q (ProjectionBlock): Rows producing the queries.
        k (ProjectionBlock): Rows producing the keys.
        v (ProjectionBlock): Rows producing the values.
        functional_out_proj (nn.Linear, optional): The output projection,
            when the module applies it with ``F.linear`` so that hooks on it
            never fire (``torch.nn.MultiheadAttention``); its input is
            ``merge_heads(probs @ v)`` of the record (before dropout).
    """
    num_heads: int
    head_dim: int
    in_dim: int
    q: ProjectionBlock
    k: ProjectionBlock
    v: ProjectionBlock
    functional_out_proj: Optional[nn.Module] = None

    @property
    def blocks(self) -> Dict[str, ProjectionBlock]:
        """``{'q': ..., 'k': ..., 'v': ...}``."""
        return dict(q=self.q, k=self.k, v=self.v)

    @property
    def has_bias(self) -> bool:
        """Whether any of the three blocks has a bias."""
        return any(b.bias is not None for b in (self.q, self.k, self.v))

    def parameters(self) -> Tuple[nn.Parameter, ...]:
        """The distinct parameters of the Q, K, V projections."""
        out: Dict[int, nn.Parameter] = {}
        for b in (self.q, self.k, self.v):
            out[id(b.weight)] = b.weight
            if b.bias is not None:
                out[id(b.bias)] = b.bias
        return tuple(out.values())


@dataclass(eq=False)
class AttentionRecord:
    """One call of a self-attention module, per head, in fp32.

    With ``logits = scale_h * q_i . k_j (+ position bias, masks)`` and
    ``probs = softmax(logits)`` over ``j``, the module computes
    ``merge_heads(probs @ v)`` and feeds it to its output projection.

    Attributes:
        x (Tensor): Input of the Q/K/V projections, ``(B, N, C_in)``.
        q (Tensor): Queries as they enter the logits (after any
            normalisation, before ``scale``), ``(B, H, N, d)``.
        k (Tensor): Keys, ``(B, H, N, d)``.
        v (Tensor): Values (projection bias included), ``(B, H, N, d_v)``.
        probs (Tensor): Attention probabilities, ``(B, H, N, N)``; rows
            sum to one (masked keys have probability 0).
        scale (Tensor): Logit scale per head, ``(H,)``.
    """
    x: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    probs: Tensor
    scale: Tensor


def merge_heads(t: Tensor) -> Tensor:
    """``(B, H, N, d) -> (B, N, H d)``, the head order of fused projections."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def split_heads(t: Tensor, num_heads: int) -> Tensor:
    """``(B, N, H d) -> (B, H, N, d)``."""
    b, n, c = t.shape
    return t.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _fp32_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear`` in fp32 on detached tensors, whatever autocast says."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.detach().float(), weight.detach().float(),
                        None if bias is None else bias.detach().float())


def _fused_layout(weight: nn.Parameter, num_heads: int,
                  biases: Tuple[Optional[nn.Parameter], ...]) -> AttentionLayout:
    """Layout of a ``(3 C, C_in)`` fused projection; ``biases`` per block.

    ``biases`` is either ``(fused_bias,)`` (one ``3 C`` vector, or ``None``)
    or three per-block parameters (any of them ``None``).
    """
    c = weight.shape[0] // 3
    rows = [slice(i * c, (i + 1) * c) for i in range(3)]
    if len(biases) == 1:
        blocks = [ProjectionBlock(weight, r, biases[0], r if biases[0] is not None
                                  else slice(None)) for r in rows]
    else:
        blocks = [ProjectionBlock(weight, r, b) for r, b in zip(rows, biases)]
    return AttentionLayout(num_heads, c // num_heads, weight.shape[1], *blocks)


class AttentionAdapter:
    """Reads one type of self-attention module.

    Subclasses implement :meth:`layout` and :meth:`extract`; modules with an
    ``nn.Softmax`` child return it from :meth:`softmax_module` so that the
    tap hands its exact output to :meth:`extract`.
    """

    def unsupported_reason(self, module: nn.Module) -> Optional[str]:
        """Why this module instance cannot be treated, or ``None``."""
        return None

    def layout(self, module: nn.Module) -> AttentionLayout:
        """The Q, K, V blocks of the module's projection parameters."""
        raise NotImplementedError

    def softmax_module(self, module: nn.Module) -> Optional[nn.Module]:
        """The child whose output is ``A_s``, or ``None`` to recompute it."""
        return None

    def extract(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any],
                probs: Optional[Tensor]) -> AttentionRecord:
        """Build the record of one call (``args``/``kwargs`` of ``forward``).

        Raises:
            UnsupportedCall: For calls the adapter cannot describe.
        """
        raise NotImplementedError


def _first_arg(args: tuple, kwargs: Dict[str, Any], name: str) -> Tensor:
    if args:
        return args[0]
    if name in kwargs:
        return kwargs[name]
    raise UnsupportedCall(f'no input tensor {name!r} in the call')


class SwinWindowMSAAdapter(AttentionAdapter):
    """Swin ``WindowMSA`` (mmdet 3.x and mmpretrain 1.x; identical forward).

    ``qkv = Linear(C, 3C)``; ``logits = scale q k^T + relative-position bias
    (+ shift mask)``; ``A_s`` is taken from the ``softmax`` child.
    """

    def layout(self, module: nn.Module) -> AttentionLayout:
        return _fused_layout(module.qkv.weight, module.num_heads,
                             (module.qkv.bias, ))

    def softmax_module(self, module: nn.Module) -> Optional[nn.Module]:
        return module.softmax

    def extract(self, module, args, kwargs, probs):
        x = _first_arg(args, kwargs, 'x')
        qkv = _fp32_linear(x, module.qkv.weight, module.qkv.bias)
        q, k, v = (split_heads(t, module.num_heads) for t in qkv.chunk(3, -1))
        scale = torch.full((module.num_heads, ), float(module.scale),
                           device=x.device)
        return AttentionRecord(x.detach().float(), q, k, v, probs.detach().float(),
                               scale)


class SwinWindowMSAV2Adapter(AttentionAdapter):
    """mmpretrain ``WindowMSAV2`` (Swin V2: cosine attention, CPB bias).

    ``qkv`` is applied functionally with the bias ``[q_bias, 0, v_bias]``;
    the logits are ``tau_h * q^ . k^`` with unit-normalised ``q^``, ``k^``
    and ``tau_h = exp(min(logit_scale_h, log 100))``, plus the
    continuous-position bias and mask.  The record's ``q``, ``k`` are the
    normalised vectors and ``scale`` is ``tau``; ``A_s`` comes from the
    ``softmax`` child.
    """

    def layout(self, module: nn.Module) -> AttentionLayout:
        return _fused_layout(module.qkv.weight, module.num_heads,
                             (module.q_bias, None, module.v_bias))

    def softmax_module(self, module: nn.Module) -> Optional[nn.Module]:
        return module.softmax

    def extract(self, module, args, kwargs, probs):
        x = _first_arg(args, kwargs, 'x')
        bias = None
        if module.q_bias is not None:
            bias = torch.cat([module.q_bias, torch.zeros_like(module.v_bias),
                              module.v_bias])
        qkv = _fp32_linear(x, module.qkv.weight, bias)
        q, k, v = (split_heads(t, module.num_heads) for t in qkv.chunk(3, -1))
        tau = torch.clamp(module.logit_scale.detach().float(),
                          max=math.log(100.0)).exp().reshape(-1)
        return AttentionRecord(x.detach().float(), F.normalize(q, dim=-1),
                               F.normalize(k, dim=-1), v,
                               probs.detach().float(), tau)


class MMPretrainMHAAdapter(AttentionAdapter):
    """mmpretrain ``MultiheadAttention`` (ViT / DeiT / BEiT-less blocks).

    ``qkv = Linear(C_in, 3C)``; probabilities ``softmax(scale q k^T)`` are
    recomputed (the module calls ``scaled_dot_product_attention``).
    """

    def layout(self, module: nn.Module) -> AttentionLayout:
        return _fused_layout(module.qkv.weight, module.num_heads,
                             (module.qkv.bias, ))

    @staticmethod
    def _scale(module: nn.Module) -> float:
        """The logit multiplier the module really applies.

        mmpretrain 1.2 calls ``F.scaled_dot_product_attention`` (multiplier
        ``d^-1/2``) unless ``qk_scale`` is set; then it calls its Python
        implementation through a ``partial`` whose ``scale`` *divides* the
        logits.  Older versions store the multiplier as ``module.scale``.
        """
        sdpa = getattr(module, 'scaled_dot_product_attention', None)
        if isinstance(sdpa, functools.partial) and 'scale' in sdpa.keywords:
            return 1.0 / float(sdpa.keywords['scale'])
        if hasattr(module, 'scale'):
            return float(module.scale)
        return module.head_dims**-0.5

    def extract(self, module, args, kwargs, probs):
        x = _first_arg(args, kwargs, 'x')
        qkv = _fp32_linear(x, module.qkv.weight, module.qkv.bias)
        q, k, v = (split_heads(t, module.num_heads) for t in qkv.chunk(3, -1))
        scale = torch.full((module.num_heads, ), self._scale(module),
                           device=x.device)
        probs = torch.softmax((q @ k.transpose(-2, -1)) * scale[:, None, None],
                              dim=-1)
        return AttentionRecord(x.detach().float(), q, k, v, probs, scale)


_TORCH_MHA_ARGS = ('query', 'key', 'value', 'key_padding_mask', 'need_weights',
                   'attn_mask', 'average_attn_weights', 'is_causal')


class TorchMHAAdapter(AttentionAdapter):
    """``torch.nn.MultiheadAttention`` used as self-attention.

    Supported: the packed ``in_proj_weight`` (``kdim == vdim == embed_dim``),
    ``batch_first`` either way, ``attn_mask`` (2-D or per-head 3-D, boolean
    or additive) and ``key_padding_mask``.  A call whose ``key`` differs
    from its ``query`` (cross-attention; different positional encodings)
    is skipped (:class:`UnsupportedCall`): the thesis' equations need one
    token set.  ``value`` may differ from ``query`` (e.g. mmcv's
    ``MultiheadAttention`` adds positions to query and key only).
    """

    def unsupported_reason(self, module: nn.Module) -> Optional[str]:
        if not module._qkv_same_embed_dim:
            return 'separate q/k/v projection weights (kdim/vdim != embed_dim)'
        if module.bias_k is not None:
            return 'add_bias_kv=True'
        if module.add_zero_attn:
            return 'add_zero_attn=True'
        return None

    def layout(self, module: nn.Module) -> AttentionLayout:
        layout = _fused_layout(module.in_proj_weight, module.num_heads,
                               (module.in_proj_bias, ))
        layout.functional_out_proj = module.out_proj
        return layout

    def extract(self, module, args, kwargs, probs):
        call = dict(zip(_TORCH_MHA_ARGS, args))
        call.update(kwargs)
        query, key, value = call['query'], call['key'], call['value']
        if key is not query and not (key.shape == query.shape
                                     and torch.equal(key, query)):
            raise UnsupportedCall('key differs from query (cross-attention)')
        if value.shape != query.shape:
            raise UnsupportedCall('value has another shape than query')
        if query.dim() == 2:  # unbatched (N, E)
            query, value = query.unsqueeze(0), value.unsqueeze(0)
        elif not module.batch_first:
            query, value = query.transpose(0, 1), value.transpose(0, 1)
        heads = module.num_heads
        w, b = module.in_proj_weight, module.in_proj_bias
        e = module.embed_dim
        wq, wk, wv = w[:e], w[e:2 * e], w[2 * e:]
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e:2 * e],
                                                          b[2 * e:])
        q = split_heads(_fp32_linear(query, wq, bq), heads)
        k = split_heads(_fp32_linear(query, wk, bk), heads)
        v = split_heads(_fp32_linear(value, wv, bv), heads)
        scale = torch.full((heads, ), module.head_dim**-0.5, device=q.device)
        logits = (q @ k.transpose(-2, -1)) * scale[:, None, None]
        logits = logits + self._mask_bias(call, logits)
        probs = torch.softmax(logits, dim=-1)
        return AttentionRecord(query.detach().float(), q, k, v, probs, scale)

    @staticmethod
    def _mask_bias(call: Dict[str, Any], logits: Tensor) -> Tensor:
        """Additive ``(B, H, N, N)``-broadcastable mask from the call's masks."""
        bsz, heads, n, _ = logits.shape
        out = logits.new_zeros(())
        mask = call.get('attn_mask')
        if mask is not None:
            if mask.dim() == 3:
                mask = mask.reshape(bsz, heads, n, n)
            out = out + _as_additive(mask, logits.dtype)
        pad = call.get('key_padding_mask')
        if pad is not None:
            pad = pad.reshape(bsz, 1, 1, n) if pad.dim() == 2 else pad.reshape(
                1, 1, 1, n)
            out = out + _as_additive(pad, logits.dtype)
        return out


def _as_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean masks (``True`` = not allowed) become ``-inf``; floats pass."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype,
                           device=mask.device).masked_fill_(mask, float('-inf'))
    return mask.detach().to(dtype)


#: Adapters by fully qualified class name (``module.__qualname__``).
ATTENTION_ADAPTERS: Dict[str, AttentionAdapter] = {}


def register_attention_adapter(adapter: AttentionAdapter, *class_paths: str) -> None:
    """Use ``adapter`` for modules of the given classes.

    Classes are named by ``'<module>.<qualname>'`` so that registering does
    not import mmdet or mmpretrain.  A subclass is served by its parent's
    adapter only if it does not override ``forward``.

    Args:
        adapter (AttentionAdapter): The adapter instance.
        *class_paths (str): E.g. ``'mmdet.models.backbones.swin.WindowMSA'``.
    """
    for path in class_paths:
        ATTENTION_ADAPTERS[path] = adapter


register_attention_adapter(SwinWindowMSAAdapter(),
                           'mmdet.models.backbones.swin.WindowMSA',
                           'mmpretrain.models.utils.attention.WindowMSA')
register_attention_adapter(SwinWindowMSAV2Adapter(),
                           'mmpretrain.models.utils.attention.WindowMSAV2')
register_attention_adapter(MMPretrainMHAAdapter(),
                           'mmpretrain.models.utils.attention.MultiheadAttention')
register_attention_adapter(TorchMHAAdapter(),
                           'torch.nn.modules.activation.MultiheadAttention')


def find_adapter(module: nn.Module) -> Optional[AttentionAdapter]:
    """The registered adapter for ``module``'s class, or ``None``."""
    cls = type(module)
    for base in cls.__mro__:
        adapter = ATTENTION_ADAPTERS.get(f'{base.__module__}.{base.__qualname__}')
        if adapter is not None:
            return adapter if cls.forward is base.forward else None
    return None


class _CallHook:
    """Forward pre-hook on an attention module (weak, identity-checked)."""

    def __init__(self, tap: 'AttentionTap', name: str) -> None:
        self.tap_ref = weakref.ref(tap)
        self.name = name

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        tap = self.tap_ref()
        if tap is not None and tap.modules.get(self.name) is module:
            tap._on_call(self.name, module, args, kwargs)
        return None


class _SoftmaxHook:
    """Forward hook on an attention module's softmax child."""

    def __init__(self, tap: 'AttentionTap', name: str) -> None:
        self.tap_ref = weakref.ref(tap)
        self.name = name

    def __call__(self, softmax: nn.Module, inputs: tuple, output: Tensor) -> None:
        tap = self.tap_ref()
        if tap is not None and tap.softmaxes.get(self.name) is softmax:
            tap._on_probs(self.name, output)


class AttentionTap:
    """Hooks attention modules and reports an :class:`AttentionRecord` per call.

    Args:
        modules (dict[str, nn.Module]): Attention modules by name; each must
            have an adapter (:func:`find_adapter`).
        on_record (Callable[[str, AttentionRecord], None]): Called with the
            module name and the record of every call made while
            :attr:`active` is set, the module is training and grad mode is on.
        on_skip (Callable[[str, str], None], optional): Called with the name
            and reason when an adapter rejects a call.

    A record's tensors may share memory with the module's own (the softmax
    output, the input): use them inside ``on_record``, which runs before
    the module's forward continues, and copy what must outlive the call.

    Attributes:
        active (bool): Record the next forward passes.
    """

    def __init__(self,
                 modules: Dict[str, nn.Module],
                 on_record: Callable[[str, AttentionRecord], None],
                 on_skip: Optional[Callable[[str, str], None]] = None) -> None:
        self.modules = dict(modules)
        self.adapters: Dict[str, AttentionAdapter] = {}
        self.softmaxes: Dict[str, nn.Module] = {}
        self.on_record = on_record
        self.on_skip = on_skip
        self.active = False
        self._pending: Dict[str, Tuple[nn.Module, tuple, dict]] = {}
        self._handles = []
        for name, module in self.modules.items():
            adapter = find_adapter(module)
            if adapter is None:
                raise ValueError(f'no attention adapter for {name} '
                                 f'({type(module).__qualname__})')
            self.adapters[name] = adapter
            self._handles.append(module.register_forward_pre_hook(
                _CallHook(self, name), with_kwargs=True))
            softmax = adapter.softmax_module(module)
            if softmax is not None:
                self.softmaxes[name] = softmax
                self._handles.append(
                    softmax.register_forward_hook(_SoftmaxHook(self, name)))

    def _wanted(self, module: nn.Module) -> bool:
        return self.active and module.training and torch.is_grad_enabled()

    def _on_call(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pending.pop(name, None)
        if not self._wanted(module):
            return
        if name in self.softmaxes:
            self._pending[name] = (module, args, kwargs)
            return
        self._deliver(name, module, args, kwargs, None)

    def _on_probs(self, name: str, probs: Tensor) -> None:
        pending = self._pending.pop(name, None)
        if pending is None or not torch.is_grad_enabled():
            return
        module, args, kwargs = pending
        self._deliver(name, module, args, kwargs, probs)

    def _deliver(self, name: str, module: nn.Module, args: tuple, kwargs: dict,
                 probs: Optional[Tensor]) -> None:
        # fp32 maths even inside an autocast region (the hooks run there)
        weight = self.adapters[name].layout(module).q.weight
        fp32 = torch.autocast(device_type=weight.device.type, enabled=False)
        try:
            with torch.no_grad(), fp32:
                record = self.adapters[name].extract(module, args, kwargs, probs)
        except UnsupportedCall as exc:
            if self.on_skip is not None:
                self.on_skip(name, str(exc))
            return
        with torch.no_grad(), fp32:
            self.on_record(name, record)

    def clear(self) -> None:
        """Forget calls whose probabilities have not arrived yet."""
        self._pending.clear()

    def remove(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __del__(self) -> None:
        self.remove()


def find_attention_modules(
        model: nn.Module) -> Dict[str, Tuple[nn.Module, Optional[str]]]:
    """Every module with a registered adapter, with the reason it is unusable.

    Returns:
        dict[str, tuple[nn.Module, str | None]]: By module name: the module
        and ``None`` if its adapter supports it, else the adapter's reason.
    """
    found = {}
    for name, module in model.named_modules():
        adapter = find_adapter(module)
        if adapter is not None:
            found[name] = (module, adapter.unsupported_reason(module))
    return found

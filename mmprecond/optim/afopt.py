# Copyright (c) mmprecond contributors. All rights reserved.
"""AFOpt and Ada_AFOpt: the attention-feature-based optimizer.

Reference: Y. Sun, *Designing Effective Preconditioned Optimizers for Deep
Neural Network Training*, PhD thesis, The Hong Kong Polytechnic University,
2024, chapter 5 (eqs. 5.3-5.24, Algorithms 7 and 8).  It extends FSGD
(H. Yong, PhD thesis, PolyU 2022) from single layers to whole attention
modules.

Notation (row convention, one window / sequence ``b`` and head ``h``):
``q_i, k_j, v_j`` are the rows of ``Q, K, V`` (``N x d``), the logits are
``l_ij = scale_h q_i . k_j (+ position bias, masks)``, ``s_i = softmax(l_i)``
and the head output, the input of the projection layer, is
``o_i = sum_j s_ij v_j`` (``X_P`` stacks the ``o_i`` of all heads).
"""
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from mmengine.registry import OPTIMIZERS
from torch import Tensor

from ..curvature.attention import (
    AttentionLayout,
    AttentionRecord,
    AttentionTap,
    ProjectionBlock,
    find_adapter,
    find_attention_modules,
    merge_heads,
)
from ..curvature.capture import input_rows_gram
from ..curvature.factors import BatchStatistics
from ..distributed import all_reduce_sum_, world_size
from .base import loaded_layer_state
from .defaults import extended_signature, variant
from .fsgd import FeatureDescent

#: Elements of the largest ``(b, H, N, N)`` temporary of the softmax
#: Jacobian statistics (fp32): about 64 MB per temporary.
JACOBIAN_CHUNK_ELEMENTS = 1 << 24

#: Statistic keys of an attention module in ``layer_state``: ``R`` the
#: input second moment (``R_XX``), ``LQ`` / ``LK`` the per-head left factors
#: of ``W_Q`` / ``W_K`` (``L_QQ`` / ``L_KK``), ``RV`` the right factor of
#: ``W_V`` (the estimate of ``E[(X A_s)(X A_s)^T]``).
ATTENTION_STATS = ('R', 'LQ', 'LK', 'RV')


def softmax_jacobian_gram(probs: Tensor, v: Tensor) -> Tensor:
    r"""``M = sum_i J_i V V^T J_i`` with ``J_i = diag(s_i) - s_i s_i^T``.

    ``J_i`` is the Jacobian of the ``i``-th softmax row, so ``V^T J_i`` maps
    a change of the logits of query ``i`` to the change of its output.
    With ``P = V V^T``, ``O = S V`` and ``U = S o (O V^T)`` (``o``:
    elementwise), expanding the sum gives the closed form

        ``M = P o (S^T S) - U^T S - S^T U + S^T diag(U 1) S``,

    which costs ``O(N^3 + N^2 d)`` per window and head instead of the
    ``O(N^2 d^2)`` of forming every ``V^T J_i K``.

    Args:
        probs (Tensor): ``(..., N, N)`` softmax rows ``s_i``.
        v (Tensor): ``(..., N, d)`` values.

    Returns:
        Tensor: ``(..., N, N)`` symmetric PSD ``M``.

    Example:
        >>> s = torch.softmax(torch.randn(4, 4), -1); v = torch.randn(4, 2)
        >>> J = [torch.diag(r) - torch.outer(r, r) for r in s]
        >>> ref = sum(j @ v @ v.T @ j for j in J)
        >>> bool(torch.allclose(softmax_jacobian_gram(s, v), ref, atol=1e-6))
        True
    """
    st = probs.transpose(-2, -1)
    p = v @ v.transpose(-2, -1)
    u = probs * ((probs @ v) @ v.transpose(-2, -1))
    uts = u.transpose(-2, -1) @ probs
    return p * (st @ probs) - uts - uts.transpose(-2, -1) + st @ (
        u.sum(-1, keepdim=True) * probs)


def _gram(rows: Tensor, with_ones: bool) -> Tensor:
    """``[rows, 1]^T [rows, 1]`` (ones column only if ``with_ones``)."""
    if with_ones:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    return rows.T @ rows


@dataclass
class AttentionSums:
    """One iteration's statistic sums of one attention module (fp32).

    Attributes:
        xx (Tensor, optional): ``sum [x; 1][x; 1]^T`` over tokens.
        lq (Tensor, optional): ``sum_i scale^2 K^T J_i V V^T J_i K`` per head.
        lk (Tensor, optional): The same with ``Q`` in place of ``K``.
        vv (Tensor, optional): ``sum [y; 1][y; 1]^T``, ``y`` the value-side
            input recovered from ``X_P`` (see :class:`AFOpt`).
        rows (int): Number of tokens (= queries) summed.
    """
    xx: Optional[Tensor] = None
    lq: Optional[Tensor] = None
    lk: Optional[Tensor] = None
    vv: Optional[Tensor] = None
    rows: int = 0

    def add(self, key: str, value: Tensor) -> None:
        old = getattr(self, key)
        setattr(self, key, value if old is None else old + value)


def value_inputs(xp: Tensor, block: ProjectionBlock, jitter: float) -> Tensor:
    """Recover ``y_i = X A_s`` columns from ``X_P`` (thesis eq. 5.13).

    ``o_i - b_V = W_V y_i``, so ``y_i = (W_V^T W_V + jitter I)^-1 W_V^T
    (o_i - b_V)``; for one head and ``jitter -> 0`` this is exactly
    ``sum_j s_ij x_j``.  The bias is subtracted because rows of ``A_s`` sum
    to one, so ``b_V`` passes through the attention unchanged.

    Args:
        xp (Tensor): ``(n, C_v)`` rows of ``X_P`` (all heads merged).
        block (ProjectionBlock): The value rows of the projection.
        jitter (float): Added to the diagonal of ``W_V^T W_V`` (1e-4 in
            the thesis).

    Returns:
        Tensor: ``(n, C_in)`` rows ``y_i``.
    """
    w = block.weight_block().detach().float()
    bias = block.bias_block()
    if bias is not None:
        xp = xp - bias.detach().float()
    wvv = w.T @ w
    wvv.diagonal().add_(jitter)
    # solve_ex: no error check, which would read the device; a failed
    # solve gives non-finite statistics, which are then not folded
    pinv = torch.linalg.solve_ex(wvv, w.T)[0]  # (C_in, C_v)
    return xp @ pinv.T


def _store_block_direction(block: ProjectionBlock, in_dim: int,
                           directions: Dict[Tensor, Tensor], copied: set,
                           d: Tensor) -> None:
    """Write ``d = [dW_block, db_block]`` into the rows of its parameters."""
    for param, rows, part in ((block.weight, block.rows, d[:, :in_dim]),
                              (block.bias, block.bias_rows, d[:, -1])):
        if param is None or param not in directions:
            continue
        if param not in copied:
            directions[param] = directions[param].clone()
            copied.add(param)
        directions[param][rows] = part.to(directions[param].dtype)


def accumulate_record(sums: AttentionSums, rec: AttentionRecord,
                      layout: AttentionLayout, jitter: float) -> Tensor:
    """Add one call's statistics (see :class:`AttentionSums`) to ``sums``.

    Returns:
        Tensor: The rows of ``X_P``, ``(B N, H d)``, for reuse.
    """
    bsz, heads, n, d = rec.q.shape
    with_ones = layout.has_bias
    sums.add('xx', _gram(rec.x.reshape(-1, rec.x.shape[-1]), with_ones))
    scale2 = rec.scale.square()[:, None, None]
    chunk = max(1, JACOBIAN_CHUNK_ELEMENTS // max(heads * n * n, 1))
    lq = rec.q.new_zeros(heads, d, d)
    lk = rec.q.new_zeros(heads, d, d)
    for start in range(0, bsz, chunk):
        sl = slice(start, start + chunk)
        m = softmax_jacobian_gram(rec.probs[sl], rec.v[sl])
        lq += torch.einsum('bhnd,bhne->hde', rec.k[sl], m @ rec.k[sl])
        lk += torch.einsum('bhnd,bhne->hde', rec.q[sl], m @ rec.q[sl])
    sums.add('lq', lq * scale2)
    sums.add('lk', lk * scale2)
    xp = merge_heads(rec.probs @ rec.v).reshape(bsz * n, -1)
    sums.add('vv', _gram(value_inputs(xp, layout.v, jitter), with_ones))
    sums.rows += bsz * n
    return xp


class AttentionFeatureDescent(FeatureDescent):
    """FSGD for ``Linear`` layers plus attention-feature descent for Q, K, V.

    See :class:`AFOpt` for the algorithm; this family holds everything but
    the choice of base update (its variants: :class:`AFOpt`, SGDM base, and
    :class:`Ada_AFOpt`, AdamW base).

    Args:
        value_jitter (float): Added to the diagonal of ``W_V^T W_V``.
            Defaults to 1e-4.
        **keywords: Those of :class:`~mmprecond.optim.fsgd.FeatureDescent`
            (``base``, ``model``, the base update's, ``stat_interval``,
            ``refresh_interval`` = ``T_u``, ``damping`` = ``eta``, ...).
    """

    def __init__(self, params: Iterable, *, value_jitter: float = 1e-4,
                 **keywords: Any) -> None:
        if not value_jitter > 0:
            raise ValueError(f'Invalid value_jitter: {value_jitter} (must be > 0)')
        self.value_jitter = float(value_jitter)
        self.attention: Dict[str, Tuple[nn.Module, AttentionLayout]] = {}
        super().__init__(params, **keywords)
        base = self.base
        self._layer_names = {id(m): n for n, m in self.layers.items()}
        self.attention_sums = {n: AttentionSums() for n in self.attention}
        self.tap = AttentionTap({n: m for n, (m, _) in self.attention.items()},
                                self._on_record, self._on_skip)
        self.tap.active = self.capture.active
        if not self.attention:
            fits = 'FSGD' if base == 'sgdm' else 'FAdam'
            print_log(
                f'[{type(self).__name__}] the model has no supported '
                'self-attention module (mmdet/mmpretrain Swin WindowMSA, '
                'mmpretrain WindowMSAV2 / MultiheadAttention, '
                'torch.nn.MultiheadAttention), so there are no W_Q, W_K, W_V '
                f'to precondition and training proceeds exactly as {fits}. '
                f"Use optimizer type='{fits}' to say so, or register an "
                'adapter with mmprecond.curvature.attention.'
                'register_attention_adapter.',
                logger='current',
                level=30)
            self.fallbacks.counts['no_attention'] = 1

    # ------------------------------------------------------------------ setup
    def _select_layers(self, model: nn.Module,
                       layer_types: tuple) -> Dict[str, nn.Module]:
        owned = {id(p) for g in self.param_groups for p in g['params']}
        skipped: List[str] = []
        for name, (module, reason) in find_attention_modules(model).items():
            layout = None
            if reason is None:
                layout = find_adapter(module).layout(module)
                if not all(id(p) in owned and p.requires_grad
                           for p in layout.parameters()):
                    reason = 'Q/K/V projection frozen or not optimised here'
            if reason is None:
                self.attention[name] = (module, layout)
            else:
                skipped.append(f'{name}: {reason}')
        if skipped:
            self.fallbacks.info(
                'excluded_attention',
                f'{len(skipped)} attention module(s) are treated as plain '
                'layers:\n  ' + '\n  '.join(skipped))
        chosen = super()._select_layers(model, layer_types)
        # Linear layers holding Q/K/V weights are preconditioned as attention.
        qkv = {id(layout.q.weight) for _, layout in self.attention.values()}
        return {n: m for n, m in chosen.items() if id(m.weight) not in qkv}

    def _on_record(self, name: str, rec: AttentionRecord) -> None:
        if rec.q.numel() == 0:
            return  # a call without tokens (empty batch) adds nothing
        layout = self.attention[name][1]
        xp = accumulate_record(self.attention_sums[name], rec, layout,
                               self.value_jitter)
        proj = layout.functional_out_proj
        proj_name = None if proj is None else self._layer_names.get(id(proj))
        if proj_name is not None:  # its own hooks never fire: feed FSGD here
            self.capture.buffers[proj_name].add_input(*input_rows_gram(proj, xp))

    def _on_skip(self, name: str, reason: str) -> None:
        self.fallbacks.record(
            'attention_call_skipped',
            f'a call of {name} was not recorded ({reason}); its Q/K/V keep '
            'the statistics of the other calls')

    def _reset_sums(self) -> None:
        self.attention_sums = {n: AttentionSums() for n in self.attention}
        self.tap.clear()

    # ------------------------------------------------------------ statistics
    def _reduce_sums(self) -> Tensor:
        """Sum every attention module's statistics over ranks (fixed order).

        The token counts travel as one int64 device tensor at the end of the
        same all-reduce (no host-side collective, nothing read back).

        Returns:
            Tensor: The summed token count of each attention module.
        """
        tensors: List[Tensor] = []
        for name, (_, layout) in self.attention.items():
            s = self.attention_sums[name]
            dev = layout.q.weight.device
            d_in = layout.in_dim + int(layout.has_bias)
            hdd = (layout.num_heads, layout.head_dim, layout.head_dim)
            for key, shape in (('xx', (d_in, d_in)), ('lq', hdd), ('lk', hdd),
                               ('vv', (d_in, d_in))):
                if getattr(s, key) is None:
                    setattr(s, key, torch.zeros(shape, device=dev))
                tensors.append(getattr(s, key))
        rows = self._device_counts(
            [self.attention_sums[n].rows for n in self.attention])
        all_reduce_sum_(tensors + [rows])
        return rows

    def update_statistics(self, stats: Dict[str, BatchStatistics], step: int) -> None:
        super().update_statistics(stats, step)
        # under torch.distributed the summed counts stay on the device: every
        # module is folded, with a presence flag where no rank had tokens
        rows = (self._reduce_sums()
                if world_size() > 1 and self.attention else None)
        items, present = [], []
        for i, name in enumerate(self.attention):
            s = self.attention_sums[name]
            if rows is None and s.rows == 0:
                continue
            divisor = (float(s.rows) if rows is None else
                       rows[i].clamp_min(1).to(s.xx.dtype))
            st = self.layer_state.setdefault(name, {})
            for key, total in dict(R=s.xx, LQ=s.lq, LK=s.lk, RV=s.vv).items():
                items.append((st, key, f'{name}.{key}', total.div_(divisor)))
                present.append(None if rows is None else rows[i] > 0)
        self.fold_statistics(items, 1 - self.stat_decay, present=present)
        self._reset_sums()

    def _refresh_slots(self, step: int) -> List[Tuple[Dict[str, Tensor], str]]:
        """FSGD's slots plus the attention statistics that are due.

        All of them are refreshed together, batched by size, by
        :meth:`FeatureDescent.update_preconditioners`.
        """
        due = self.refresh_due(step)
        return super()._refresh_slots(step) + [
            slot for name in self.attention for slot in self._due_slots(
                self.layer_state.get(name, {}), ATTENTION_STATS, due)]

    # --------------------------------------------------------- preconditioner
    @staticmethod
    def _block_grad(block: ProjectionBlock, with_ones: bool) -> Optional[Tensor]:
        """``[dW_block, db_block]`` (zero bias column if the block has none)."""
        gw = block.weight.grad
        if gw is None:
            return None
        g = gw[block.rows].float()
        if with_ones:
            gb = None
            if block.bias is not None and block.bias.grad is not None:
                gb = block.bias.grad[block.bias_rows].float()
            gb = g.new_zeros(g.shape[0]) if gb is None else gb
            g = torch.cat([g, gb[:, None]], 1)
        return g

    def attention_direction(self, name: str, key: str, g: Tensor) -> Optional[Tensor]:
        """Preconditioned ``[dW, db]`` of block ``key`` (before norm recovery).

        ``q``: ``D_QQ^h G_Q^h D_XX`` per head ``h``; ``k``: ``D_KK^h G_K^h
        D_XX``; ``v``: ``G_V D_VV``.  A missing inverse counts as identity;
        ``None`` if none is available yet.
        """
        st = self.layer_state.get(name, {})
        layout = self.attention[name][1]
        left = dict(q='LQ_inv', k='LK_inv').get(key)
        right = 'RV_inv' if key == 'v' else 'R_inv'
        pg = g
        if left is not None and left in st:
            heads = layout.num_heads
            pg = (st[left] @ pg.reshape(heads, -1, pg.shape[1])).reshape(pg.shape)
        if right in st:
            pg = pg @ st[right]
        return None if pg is g else pg

    def preconditioned_gradients(self, directions: Dict[Tensor, Tensor]):
        """The FSGD layers' items, then one per attention ``Q``/``K``/``V`` block.

        A block's direction replaces its rows of the (possibly fused)
        projection's direction, which is copied first, never the gradient.
        """
        yield from super().preconditioned_gradients(directions)
        copied: set = set()
        for name, (_, layout) in self.attention.items():
            for key, block in layout.blocks.items():
                g = self._block_grad(block, layout.has_bias)
                if g is None:
                    continue
                pg = self.attention_direction(name, key, g)
                if pg is not None:
                    yield (f'{name}.{key}', g, pg,
                           partial(_store_block_direction, block, layout.in_dim,
                                   directions, copied))

    # ------------------------------------------------------------- lifecycle
    @torch.no_grad()
    def step(self, closure: Any = None) -> Optional[float]:
        """Perform one optimization step (see :class:`AFOpt`)."""
        loss = super().step(closure)
        self._reset_sums()
        self.tap.active = self.capture.active
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, and the statistics of a step that was skipped."""
        if self.capture.has_backward:
            self._reset_sums()
        super().zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load state saved by :meth:`state_dict` (attention state by name)."""
        state_dict = dict(state_dict)
        pre = state_dict.get('preconditioner')
        attn = {}
        if pre is not None:
            layers = dict(pre['layers'])
            attn = {n: layers.pop(n) for n in list(layers) if n in self.attention}
            state_dict['preconditioner'] = dict(pre, layers=layers)
        super().load_state_dict(state_dict)
        packed = (pre or {}).get('packed', {})
        for name, st in attn.items():
            dev = self.attention[name][1].q.weight.device
            self.layer_state[name] = loaded_layer_state(st, packed.get(name, {}),
                                                        dev)
        self._reset_sums()
        self.tap.active = self.capture.active


_AFOPT_BOX = r"""
    Algorithm (thesis Algorithms 7 / 8, with the readings below)::

        for t = 0, 1, 2, ...:
            forward / backward; on t % T_s == 0 record, per attention call,
              X (qkv input), Q, K, V and A_s per head; per other Linear, its X
            if t % T_s == 0:                       (EMA, a on the old value)
              R_XX <- a R_XX + (1-a) mean_tokens [x;1][x;1]^T
              L_QQ <- a L_QQ + (1-a) mean_i scale^2 K^T J_i V V^T J_i K  (per head)
              L_KK <- a L_KK + (1-a) mean_i scale^2 Q^T J_i V V^T J_i Q  (per head)
              R_VV <- a R_VV + (1-a) mean_i [y_i;1][y_i;1]^T,
                      y_i = (W_V^T W_V + 1e-4 I)^-1 W_V^T (o_i - b_V)
              FSGD layers: R <- a R + (1-a) mean_rows [x;1][x;1]^T
            if t % T_u == 0:  D_S = (S/||S||_F + max(1e-4, eta lmax(S)) I)^-1
                              for every S above (heads damped jointly)
            G^_Q = D_QQ^h G_Q^h D_XX;  G^_K = D_KK^h G_K^h D_XX;  G^_V = G_V D_VV
            other Linear: G^ = G D_XX;  anything else: G^ = G
            G~ = G^ ||G|| / ||G^||        (per W_Q, W_K, W_V block, per layer)
"""

_AFOPT_READINGS = r"""
    Readings chosen where the thesis (sections 5.2-5.3) is ambiguous:

    * ``nabla S``: the per-query softmax Jacobians
      ``J_i = diag(s_i) - s_i s_i^T``.  The left factor of ``W_Q`` is the
      Gauss-Newton factor of feature descent, ``E_i[B_i^T B_i]`` with
      ``B_i = scale V^T J_i K`` the Jacobian of ``o_i`` w.r.t. ``q_i``: this
      is eq. 5.20's ``L_K L_K^T`` with ``nabla S -> J_i`` averaged over
      queries, windows and batch.  ``W_K`` uses the thesis' symmetric
      analogue (eq. 5.19, ``K -> Q``), not the exact key factor.  Both are
      computed in closed form (:func:`softmax_jacobian_gram`), exactly,
      without the cheaper averaged-Jacobian variant.
    * ``W_V``: eq. 5.15, in an equivalent form: ``R_VV`` estimates
      ``E[(X A_s)(X A_s)^T]`` as
      ``W_VV^-1 W_V^T X_P X_P^T W_V W_VV^-1`` with ``W_VV = W_V^T W_V +
      1e-4 I`` (the thesis' jitter), formed at each statistics step with
      that step's ``W_V`` (so eq. 5.13 holds for that step's ``X_P``), then
      damped and inverted like every other statistic.  Eq. 5.23, which
      drops the ``W_VV`` factors, is not used.  ``b_V`` is removed from
      ``X_P`` first.  With several heads the identity 5.13 is only an
      approximation, which the thesis accepts (``W_V`` is one matrix).
    * Biases: preconditioned jointly with their rows as an extra
      input column of ones, for FSGD layers and for the Q, K and V blocks
      alike; the derivation of eqs. 5.7-5.15 goes through unchanged with
      ``x -> [x; 1]`` (the ones column passes through ``A_s`` because its
      rows sum to one).  A block without a bias (``WindowMSAV2``'s keys)
      gets a zero column, dropped afterwards.
    * Position bias and masks: ``A_s`` is the exact softmax
      output, with the relative-position bias, the shift-window mask and
      the logit scale; the thesis' optimizer used ``A`` without the bias.
    * Norm recovery: per ``W_Q``, ``W_K``, ``W_V`` block (each
      whole matrix with all heads and its bias) and per FSGD layer.
    * Heads: ``L_QQ`` and ``L_KK`` are ``H`` blocks of ``d x d``, one per
      head, damped as one block-diagonal matrix; ``R_XX`` and ``R_VV`` are
      shared by all heads.  Statistics momentum, damping, inverse, layer
      choice and step numbering are as in :class:`FSGD`.
    * Scope: self-attention only (a call whose key differs from its query
      is skipped and counted); supported modules are listed in
      :mod:`mmprecond.curvature.attention`.  A model without any gets one
      warning and trains exactly like :class:`FSGD` / :class:`FAdam`.
"""


# the family's keywords are FeatureDescent's plus value_jitter
AttentionFeatureDescent.__init__.__signature__ = extended_signature(  # type: ignore
    FeatureDescent.__init__, value_jitter=1e-4)


@OPTIMIZERS.register_module()
@variant('sgdm', lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=False)
class AFOpt(AttentionFeatureDescent):
    __doc__ = r"""AFOpt: attention-feature-based descent on an SGDM base.

    AFOpt asks the output of a whole attention module, ``X_P``, to move by
    ``-eta dL/dX_P`` and solves, after linearising the softmax, for the
    ``W_Q``, ``W_K``, ``W_V`` changes that realise it best (thesis eqs.
    5.3-5.15).  Every other ``Linear`` layer gets FSGD (eq. 5.2).  The
    directions are then used by a ``torch.optim.SGD`` step (momentum,
    coupled L2 decay added after preconditioning), so ``lr`` and
    ``weight_decay`` carry over from an SGD config.

    Reference: Y. Sun, *Designing Effective Preconditioned Optimizers for
    Deep Neural Network Training*, PhD thesis, PolyU 2024, chapter 5
    (Algorithm 7, Table 5.1).
    """ + _AFOPT_BOX + _AFOPT_READINGS + r"""
    Args:
        params (Iterable): Parameters or parameter groups.
        lr (float): Learning rate. Defaults to 0.01 (mmdet RetinaNet Swin-T).
        momentum (float): Momentum. Defaults to 0.9.
        weight_decay (float): Coupled L2 weight decay. Defaults to 1e-4.
        nesterov (bool): Nesterov momentum. Defaults to False.
        model (nn.Module): The model (passed by the mmprecond constructor).
        stat_interval (int): ``T_s``. Defaults to 50.
        refresh_interval (int): ``T_u``: inverses every this many steps.
            Defaults to 500.
        damping (float): ``eta``. Defaults to 0.01.
        damping_floor (float): Lower bound of the relative damping. 1e-4.
        stat_decay (float): ``alpha``. Defaults to 0.95.
        grad_norm_recovery (bool): Norm recovery. Defaults to True.
        max_factor_dim (int): FSGD layers with a wider input factor get the
            plain update. Defaults to 8192.
        precondition_convs (bool): FSGD for ``Conv2d`` too. Defaults to False.
        value_jitter (float): Added to the diagonal of ``W_V^T W_V``.
            Defaults to 1e-4.
        skip_nonfinite_steps, factor_memory_budget_mb,
        checkpoint_inverses: See :class:`~mmprecond.optim.PrecondOptimizer`.

    Example:
        >>> import torch, torch.nn as nn
        >>> attn = nn.MultiheadAttention(16, 2, batch_first=True)
        >>> head = nn.Linear(16, 3)
        >>> model = nn.ModuleDict(dict(attn=attn, head=head))
        >>> opt = AFOpt(model.parameters(), model=model, lr=0.01,
        ...             stat_interval=1, refresh_interval=5)
        >>> x = torch.randn(4, 10, 16)
        >>> head(attn(x, x, x)[0]).pow(2).mean().backward()
        >>> opt.step()
        >>> sorted(opt.layer_state['attn'])[:4]
        ['LK', 'LK_inv', 'LQ', 'LQ_inv']
    """


@OPTIMIZERS.register_module()
@variant('adamw', lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
class Ada_AFOpt(AttentionFeatureDescent):  # noqa: N801 (the thesis' name)
    __doc__ = r"""Ada_AFOpt: the AFOpt direction fed to AdamW (thesis Algorithm 8).

    Same preconditioning as :class:`AFOpt`; the recovered direction ``G~``
    replaces the gradient in a ``torch.optim.AdamW`` step (Algorithm 8's
    ``G^`` inside the moments is read as ``G~``, its ``sqrt(V + eps)`` as
    torch's ``sqrt(V) + eps``; decoupled weight decay ``W <- W (1 - lr
    wd)``, which the box omits).

    Reference: Y. Sun, PhD thesis, PolyU 2024, chapter 5 (Algorithm 8,
    Table 5.2).
    """ + _AFOPT_BOX + _AFOPT_READINGS + r"""
    Args:
        params (Iterable): Parameters or parameter groups.
        lr (float): Learning rate. Defaults to 1e-4 (mmdet Mask R-CNN Swin-T).
        betas (tuple[float, float]): Adam betas. Defaults to (0.9, 0.999).
        eps (float): Adam epsilon. Defaults to 1e-8.
        weight_decay (float): Decoupled weight decay. Defaults to 0.05.
        Everything else: as in :class:`AFOpt`.

    Example:
        >>> import torch, torch.nn as nn
        >>> attn = nn.MultiheadAttention(8, 1, batch_first=True)
        >>> opt = Ada_AFOpt(attn.parameters(), model=attn, lr=1e-3,
        ...                 stat_interval=1)
        >>> x = torch.randn(2, 6, 8)
        >>> attn(x, x, x)[0].sum().backward()
        >>> opt.step()
        >>> list(opt.attention), list(opt.layers)
        ([''], ['out_proj'])
    """

# Copyright (c) mmprecond contributors. All rights reserved.
"""AdaFisher / AdaFisherW: diagonal Kronecker Fisher in place of Adam's sqrt(v).

Reference: D. M. Gomes, Y. Zhang, E. Belilovsky, G. Wolf, M. S. Hosseini,
*AdaFisher: Adaptive Second Order Optimization via Fisher Information*,
ICLR 2025 (Algorithm 1, Propositions 3.1-3.2, eq. 3).
"""
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.registry import OPTIMIZERS
from torch import Tensor
from torch.optim import Optimizer

from ..curvature.diagonal import NORM_TYPES, DiagonalCapture, diagonal_reason
from ..distributed import all_reduce_sum_, world_size
from ..logging import FallbackLog
from ..protocol import CheckpointLayout, EngineProtocol, tensor_megabytes
from .base import (
    MISSING_MODEL_MSG,
    check_positive,
    check_unit_interval,
    finite_flags,
)

#: The two statistics rules (see :class:`AdaFisher`).
STATISTICS_RULES = ('paper', 'code')


def min_max(x: Tensor) -> Tensor:
    """``(x - min) / (max - min + 1e-6)``: the spectrum into ``[0, 1]``."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo + 1e-6)


@OPTIMIZERS.register_module()
class AdaFisher(Optimizer, EngineProtocol):
    r"""AdaFisher: Adam-like step with a diagonal Kronecker-factored Fisher.

    Algorithm (Gomes et al., ICLR 2025, Algorithm 1)::

        every T_stat steps, per layer (Linear / Conv2d / BN / GN / LN):
            H_new = diag E[x x^T]  (input, im2col patches, bias ones column)
            S_new = diag E[delta delta^T]           (output gradient)
            'paper': H <- gamma H_new + (1-gamma) H;  H' = minmax(H)   (eq. 3)
            'code':  H <- 0.1 gamma H + 0.01 gamma minmax(H_new);  H' = H
            (S likewise)   F[o, i] = S'[o] H'[i] + lambda        (Prop. 3.2)
        every step:
            AdaFisher:  g <- g + wd W
            m <- beta m + (1-beta) g
            AdaFisher:  W <- W - lr / (1-beta^t) m / F
            AdaFisherW: W <- W - lr (m / (1-beta^t) / F + wd W)

    Normalisation layers follow Prop. 3.1 per channel (module input ``x``,
    as the paper's "pre-normalized" and the code): ``F_weight[c] = S'[c]
    H'[c] + lambda`` and ``F_bias[c] = S'[c] + lambda`` (``H = 1`` for the
    shift).  Parameters of other modules (embeddings, position tables,
    grouped convs, ...) get ``F = 1`` (the released code).  Parameters are
    matched to modules by ownership, not by order and shape as in the code.

    **Statistics rule** (``statistics``).  The paper's EMA weights the new
    statistic by ``gamma`` and min-max normalises the factors, so ``F`` lies
    in ``[lambda, 1 + lambda]``.  The released code folds already normalised
    statistics with ``0.08 cur + 0.008 new`` (``gamma = 0.8``), so after a
    few hundred steps ``F`` is within about 8 % of ``lambda`` and the method
    is close to EMA-momentum SGD with step ``lr / lambda``; the paper's
    rule takes steps up to ``1/lambda`` times smaller at equal ``lr``.
    ``'code'`` (the default) is the rule that produced the published
    numbers, and it is the one that trains at the paper's ``lr``: on the
    synthetic shapes classifier (ResNet-18-tiny, lr 1e-3, 20 epochs, 3
    seeds) it reaches training loss 0.33 +- 0.10 and 33.1 +- 2.7 % top-1
    against 1.28 +- 0.03 and 23.3 +- 1.0 % for ``'paper'`` (chance: 20 %);
    on the demo detector (lr 2e-4, 100 iterations) 0.65 +- 0.03 vs
    0.75 +- 0.15 training loss (``benchmarks/adafisher_rules.py``).
    The code starts ``H, S`` at ones; the paper rule starts at the first
    statistic.  Statistics are collected every ``stat_interval`` steps
    (``TCov = 100`` in the code; the paper does not say) and averaged over
    ranks on those steps.  Non-finite statistics leave the factors
    unchanged.

    Args:
        params (Iterable): Parameters or parameter groups.
        lr (float): Learning rate. Defaults to 1e-3.
        beta (float): Momentum. Defaults to 0.9.
        weight_decay (float): Coupled L2 (AdaFisher) or decoupled
            (AdaFisherW) weight decay. Defaults to 0.
        damping (float): Tikhonov ``lambda``. Defaults to 1e-3.
        gamma (float): Factor decay. Defaults to 0.8.
        model (nn.Module): Model whose layers are hooked.
        stat_interval (int): ``TCov``. Defaults to 100.
        statistics (str): ``'code'`` or ``'paper'``. Defaults to ``'code'``.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> opt = AdaFisher(model.parameters(), model=model, stat_interval=1)
        >>> model(torch.randn(2, 3, 8, 8)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    requires_model = True
    decoupled = False

    def __init__(self,
                 params: Iterable,
                 lr: float = 1e-3,
                 beta: float = 0.9,
                 weight_decay: float = 0.0,
                 damping: float = 1e-3,
                 gamma: float = 0.8,
                 *,
                 model: Optional[nn.Module] = None,
                 stat_interval: int = 100,
                 statistics: str = 'code') -> None:
        if model is None:
            raise TypeError(MISSING_MODEL_MSG.format(name=type(self).__name__))
        check_positive('lr', lr, allow_zero=True)
        check_unit_interval('beta', beta)
        check_positive('weight_decay', weight_decay, allow_zero=True)
        check_positive('damping', damping)
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f'Invalid gamma: {gamma} (must be in (0, 1])')
        if int(stat_interval) < 1:
            raise ValueError(f'Invalid stat_interval: {stat_interval} (>= 1)')
        if statistics not in STATISTICS_RULES:
            raise ValueError(f'Invalid statistics: {statistics!r} '
                             f'({" or ".join(STATISTICS_RULES)})')
        super().__init__(params, dict(lr=lr, beta=beta, weight_decay=weight_decay))
        self.damping = float(damping)
        self.gamma = float(gamma)
        self.stat_interval = int(stat_interval)
        self.statistics = statistics
        self.steps = 0
        self.fallbacks = FallbackLog(type(self).__name__)
        self.layer_state: Dict[str, Dict[str, Tensor]] = {}
        self._fisher: Dict[Tensor, Tensor] = {}
        self._ok: Optional[Tensor] = None
        self.layers = self._select_layers(model)
        self.capture = DiagonalCapture(self.layers)
        self.capture.active = True

    def _select_layers(self, model: nn.Module) -> Dict[str, nn.Module]:
        owned = {id(p) for g in self.param_groups for p in g['params']}
        chosen, skipped = {}, []
        for name, module in model.named_modules():
            weight = getattr(module, 'weight', None)
            if not isinstance(module, (nn.Linear, nn.Conv2d) + NORM_TYPES):
                continue
            if not isinstance(weight, Tensor) or id(weight) not in owned \
                    or not weight.requires_grad:
                continue
            reason = diagonal_reason(module)
            if reason is None:
                chosen[name] = module
            else:
                skipped.append(f'{name}: {reason}')
        if skipped:
            self.fallbacks.info('excluded_layers', f'{len(skipped)} layer(s) get '
                                'F = 1:\n  ' + '\n  '.join(skipped))
        self.fallbacks.counts['excluded_layers'] = len(skipped)
        return chosen

    # ------------------------------------------------------------- statistics
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, and statistics of a backward whose step was skipped."""
        if self.capture.has_backward:
            self.capture.clear()
        super().zero_grad(set_to_none=set_to_none)

    def _reduced(self) -> Dict[str, Tuple[Optional[Tensor], Optional[Tensor],
                                          Optional[Tensor]]]:
        """Per layer, this iteration's mean ``H_new, S_new`` (rank-averaged).

        Returns ``(h, s, has)`` per layer.  With one process the row counts
        are host ints: a layer without rows gets ``h`` or ``s`` ``None`` and
        ``has`` is ``None``.  Under torch.distributed every rank reduces every
        layer (zeros where it saw no rows) and all row counts travel as one
        int64 vector in the same all-reduce, so nothing is read back: ``h``,
        ``s`` are always tensors and ``has`` is the device flag "some rank
        had rows on both sides".  Counts are exact up to ``2**63``.
        """
        buffers = self.capture.buffers
        world = world_size()
        out: Dict[str, Tuple[Optional[Tensor], Optional[Tensor],
                             Optional[Tensor]]] = {}
        if world == 1:
            for name in self.layers:
                buf = buffers[name]
                h = buf.h / buf.h_rows if buf.h is not None and buf.h_rows else None
                s = buf.s / buf.s_rows if buf.s is not None and buf.s_rows else None
                out[name] = (h, s, None)
            return out
        if not self.layers:
            return out
        tensors: List[Tensor] = []
        rows: List[int] = []
        for name, module in self.layers.items():
            buf = buffers[name]
            dev = module.weight.device
            h_len, s_len = self._lengths(module)
            if buf.h is None:
                buf.h = torch.zeros(h_len, device=dev)
            if buf.s is None:
                buf.s = torch.zeros(s_len, device=dev)
            tensors += [buf.h, buf.s]
            rows += [buf.h_rows, buf.s_rows]
        dev = tensors[0].device
        # host -> device without a sync: pinned on CUDA, copied asynchronously
        counts = torch.tensor(rows, dtype=torch.int64)
        if dev.type == 'cuda':
            counts = counts.pin_memory()
        counts = counts.to(dev, non_blocking=True)
        all_reduce_sum_(tensors + [counts])
        # DDP averages gradients: each rank's output gradient is world x its
        # share, hence / world^2 (as the Kronecker base)
        torch._foreach_div_(tensors[1::2], float(world * world))
        has = (counts > 0).view(-1, 2).all(1).unbind()
        denom = counts.clamp(min=1).double().unbind()
        for i, name in enumerate(self.layers):
            buf = buffers[name]
            out[name] = ((buf.h.double() / denom[2 * i]).float(),
                         (buf.s.double() / denom[2 * i + 1]).float(), has[i])
        return out

    @staticmethod
    def _lengths(module: nn.Module) -> Tuple[int, int]:
        if isinstance(module, NORM_TYPES):
            return module.weight.numel(), module.weight.numel()
        d_in = module.weight[0].numel() + (module.bias is not None)
        return d_in, module.weight.shape[0]

    def _fold(self, old: Optional[Tensor], new: Tensor,
              seen: Optional[Tensor] = None,
              has: Optional[Tensor] = None) -> Tensor:
        """Fold ``new`` into the running diagonal ``old`` (``None``: none yet).

        Under torch.distributed (``has`` given) a layer's running diagonal
        exists from its first statistics step on every rank; ``seen`` (a
        device flag) says whether it holds a statistic yet, and ``has``
        whether ``new`` has rows at all.  An unseen diagonal holds ones, the
        value the rules start from, so the result equals the host-side rule.
        """
        finite = torch.isfinite(new).all()
        if has is not None:
            finite = finite & has
        ok = getattr(self, '_ok', None)
        if ok is not None:  # a skipped step folds nothing
            finite = finite & ok
        new = torch.where(finite, new, torch.zeros_like(new))
        if self.statistics == 'code':
            prev = torch.ones_like(new) if old is None else old
            cand = prev * (0.1 * self.gamma) + min_max(new) * (0.01 * self.gamma)
            return torch.where(finite, cand, prev)
        first = torch.where(finite, new, torch.ones_like(new))
        if old is None:
            return first
        later = torch.where(finite, new * self.gamma + old * (1 - self.gamma), old)
        return later if seen is None else torch.where(seen, later, first)

    def update_statistics(self) -> None:
        """Fold this iteration's diagonals into ``H, S`` and rebuild ``F``."""
        for name, (h, s, has) in self._reduced().items():
            if h is None or s is None:
                continue
            st = self.layer_state.setdefault(name, {})
            seen = None
            if has is not None:  # distributed: flags on the device
                seen = st.get('seen')
                if seen is None:
                    seen = (torch.ones((), dtype=torch.bool, device=h.device)
                            if 'H' in st else torch.zeros(
                                (), dtype=torch.bool, device=h.device))
                    if 'H' not in st:
                        st['H'], st['S'] = torch.ones_like(h), torch.ones_like(s)
            st['H'] = self._fold(st.get('H'), h, seen, has)
            st['S'] = self._fold(st.get('S'), s, seen, has)
            if seen is not None:
                ok = getattr(self, '_ok', None)
                st['seen'] = seen | (has if ok is None else has & ok)
            self._build_fisher(name)

    def _build_fisher(self, name: str) -> None:
        module, st = self.layers[name], self.layer_state[name]
        h, s = st['H'], st['S']
        if self.statistics == 'paper':
            h, s = min_max(h), min_max(s)
        lam = self.damping
        seen = st.get('seen')

        def store(p: Tensor, f: Tensor) -> None:
            # a layer no rank has seen yet takes the plain update: F = 1
            if seen is not None:
                f = torch.where(seen, f, torch.ones_like(f))
            self._fisher[p] = f.reshape(p.shape)

        if isinstance(module, NORM_TYPES):
            store(module.weight, s * h + lam)
            if module.bias is not None:
                store(module.bias, s + lam)
            return
        f = torch.outer(s, h) + lam
        if module.bias is not None:
            store(module.bias, f[:, -1])
            f = f[:, :-1]
        store(module.weight, f)

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step (see the class docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._ok = self._gradients_finite()
        if self.steps % self.stat_interval == 0:
            self.update_statistics()
        self.capture.clear()
        self.steps += 1
        for group in self.param_groups:
            self._group_step(group)
        self._ok = None
        self.capture.active = self.steps % self.stat_interval == 0
        return loss

    def _gradients_finite(self) -> Optional[Tensor]:
        """Device flag: every gradient is finite (``None``: no gradients).

        A step with a NaN / Inf gradient entry leaves the parameters, the
        momentum and the Fisher diagonals as they were (chosen with
        ``torch.where``, no host read) and is counted under
        ``'nonfinite_gradient_skipped'``; only the step counter (a host
        int) advances.
        """
        grads = [p.grad for g in self.param_groups for p in g['params']
                 if p.grad is not None and not p.grad.is_sparse]
        if not grads:
            return None
        ok = finite_flags(grads).all()
        self.fallbacks.record_flags(
            'nonfinite_gradient_skipped', ok.logical_not().reshape(1), ['step'],
            'non-finite gradient: the step was skipped (weights, momentum and '
            'Fisher diagonals unchanged)')
        return ok

    def _group_step(self, group: Dict[str, Any]) -> None:
        lr, beta, wd = group['lr'], group['beta'], group['weight_decay']
        params, grads, moms = [], [], []
        for p in group['params']:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f'{type(self).__name__} does not support '
                                   'sparse gradients')
            st = self.state[p]
            if 'exp_avg' not in st:
                st['exp_avg'] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            moms.append(st['exp_avg'])
        if not params:
            return
        if wd != 0 and not self.decoupled:
            grads = torch._foreach_add(grads, params, alpha=wd)
        ok = getattr(self, '_ok', None)
        targets = params
        if ok is not None:  # work on copies; kept only where ok (no read)
            olds = moms
            moms = [m.clone() for m in moms]
            targets = [p.clone() for p in params]
        torch._foreach_lerp_(moms, grads, 1 - beta)
        bc = 1 - beta**self.steps
        with_f = [(q, m, self._fisher[p])
                  for p, q, m in zip(params, targets, moms) if p in self._fisher]
        plain = [(q, m) for p, q, m in zip(params, targets, moms)
                 if p not in self._fisher]
        if wd != 0 and self.decoupled:
            torch._foreach_mul_(targets, 1 - lr * wd)
        if with_f:
            ps, ms, fs = zip(*with_f)
            torch._foreach_addcdiv_(list(ps), list(ms), list(fs), value=-lr / bc)
        if plain:
            ps, ms = zip(*plain)
            torch._foreach_add_(list(ps), list(ms), alpha=-lr / bc)
        if ok is not None:
            for p, q, old, m in zip(params, targets, olds, moms):
                p.copy_(torch.where(ok, q, p))
                old.copy_(torch.where(ok, m, old))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd['adafisher'] = dict(steps=self.steps, layers={
            n: {k: v.detach().clone() for k, v in st.items()}
            for n, st in self.layer_state.items()})
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop('adafisher', None)
        super().load_state_dict(state_dict)
        if extra is None:
            self.fallbacks.record('missing_preconditioner_state',
                                  'checkpoint has no AdaFisher state; restart')
            return
        self.steps = int(extra['steps'])
        self.layer_state, self._fisher = {}, {}
        for name, st in extra['layers'].items():
            if name in self.layers:
                dev = self.layers[name].weight.device
                self.layer_state[name] = {k: v.to(dev) for k, v in st.items()}
                self._build_fisher(name)
        self.capture.clear()
        self.capture.active = self.steps % self.stat_interval == 0

    # ---------------------------------------------------- engine protocol
    def state_megabytes(self) -> Tuple[float, float]:
        """Per-parameter state plus the per-layer curvature, in MiB."""
        layers = tensor_megabytes(v for st in self.layer_state.values()
                                  for v in st.values())
        return super().state_megabytes()[0] + layers, layers

    def checkpoint_layout(self) -> CheckpointLayout:
        return CheckpointLayout()  # diagonal curvature: no d x d factors


@OPTIMIZERS.register_module()
class AdaFisherW(AdaFisher):
    """AdaFisherW: :class:`AdaFisher` with decoupled weight decay.

    ``W <- W - lr (m / (1 - beta^t) / F + wd W)`` (Algorithm 1, AdamW-style
    variant used for the ViT experiments).  Everything else, including the
    ``statistics`` option, is :class:`AdaFisher`'s.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Linear(4, 2)
        >>> opt = AdaFisherW(model.parameters(), model=model, weight_decay=0.05)
    """

    decoupled = True

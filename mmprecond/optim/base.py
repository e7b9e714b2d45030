# Copyright (c) mmprecond contributors. All rights reserved.
"""The step skeleton shared by every layer-preconditioned optimizer.

One iteration of any optimizer in this package is::

    forward / backward      hooks collect layer statistics (statistics steps)
    step():
      1. fold the iteration's statistics into the running factors
         (averaged across ranks; AMP loss scale removed)
      2. refresh the preconditioners when their interval comes
      3. precondition each covered layer's gradient (bias as extra column)
      4. base update (SGDM or AdamW) of every parameter, with the
         preconditioned direction where there is one

Subclasses implement only the algorithm-specific parts
(:meth:`PrecondOptimizer.update_statistics`,
:meth:`PrecondOptimizer.update_preconditioners`,
:meth:`PrecondOptimizer.precondition`) and choose a base update.
"""
import math
import time
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor
from torch.optim import Optimizer

from ..curvature.capture import (
    LayerCapture,
    factor_dims,
    gradient_matrix,
    split_gradient_matrix,
    supported_reason,
)
from ..curvature.factors import BatchStatistics, batch_statistics
from ..distributed import all_reduce_sum_, world_size
from ..logging import FallbackLog
from .checks import check_interval

MISSING_MODEL_MSG = (
    '{name} preconditions layers and needs the model to hook them, but no '
    '`model` was given. In an MMEngine / OpenMMLab config build it through '
    "the mmprecond constructor:\n    custom_imports = dict(imports=['mmprecond'])"
    '\n    optim_wrapper = dict(type=\'OptimWrapper\', '
    "constructor='PrecondOptimWrapperConstructor', optimizer=dict(type="
    "'{name}', ...))\nIn plain PyTorch pass it yourself: "
    '{name}(model.parameters(), model=model, ...).')


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is (non-)positive."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        bound = '>= 0' if allow_zero else '> 0'
        raise ValueError(f'Invalid {name}: {value} (must be {bound})')


def check_unit_interval(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``0 <= value < 1``."""
    if not 0.0 <= value < 1.0:
        raise ValueError(f'Invalid {name}: {value} (must be in [0, 1))')


def sgdm_update(group: Dict[str, Any], state: Dict[Tensor, Dict[str, Any]],
                directions: Dict[Tensor, Tensor]) -> None:
    """``torch.optim.SGD`` semantics (coupled L2 weight decay, no dampening).

    ``d = g + wd * p``; ``buf = mu * buf + d`` (``buf = d`` at first);
    ``p -= lr * (d + mu * buf if nesterov else buf)``.
    """
    lr, wd, mu = group['lr'], group['weight_decay'], group['momentum']
    for p in group['params']:
        g = directions.get(p)
        if g is None:
            continue
        d = g.add(p, alpha=wd) if wd != 0 else g
        if mu != 0:
            st = state[p]
            buf = st.get('momentum_buffer')
            if buf is None:
                buf = st['momentum_buffer'] = d.clone()
            else:
                buf.mul_(mu).add_(d)
            d = d.add(buf, alpha=mu) if group['nesterov'] else buf
        p.add_(d, alpha=-lr)


def adamw_update(group: Dict[str, Any], state: Dict[Tensor, Dict[str, Any]],
                 directions: Dict[Tensor, Tensor]) -> None:
    """``torch.optim.AdamW`` semantics (decoupled weight decay).

    ``p *= 1 - lr * wd``; ``m, v`` moments with bias correction;
    ``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``.
    """
    lr, wd, eps = group['lr'], group['weight_decay'], group['eps']
    beta1, beta2 = group['betas']
    for p in group['params']:
        g = directions.get(p)
        if g is None:
            continue
        st = state[p]
        if 'step' not in st:
            st['step'] = torch.zeros((), dtype=torch.float32)
            st['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st['exp_avg_sq'] = torch.zeros_like(
                p, memory_format=torch.preserve_format)
        st['step'] += 1
        k = int(st['step'].item())
        if wd != 0:
            p.mul_(1 - lr * wd)
        m, v = st['exp_avg'], st['exp_avg_sq']
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bc1 = 1 - beta1**k
        bc2 = 1 - beta2**k
        denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)


BASE_UPDATES: Dict[str, Callable] = dict(sgdm=sgdm_update, adamw=adamw_update)


def _is_unsupported_matrix_layer(module: nn.Module, owned: set) -> bool:
    """A trained layer with a matrix weight of a type no optimizer handles.

    ``Conv1d``, ``Conv3d``, transposed convs, ``Embedding``, ... are named in
    the exclusion log so that a user does not assume they are
    preconditioned; norms (vector weights) are not listed.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return False
    weight = module._parameters.get('weight')
    return (weight is not None and weight.dim() >= 2 and weight.requires_grad
            and id(weight) in owned)


#: Fallback counts set when the optimizer is built (not restored on load).
BUILD_TIME_COUNTS = ('excluded_layers', 'over_memory_budget', 'no_attention')


class PrecondOptimizer(Optimizer):
    """Base class: statistics capture, step skeleton, state and logging.

    Args:
        params (Iterable): Parameters or parameter groups, as for any
            ``torch.optim.Optimizer``.
        defaults (dict): Group defaults; must contain the base update's keys.
        model (nn.Module): The (unwrapped) model whose layers are hooked.
            Only layers whose weight is among ``params`` and requires grad
            are preconditioned.
        base (str): ``'sgdm'`` or ``'adamw'``.
        stat_interval (int): Collect statistics every this many steps.
        max_factor_dim (int): Factors larger than this are not formed; that
            side of the layer is left unpreconditioned (identity), and a layer
            with both sides too large gets the plain base update.
        layer_types (tuple): Module types eligible for preconditioning.

    Attributes:
        fallbacks (FallbackLog): Counts of every fallback taken.
        phase_seconds (Counter): Host wall time spent in ``'statistics'``
            (folding, incl. the all-reduce), ``'refresh'`` (inverses / bases)
            and ``'precondition'`` since construction.  On GPU, kernels are
            asynchronous, so these are launch times unless synchronised.
        layers (dict[str, nn.Module]): Preconditioned layers by module name.
        layer_state (dict[str, dict[str, Tensor]]): Per-layer preconditioner
            state (factors, inverses, bases), saved in :meth:`state_dict`.
    """

    #: Tells :class:`~mmprecond.engine.PrecondOptimWrapperConstructor` to pass
    #: the model.
    requires_model = True

    def __init__(self,
                 params: Iterable,
                 defaults: Dict[str, Any],
                 model: Optional[nn.Module],
                 base: str,
                 stat_interval: int,
                 max_factor_dim: int,
                 layer_types: tuple = (nn.Linear, nn.Conv2d)) -> None:
        if model is None:
            raise TypeError(MISSING_MODEL_MSG.format(name=type(self).__name__))
        if base not in BASE_UPDATES:
            raise ValueError(f'Invalid base: {base!r} (sgdm or adamw)')
        check_interval('stat_interval', stat_interval)
        if int(max_factor_dim) < 1:
            raise ValueError(f'Invalid max_factor_dim: {max_factor_dim} (>= 1)')
        super().__init__(params, defaults)
        self.base = base
        self.stat_interval = int(stat_interval)
        self.max_factor_dim = int(max_factor_dim)
        self.fallbacks = FallbackLog(type(self).__name__)
        self.phase_seconds: Counter = Counter()
        self.steps = 0
        self.grad_scaler: Optional[Any] = None
        self.layer_state: Dict[str, Dict[str, Tensor]] = {}
        self.layers = self._apply_memory_budget(
            self._select_layers(model, layer_types))
        self._log_state_size()
        self.capture = LayerCapture(
            dict(model.named_modules()), self.layers,
            sides={n: self.capture_sides(m) for n, m in self.layers.items()})
        self.capture.active = self.is_stat_step(0)

    # ------------------------------------------------------------------ setup
    def _select_layers(self, model: nn.Module,
                       layer_types: tuple) -> Dict[str, nn.Module]:
        owned = {id(p) for g in self.param_groups for p in g['params']}
        chosen: Dict[str, nn.Module] = {}
        excluded: List[str] = []
        for name, module in model.named_modules():
            if not isinstance(module, layer_types):
                if _is_unsupported_matrix_layer(module, owned):
                    excluded.append(f'{name}: unsupported type '
                                    f'{type(module).__name__}')
                continue
            weight = getattr(module, 'weight', None)
            if (weight is None or not weight.requires_grad
                    or id(weight) not in owned):
                continue  # frozen or not optimised here: not hooked
            reason = supported_reason(module)
            if reason is None:
                d_out, d_in = factor_dims(module)
                if min(d_out, d_in) > self.max_factor_dim:
                    reason = (f'both factors exceed max_factor_dim='
                              f'{self.max_factor_dim} ({d_out}x{d_in})')
            if reason is None:
                chosen[name] = module
            else:
                excluded.append(f'{name}: {reason}')
        if excluded:
            self.fallbacks.info(
                'excluded_layers',
                f'{len(excluded)} layer(s) get the plain {self.base} update '
                'without preconditioning:\n  ' + '\n  '.join(excluded))
        self.fallbacks.counts['excluded_layers'] = len(excluded)
        return chosen

    def factor_bytes(self, module: nn.Module) -> int:
        """Estimated preconditioner memory of one layer, in bytes.

        Two fp32 ``d x d`` matrices per formed factor: the running statistic
        and its inverse (NKFAC, KFAC, FSGD) or eigenbasis (AdamR).
        """
        d_out, d_in = factor_dims(module)
        want_x, want_g = self.capture_sides(module)
        return 2 * 4 * (int(want_x) * d_in * d_in + int(want_g) * d_out * d_out)

    def _apply_memory_budget(
            self, chosen: Dict[str, nn.Module]) -> Dict[str, nn.Module]:
        """Leave the costliest layers first-order until the rest fit.

        ``factor_memory_budget_mb`` (set by the public optimizers before
        this base class initialises) bounds :meth:`factor_bytes` summed
        over the preconditioned layers.  Layers are dropped largest first,
        which keeps the most layers preconditioned; the dropped ones get the
        plain base update and are listed in the log.
        """
        budget_mb = getattr(self, 'factor_memory_budget_mb', None)
        if budget_mb is None:
            return chosen
        budget = float(budget_mb) * 2**20
        cost = {n: self.factor_bytes(m) for n, m in chosen.items()}
        total = sum(cost.values())
        dropped: List[str] = []
        for name in sorted(cost, key=lambda n: (-cost[n], n)):
            if total <= budget:
                break
            total -= cost[name]
            dropped.append(name)
        if dropped:
            self.fallbacks.info(
                'over_memory_budget',
                f'factor_memory_budget_mb={budget_mb:g}: {len(dropped)} '
                f'layer(s) get the plain {self.base} update to fit '
                f'({total / 2**20:.4g} MiB of factors kept):\n  ' + '\n  '.join(
                    f'{n} ({cost[n] / 2**20:.4g} MiB)' for n in dropped))
        self.fallbacks.counts['over_memory_budget'] = len(dropped)
        return {n: m for n, m in chosen.items() if n not in dropped}

    def factor_memory_mb(self) -> float:
        """:meth:`factor_bytes` summed over the preconditioned layers, in MiB."""
        return sum(self.factor_bytes(m) for m in self.layers.values()) / 2**20

    def _log_state_size(self) -> None:
        params = sum(p.numel() for g in self.param_groups for p in g['params'])
        per_param = 2 if self.base == 'adamw' else 1
        print_log(
            f'[{type(self).__name__}] optimizer state: '
            f'{self.factor_memory_mb():.4g} MiB of fp32 factors for '
            f'{len(self.layers)} preconditioned layer(s) plus '
            f'{per_param * params * 4 / 2**20:.4g} MiB of {self.base} buffers '
            f'({params} parameters)', logger='current')

    def side_enabled(self, dim: int) -> bool:
        """Whether a factor of size ``dim`` is formed (see max_factor_dim)."""
        return dim <= self.max_factor_dim

    def capture_sides(self, module: nn.Module) -> Tuple[bool, bool]:
        """Whether ``X^T X`` and ``Delta^T Delta`` of ``module`` are collected.

        Kronecker optimizers use both sides up to ``max_factor_dim``; a
        wider side is never formed (Faster R-CNN's ``shared_fcs.0`` input
        Gram would be 12545 x 12545).  Input-only optimizers override this.
        """
        d_out, d_in = factor_dims(module)
        return self.side_enabled(d_in), self.side_enabled(d_out)

    def attach_grad_scaler(self, scaler: Any) -> None:
        """Tell the optimizer which ``GradScaler`` scales the loss.

        Gradient statistics are then divided by the squared loss scale.
        Steps the scaler skips leave no trace either way, because pending
        statistics are dropped by :meth:`zero_grad`.  The MMEngine
        constructor calls this for ``AmpOptimWrapper``.
        """
        self.grad_scaler = scaler

    def is_stat_step(self, step: int) -> bool:
        """Whether statistics are collected at (0-based) step ``step``."""
        return step % self.stat_interval == 0

    # ------------------------------------------------------------------- step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients, and statistics of a step that was not taken.

        If a backward pass recorded statistics since the last :meth:`step`,
        that step was skipped (e.g. by the AMP ``GradScaler`` on overflow)
        and those statistics are discarded.  Input statistics from a forward
        pass whose backward has not run yet are kept, so calling
        ``zero_grad`` between forward and backward is safe.
        """
        if self.capture.has_backward:
            self.capture.clear()
        super().zero_grad(set_to_none=set_to_none)

    def _loss_scale(self) -> float:
        scaler = self.grad_scaler
        if scaler is None or not getattr(scaler, 'is_enabled', lambda: True)():
            return 1.0
        return float(scaler.get_scale())

    def _reduced_statistics(self) -> Dict[str, BatchStatistics]:
        """This iteration's statistics of every layer, reduced over ranks.

        Every rank issues the same bucketed all-reduce over all layers in
        the same order (zeros for a layer that did not run here), so a head
        that saw no RoIs on some rank cannot deadlock the others.
        """
        buffers = self.capture.buffers
        if world_size() > 1:
            tensors: List[Tensor] = []
            counts: Dict[str, Tensor] = {}
            for name, module in self.layers.items():
                buf = buffers[name]
                want_x, want_g = self.capture.sides[name]
                d_out, d_in = factor_dims(module)
                dev = module.weight.device
                if want_x:
                    if buf.xx is None:
                        buf.xx = torch.zeros(d_in, d_in, device=dev)
                    tensors.append(buf.xx)
                if want_g:
                    if buf.gg is None:
                        buf.gg = torch.zeros(d_out, d_out, device=dev)
                    tensors.append(buf.gg)
                counts[name] = torch.tensor([buf.x_rows, buf.g_rows], device=dev,
                                            dtype=torch.float32)
                tensors.append(counts[name])
            all_reduce_sum_(tensors)
            # DDP averages gradients over ranks, so each rank's output
            # gradients are ``world`` times their share of the averaged
            # gradient: the summed Delta^T Delta is divided by world^2 to
            # equal one process's statistic on the concatenated batch.
            world = world_size()
            for name in self.layers:
                if buffers[name].gg is not None:
                    buffers[name].gg.div_(world * world)
                buffers[name].x_rows = int(counts[name][0].item())
                buffers[name].g_rows = int(counts[name][1].item())
        scale = self._loss_scale()
        out = {}
        for name in self.layers:
            stats = batch_statistics(buffers[name], scale)
            buf = buffers[name]
            if (buf.x_rows > 0 and stats.xx is None) or (buf.g_rows > 0
                                                         and stats.gg is None):
                self.fallbacks.record(
                    'nonfinite_statistics',
                    f'non-finite statistics in {name}; not folded')
            out[name] = stats
        return out

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step.

        Args:
            closure (Callable, optional): Re-evaluates the model and returns
                the loss (the forward/backward it runs are captured).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.steps
        if not self._gradients_finite():
            # Like an AMP overflow step: nothing is updated or counted as a
            # step, and this iteration's statistics are dropped.
            self.capture.clear()
            return loss
        clock = time.perf_counter()
        if self.is_stat_step(t):
            self.update_statistics(self._reduced_statistics(), t)
            self._reset_nonfinite_state()
        self.capture.clear()
        now = time.perf_counter()
        self.phase_seconds['statistics'] += now - clock
        self.update_preconditioners(t)
        clock = time.perf_counter()
        self.phase_seconds['refresh'] += clock - now
        directions: Dict[Tensor, Tensor] = {}
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is not None:
                    if p.grad.is_sparse:
                        raise RuntimeError(
                            f'{type(self).__name__} does not support sparse '
                            'gradients')
                    directions[p] = p.grad
        for name, module in self.layers.items():
            g = gradient_matrix(module)
            if g is None:
                continue
            pg = self.precondition(name, module, g)
            if pg is None:
                continue
            if not bool(torch.isfinite(pg).all()):
                self.fallbacks.record(
                    'nonfinite_direction',
                    f'preconditioned gradient of {name} is not finite; the '
                    'raw gradient is used for this step')
                continue
            gw, gb = split_gradient_matrix(module, pg.to(g.dtype))
            directions[module.weight] = gw
            if gb is not None:
                directions[module.bias] = gb
        self.phase_seconds['precondition'] += time.perf_counter() - clock
        self.base_step(directions)
        self.steps = t + 1
        self.capture.active = self.is_stat_step(self.steps)
        return loss

    def _gradients_finite(self) -> bool:
        """Whether every gradient is finite; counts and logs a skipped step.

        Under AMP the ``GradScaler`` has already skipped a non-finite step
        (it only calls :meth:`step` when the unscaled gradients are finite),
        so nothing is read here.  Otherwise one flag is read from the
        device per step: a NaN/Inf gradient would otherwise be written into
        the weights and the momentum / Adam moments, which no later step
        can undo.
        """
        scaler = self.grad_scaler
        if scaler is not None and getattr(scaler, 'is_enabled', lambda: True)():
            return True
        grads = [p.grad for g in self.param_groups for p in g['params']
                 if p.grad is not None and not p.grad.is_sparse]
        if not grads:
            return True
        norms = torch._foreach_norm(grads)
        if bool(torch.isfinite(torch.stack([n.to(norms[0].device)
                                            for n in norms]).sum())):
            return True
        self.fallbacks.record(
            'nonfinite_gradient_skipped',
            'non-finite gradient: the step was skipped (weights, optimizer '
            'state and statistics unchanged), as an AMP loss scaler would')
        return False

    def _reset_nonfinite_state(self) -> None:
        """Drop a layer's preconditioner state if any of it is not finite.

        Statistics are checked before they are folded, so this only acts on
        state that became non-finite some other way (a corrupted checkpoint,
        a factor overwritten by user code).  The layer restarts from zero
        statistics, as a layer seen for the first time; counted under
        ``'nonfinite_state_reset'``.
        """
        checks = [(name, torch.isfinite(v).all())
                  for name, st in self.layer_state.items()
                  for v in st.values() if v.is_floating_point()]
        if not checks:
            return
        dev = checks[0][1].device
        ok = torch.stack([c.to(dev) for _, c in checks]).tolist()  # one read
        bad = list(dict.fromkeys(n for (n, _), good in zip(checks, ok)
                                 if not good))
        for name in bad:
            del self.layer_state[name]
        if bad:
            self.fallbacks.record(
                'nonfinite_state_reset',
                f'non-finite preconditioner state in {bad[:5]} was dropped; '
                'those layers restart their statistics', n=len(bad))

    def base_step(self, directions: Dict[Tensor, Tensor]) -> None:
        """Apply the base update to every group with ``directions``."""
        update = BASE_UPDATES[self.base]
        for group in self.param_groups:
            update(group, self.state, directions)

    # ------------------------------------------------- algorithm-specific API
    def update_statistics(self, stats: Dict[str, BatchStatistics], step: int) -> None:
        """Fold one iteration's statistics into the running factors."""
        raise NotImplementedError

    def update_preconditioners(self, step: int) -> None:
        """Refresh the preconditioners if ``step`` calls for it."""
        raise NotImplementedError

    def precondition(self, name: str, module: nn.Module,
                     grad: Tensor) -> Optional[Tensor]:
        """Return the preconditioned ``d_out x d_in`` gradient, or ``None``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Optimizer state plus per-layer preconditioner state.

        The extra entry ``'preconditioner'`` holds the step counter and, per
        layer **name**, its tensors; everything is a tensor, a number or a
        string, so ``torch.load(..., weights_only=True)`` reads it.
        """
        sd = super().state_dict()
        keep_derived = getattr(self, 'checkpoint_inverses', True)
        sd['preconditioner'] = dict(
            steps=self.steps,
            fallbacks=dict(self.fallbacks.counts),
            phase_seconds=dict(self.phase_seconds),
            layers={
                name: {k: v.detach().clone() for k, v in st.items()
                       if keep_derived or not self.is_derived_key(k)}
                for name, st in self.layer_state.items()
            })
        return sd

    def is_derived_key(self, key: str) -> bool:
        """Whether ``layer_state[...][key]`` is recomputed from the factors.

        Inverses (``*_inv``) are: with ``checkpoint_inverses=False`` they
        are left out of :meth:`state_dict`, and the first :meth:`step` after
        loading computes each missing one exactly from the loaded factor (as
        for a layer seen for the first time).  That is bit-identical to the
        uninterrupted run when the checkpoint is taken at a step where the
        uninterrupted run refreshes exactly (an iteration that is a multiple
        of ``inv_interval``; for NKFAC also one of its exact refreshes);
        otherwise it amounts to one extra exact refresh at the resume step.
        """
        return key.endswith('_inv')

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load state saved by :meth:`state_dict` (device-agnostic)."""
        state_dict = dict(state_dict)
        pre = state_dict.pop('preconditioner', None)
        super().load_state_dict(state_dict)
        if pre is None:
            self.fallbacks.record(
                'missing_preconditioner_state',
                'checkpoint has no preconditioner state; factors restart')
            return
        self.steps = int(pre['steps'])
        if 'fallbacks' in pre:  # older checkpoints lack the counters
            for kind, count in pre['fallbacks'].items():
                if kind not in BUILD_TIME_COUNTS:  # those describe this build
                    self.fallbacks.counts[kind] = int(count)
            self.phase_seconds = Counter(
                {k: float(v) for k, v in pre.get('phase_seconds', {}).items()})
        self.layer_state = {}
        unknown = []
        for name, st in pre['layers'].items():
            module = self.layers.get(name)
            if module is None:
                unknown.append(name)
                continue
            dev = module.weight.device
            self.layer_state[name] = {k: v.to(dev) for k, v in st.items()}
        self._reset_nonfinite_state()
        if unknown:
            self.fallbacks.record(
                'unknown_layers_in_checkpoint',
                f'{len(unknown)} layer(s) in the checkpoint are not '
                f'preconditioned here and were ignored: {unknown[:5]}')
        self.capture.clear()
        self.capture.active = self.is_stat_step(self.steps)

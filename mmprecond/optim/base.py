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
from functools import partial
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
import torch.nn as nn
from mmengine.logging import print_log
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adamw import adamw as adamw_functional
from torch.optim.sgd import sgd as sgd_functional

from ..curvature.capture import (
    LayerCapture,
    factor_dims,
    gradient_matrix,
    split_gradient_matrix,
    supported_reason,
)
from ..curvature.factors import (
    BatchStatistics,
    batch_statistics,
    batched_statistics,
    fold_statistics_,
)
from ..distributed import all_reduce_ints, all_reduce_sum_, world_size
from ..logging import FallbackLog
from ..protocol import CheckpointLayout, EngineProtocol, tensor_megabytes
from . import diagnostics
from .checks import check_budget, check_interval, check_number

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
    value = check_number(name, value)  # TypeError naming the field first
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        bound = '>= 0' if allow_zero else '> 0'
        raise ValueError(f'Invalid {name}: {value} (must be {bound})')


def check_unit_interval(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``0 <= value < 1``."""
    value = check_number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f'Invalid {name}: {value} (must be in [0, 1))')


def finite_flags(tensors: Sequence[Tensor]) -> Tensor:
    """One device bool per tensor: all its entries are finite.

    One ``_foreach_norm`` (a norm is finite iff every entry is), stacked on
    the first tensor's device; nothing is read back to the host.
    """
    norms = torch._foreach_norm(list(tensors))
    dev = norms[0].device
    return torch.isfinite(torch.stack([n.to(dev) for n in norms]))


def sgdm_update(group: Dict[str, Any], state: Dict[Tensor, Dict[str, Any]],
                directions: Dict[Tensor, Tensor]) -> None:
    """``torch.optim.SGD`` semantics (coupled L2 weight decay, no dampening).

    ``d = g + wd * p``; ``buf = mu * buf + d`` (``buf = d`` at first);
    ``p -= lr * (d + mu * buf if nesterov else buf)``.  Runs torch's own
    multi-tensor (foreach) SGD on the parameters of ``group`` that have a
    direction, so the arithmetic is torch's, op for op.
    """
    params = [p for p in group['params'] if p in directions]
    if not params:
        return
    bufs = [state[p].get('momentum_buffer') for p in params]
    sgd_functional(
        params, [directions[p] for p in params],
        bufs,
        foreach=True,
        weight_decay=group['weight_decay'],
        momentum=group['momentum'],
        lr=group['lr'],
        dampening=0.0,
        nesterov=group['nesterov'],
        maximize=False)
    if group['momentum'] != 0:
        for p, buf in zip(params, bufs):
            state[p]['momentum_buffer'] = buf


def adamw_update(group: Dict[str, Any], state: Dict[Tensor, Dict[str, Any]],
                 directions: Dict[Tensor, Tensor]) -> None:
    """``torch.optim.AdamW`` semantics (decoupled weight decay).

    ``p *= 1 - lr * wd``; ``m, v`` moments with bias correction;
    ``p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)``.  Runs torch's own
    multi-tensor (foreach) AdamW; the step counts are 0-dim CPU tensors in
    ``state`` as torch keeps them (reading one is no device sync).
    """
    params = [p for p in group['params'] if p in directions]
    if not params:
        return
    for p in params:
        st = state[p]
        if 'step' not in st:
            st['step'] = torch.zeros((), dtype=torch.float32)
            st['exp_avg'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st['exp_avg_sq'] = torch.zeros_like(
                p, memory_format=torch.preserve_format)
    beta1, beta2 = group['betas']
    adamw_functional(
        params, [directions[p] for p in params],
        [state[p]['exp_avg'] for p in params],
        [state[p]['exp_avg_sq'] for p in params], [],
        [state[p]['step'] for p in params],
        foreach=True,
        has_complex=any(torch.is_complex(p) for p in params),
        amsgrad=False,
        beta1=beta1,
        beta2=beta2,
        lr=group['lr'],
        weight_decay=group['weight_decay'],
        eps=group['eps'],
        maximize=False)


BASE_UPDATES: Dict[str, Callable] = dict(sgdm=sgdm_update, adamw=adamw_update)

#: Where statistics are averaged over ranks: ``'every_step'`` reduces each
#: statistics step's sums (DDP equals one process on the concatenated batch);
#: ``'before_refresh'`` folds each rank's own statistics and averages the
#: running factors just before a refresh, as the NKFAC authors' code does.
STAT_REDUCTIONS = ('every_step', 'before_refresh')


def _store_layer_direction(module: nn.Module, directions: Dict[Tensor, Tensor],
                           d: Tensor) -> None:
    """Split a layer's direction matrix into its weight / bias entries."""
    gw, gb = split_gradient_matrix(module, d.to(module.weight.grad.dtype))
    directions[module.weight] = gw
    if gb is not None:
        directions[module.bias] = gb


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


def is_symmetric_matrix(t: Tensor) -> bool:
    """Whether ``t`` is a floating square matrix equal to its transpose, bit for bit.

    Reads one flag from the device (only called when a checkpoint is saved).
    """
    return (t.dim() == 2 and t.shape[0] == t.shape[1] and t.shape[0] > 1
            and t.is_floating_point() and torch.equal(t, t.mT))


def pack_symmetric(t: Tensor) -> Tensor:
    """The upper triangle of a symmetric ``(n, n)`` matrix, row by row.

    ``n (n + 1) / 2`` entries instead of ``n^2``; :func:`unpack_symmetric`
    gives back the same bits (for a matrix that :func:`is_symmetric_matrix`).

    Example:
        >>> a = torch.tensor([[2., 1.], [1., 3.]])
        >>> pack_symmetric(a)
        tensor([2., 1., 3.])
        >>> torch.equal(unpack_symmetric(pack_symmetric(a), [2, 2]), a)
        True
    """
    n = t.shape[-1]
    rows, cols = torch.triu_indices(n, n, device=t.device)
    return t[rows, cols]


def unpack_symmetric(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """The symmetric matrix of :func:`pack_symmetric`'s output, of ``shape``."""
    n = int(shape[-1])
    if tuple(int(d) for d in shape) != (n, n) or packed.numel() != n * (n + 1) // 2:
        raise ValueError(f'a packed symmetric matrix of shape {list(shape)} '
                         f'needs {n * (n + 1) // 2} entries, not {packed.numel()}')
    rows, cols = torch.triu_indices(n, n, device=packed.device)
    out = packed.new_empty(n, n)
    out[rows, cols] = packed
    out[cols, rows] = packed
    return out


def loaded_layer_state(saved: Dict[str, Tensor], packed: Dict[str, Sequence[int]],
                       device: torch.device) -> Dict[str, Tensor]:
    """One layer's saved tensors on ``device``, packed ones unpacked.

    ``packed`` maps the keys saved by :func:`pack_symmetric` to their shape
    (a checkpoint's ``preconditioner.packed[layer]``; empty for checkpoints
    written before packing).
    """
    return {k: (unpack_symmetric(v.to(device), packed[k]) if k in packed
                else v.to(device)) for k, v in saved.items()}


#: Fallback counts set when the optimizer is built (not restored on load).
BUILD_TIME_COUNTS = ('excluded_layers', 'over_memory_budget', 'no_attention')


class PrecondOptimizer(Optimizer, EngineProtocol):
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
        reduce_statistics (str): Under torch.distributed, ``'every_step'``
            (default) all-reduces every statistics step's sums, so DDP
            equals one process on the concatenated batch;
            ``'before_refresh'`` folds each rank's own statistics and
            averages the running factors right before a refresh, as the
            NKFAC authors' code does: about ``T_inv / T_stat`` times less
            traffic, but not the single-process result (with per-step
            Frobenius normalisation a mean of normalised statistics is not
            the normalised mean; see ``benchmarks/bench_stat_reduction.py``).
            Only for optimizers that define :attr:`statistic_keys`.
        skip_nonfinite_steps (bool): Without an AMP loss scaler, skip a
            step whose gradients are not all finite exactly (weights and
            state untouched), at the cost of one host read per step.
            ``False`` (default): non-finite gradient entries are zeroed on
            the device and counted, with no host read (see
            :meth:`_gradients_finite`).
        factor_memory_budget_mb (float, optional): Bound, in MiB, on
            :meth:`factor_bytes` summed over the preconditioned layers; the
            layers with the largest factors are left first-order until the
            rest fit, and are listed in the log. Defaults to None (no bound).
        checkpoint_inverses (bool | str): Whether :meth:`state_dict` saves
            the state derived from the factors (:meth:`is_derived_key`).
            ``'auto'`` is offered by the optimizers that
            :attr:`rebuilds_inverses_exactly` (NKFAC): only what loading
            cannot rebuild bit for bit is saved. Defaults to True.

    All of these are shared by every family: the family constructors take
    them as keyword-only arguments and hand them on by name.

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

    #: ``layer_state`` keys of the running statistics that
    #: ``reduce_statistics='before_refresh'`` averages over ranks (empty: the
    #: optimizer does not offer that mode).
    statistic_keys: Tuple[str, ...] = ()
    #: Whether :meth:`update_statistics` handles non-finite statistics on
    #: the device (:meth:`fold_statistics`); otherwise they are dropped
    #: after a host-side check, which synchronises.
    checks_statistics_on_device = False

    #: Rescale each preconditioned direction to its raw gradient's norm.
    grad_norm_recovery = False

    #: Whether ``checkpoint_inverses='auto'`` is offered: the optimizer
    #: knows which inverses it can rebuild bit for bit when loading.
    rebuilds_inverses_exactly = False

    def __init__(self,
                 params: Iterable,
                 defaults: Dict[str, Any],
                 model: Optional[nn.Module],
                 base: str,
                 stat_interval: int,
                 max_factor_dim: int,
                 *,
                 layer_types: tuple = (nn.Linear, nn.Conv2d),
                 reduce_statistics: str = 'every_step',
                 skip_nonfinite_steps: bool = False,
                 factor_memory_budget_mb: Optional[float] = None,
                 checkpoint_inverses: Union[bool, str] = True) -> None:
        if model is None:
            raise TypeError(MISSING_MODEL_MSG.format(name=type(self).__name__))
        if base not in BASE_UPDATES:
            raise ValueError(f'Invalid base: {base!r} (sgdm or adamw)')
        check_interval('stat_interval', stat_interval)
        if int(max_factor_dim) < 1:
            raise ValueError(f'Invalid max_factor_dim: {max_factor_dim} (>= 1)')
        if reduce_statistics not in STAT_REDUCTIONS:
            raise ValueError(f'Invalid reduce_statistics: {reduce_statistics!r} '
                             f'(one of {STAT_REDUCTIONS})')
        if reduce_statistics != 'every_step' and not self.statistic_keys:
            raise ValueError(f'{type(self).__name__} supports only '
                             "reduce_statistics='every_step'")
        if isinstance(checkpoint_inverses, str) and (
                checkpoint_inverses != 'auto' or not self.rebuilds_inverses_exactly):
            allowed = ("True, False or 'auto'" if self.rebuilds_inverses_exactly
                       else 'True or False')
            raise ValueError(f'Invalid checkpoint_inverses: '
                             f'{checkpoint_inverses!r} ({allowed})')
        # set before the layer list is built: the memory budget prunes it
        self.factor_memory_budget_mb = check_budget(factor_memory_budget_mb)
        self.skip_nonfinite_steps = bool(skip_nonfinite_steps)
        self.checkpoint_inverses: Union[bool, str] = (
            checkpoint_inverses if isinstance(checkpoint_inverses, str)
            else bool(checkpoint_inverses))
        super().__init__(params, defaults)
        self.reduce_statistics = reduce_statistics
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

        ``factor_memory_budget_mb`` bounds :meth:`factor_bytes` summed
        over the preconditioned layers.  Layers are dropped largest first,
        which keeps the most layers preconditioned; the dropped ones get the
        plain base update and are listed in the log.
        """
        budget_mb = self.factor_memory_budget_mb
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

    def _loss_scale(self) -> Union[float, Tensor]:
        """The AMP loss scale: the scaler's device tensor, never read here.

        ``GradScaler.get_scale()`` would read it with ``.item()`` (a sync);
        its tensor is used directly when the scaler exposes it.  The tensor
        returned is the scaler's own storage: callers must treat it as
        read-only (an in-place op here changes the scaler's scale).
        """
        scaler = self.grad_scaler
        if scaler is None or not getattr(scaler, 'is_enabled', lambda: True)():
            return 1.0
        get_async = getattr(scaler, '_get_scale_async', None)
        scale = get_async() if get_async is not None else None
        return float(scaler.get_scale()) if scale is None else scale

    def _reduced_statistics(self) -> Dict[str, BatchStatistics]:
        """This iteration's statistics of every layer, reduced over ranks.

        Every rank issues the same bucketed all-reduce over all layers in
        the same order (zeros for a layer that did not run here), so a head
        that saw no RoIs on some rank cannot deadlock the others.

        With :attr:`checks_statistics_on_device` the row counts travel as
        one int64 device tensor at the end of that all-reduce (one extra
        bucket on the default group, no host-side collective), the means are
        formed on the device, and a statistic no rank had rows for carries a
        ``False`` ``*_present`` flag that :meth:`fold_statistics` obeys; the
        sums are divided in place, so the capture's buffers become the
        statistics (no copy).  With ``reduce_statistics='before_refresh'``
        only the counts are reduced here: every rank folds a zero statistic
        for a layer it did not run whenever some rank did (the presence flag
        decides, on the device), and the running factors are averaged later
        (see :meth:`_reduce_running_factors`).

        Optimizers that check statistics on the host (they read the device
        anyway) reduce the counts as host ints over a CPU group
        (:func:`~mmprecond.distributed.all_reduce_ints`).
        """
        buffers = self.capture.buffers
        world = world_size()
        scale = self._loss_scale()
        self._present_flags = {}
        if not self.checks_statistics_on_device:
            return self._host_checked_statistics(buffers, world, scale)
        if world == 1:
            return batched_statistics(buffers, scale, inplace=True)
        every_step = self.reduce_statistics == 'every_step'
        counts = self._device_counts([
            r for name in self.layers
            for r in (buffers[name].x_rows, buffers[name].g_rows)])
        sums: List[Tensor] = []
        for name in self.layers:
            buf = buffers[name]
            if every_step:
                sums += self._zero_filled_sums(name)
            else:  # a zero statistic where this rank has none (folded if
                # some rank has rows, as the presence flag will say)
                if buf.x_rows == 0:
                    buf.xx = None
                if buf.g_rows == 0:
                    buf.gg = None
                self._zero_filled_sums(name)
                buf.x_rows, buf.g_rows = max(buf.x_rows, 1), max(buf.g_rows, 1)
        all_reduce_sum_(sums + [counts])
        present = counts > 0
        if every_step:
            # DDP averages gradients over ranks, so each rank's output
            # gradients are ``world`` times their share of the averaged
            # gradient: the summed Delta^T Delta is divided by world^2 to
            # equal one process's statistic on the concatenated batch.
            # Out of place: ``scale`` may be the GradScaler's own
            # tensor, which an in-place product would corrupt.
            scale = scale * world
        ordered = {name: buffers[name] for name in self.layers}
        stats = batched_statistics(ordered, scale,
                                   rows=counts if every_step else None,
                                   present=present, inplace=True)
        for st in stats.values():
            for t, flag in ((st.xx, st.xx_present), (st.gg, st.gg_present)):
                if t is not None:
                    self._present_flags[id(t)] = flag
        return stats

    def _device_counts(self, values: List[int]) -> Tensor:
        """Host ints as an int64 tensor on the layers' device, without a sync.

        A CUDA copy goes through pinned memory with ``non_blocking``, so the
        host queues it instead of waiting for the stream.
        """
        dev = (next(iter(self.layers.values())).weight.device if self.layers
               else torch.device('cpu'))
        counts = torch.tensor(values, dtype=torch.int64)
        if dev.type == 'cuda':
            return counts.pin_memory().to(dev, non_blocking=True)
        return counts.to(dev)

    def _host_checked_statistics(self, buffers: Dict[str, Any], world: int,
                                 scale: Union[float, Tensor]
                                 ) -> Dict[str, BatchStatistics]:
        """The statistics of optimizers that check finiteness on the host."""
        if world > 1:
            rows = all_reduce_ints([
                r for name in self.layers
                for r in (buffers[name].x_rows, buffers[name].g_rows)
            ])
            if self.reduce_statistics == 'every_step':
                tensors: List[Tensor] = []
                for i, name in enumerate(self.layers):
                    tensors += self._zero_filled_sums(name)
                    buffers[name].x_rows = rows[2 * i]
                    buffers[name].g_rows = rows[2 * i + 1]
                all_reduce_sum_(tensors)
                scale = scale * world  # out of place, see above
            else:
                for i, name in enumerate(self.layers):
                    buf = buffers[name]
                    if rows[2 * i] and not buf.x_rows:
                        buf.xx, buf.x_rows = self._zero_filled_sums(name)[0], 1
                    if rows[2 * i + 1] and not buf.g_rows:
                        buf.gg, buf.g_rows = self._zero_filled_sums(name)[-1], 1
        out = {}
        for name in self.layers:  # host-side finiteness check (syncs)
            buf = buffers[name]
            stats = batch_statistics(buf, float(scale))
            if (buf.x_rows > 0 and stats.xx is None) or (buf.g_rows > 0
                                                         and stats.gg is None):
                self.fallbacks.record(
                    'nonfinite_statistics',
                    f'non-finite statistics in {name}; not folded')
            out[name] = stats
        return out

    def _zero_filled_sums(self, name: str) -> List[Tensor]:
        """The wanted ``[X^T X, Delta^T Delta]`` sums of ``name``, zeros if absent."""
        buf = self.capture.buffers[name]
        want_x, want_g = self.capture.sides[name]
        d_out, d_in = factor_dims(self.layers[name])
        dev = self.layers[name].weight.device
        out = []
        if want_x:
            if buf.xx is None:
                buf.xx = torch.zeros(d_in, d_in, device=dev)
            out.append(buf.xx)
        if want_g:
            if buf.gg is None:
                buf.gg = torch.zeros(d_out, d_out, device=dev)
            out.append(buf.gg)
        return out

    def fold_statistics(self, items: List[Tuple[Dict[str, Tensor], str, str, Tensor]],
                        weight: Union[float, Sequence[float]],
                        normalize: bool = False,
                        present: Optional[Sequence[Optional[Tensor]]] = None
                        ) -> None:
        """Fold statistics into ``layer_state`` with batched kernels.

        Each item is ``(state, key, label, new)``: ``state[key] += w (new -
        state[key])`` (from zero; ``w`` is ``weight``, or ``weight[i]`` per
        item), see :func:`~mmprecond.curvature.factors.fold_statistics_`.
        Non-finite statistics are not folded and are counted on the device
        under ``'nonfinite_statistics'`` (read when the log asks).  A
        statistic whose device presence flag is ``False`` (``present[i]``, or
        the flag :meth:`_reduced_statistics` gave it) is not folded either,
        and not counted.  ``new`` is used as scratch (overwritten): callers
        pass this step's statistics, which nothing reads afterwards.
        """
        if not items:
            return
        known = getattr(self, '_present_flags', {})
        flags = [(present[i] if present is not None else None)
                 for i in range(len(items))]
        flags = [known.get(id(new)) if f is None else f
                 for f, (*_, new) in zip(flags, items)]
        mask = None
        if any(f is not None for f in flags):
            dev = items[0][3].device
            mask = torch.stack([
                torch.ones((), dtype=torch.bool, device=dev) if f is None
                else f.to(dev) for f in flags])
        folded, ok = fold_statistics_([st.get(key) for st, key, _, _ in items],
                                      [new for *_, new in items], weight,
                                      normalize, present=mask, reuse_new=True)
        for (st, key, _, _), running in zip(items, folded):
            st[key] = running
        self.fallbacks.record_flags(
            'nonfinite_statistics', ok.logical_not(),
            [label for _, _, label, _ in items],
            'non-finite statistics were not folded')

    def _reduce_running_factors(self) -> None:
        """Average the running statistics over ranks (``'before_refresh'``)."""
        tensors = [st[key] for name in self.layers
                   for st in [self.layer_state.get(name, {})]
                   for key in self.statistic_keys if key in st]
        all_reduce_sum_(tensors)
        if tensors:
            torch._foreach_div_(tensors, float(world_size()))

    def refresh_due(self, step: int) -> bool:
        """Whether :meth:`update_preconditioners` refreshes anything at ``step``.

        Only consulted with ``reduce_statistics='before_refresh'`` under
        torch.distributed; subclasses that offer that mode override it.
        """
        raise NotImplementedError

    def preconditioned_gradients(
            self, directions: Dict[Tensor, Tensor]
    ) -> Iterator[Tuple[str, Tensor, Tensor, Callable[[Tensor], None]]]:
        """Yield ``(label, grad, preconditioned, store)`` per covered block.

        ``store(direction)`` writes the block's final direction (after the
        finiteness check and norm recovery) into ``directions``.  The base
        class yields one item per layer (:meth:`precondition`); AFOpt adds
        its attention blocks.
        """
        for name, module in self.layers.items():
            g = gradient_matrix(module)
            if g is None:
                continue
            pg = self.precondition(name, module, g)
            if pg is not None:
                yield name, g, pg, partial(_store_layer_direction, module,
                                           directions)

    def _finish_directions(self, labels: Sequence[str], grads: Sequence[Tensor],
                           precond: Sequence[Tensor]) -> List[Tensor]:
        """Norm recovery and the non-finite fallback, batched over blocks.

        ``||P||`` of every block comes from one ``_foreach_norm``; a block
        whose norm is not finite (a NaN / Inf entry) keeps its raw gradient,
        chosen on the device with ``torch.where`` and counted lazily under
        ``'nonfinite_direction'``.  With :attr:`grad_norm_recovery` each
        direction is rescaled to its raw gradient's norm.
        """
        pnorm = torch.stack(torch._foreach_norm(precond))
        ok = torch.isfinite(pnorm)
        if self.grad_norm_recovery:
            gnorm = torch.stack(torch._foreach_norm(grads))
            precond = torch._foreach_mul(precond,
                                         (gnorm / (pnorm + 1e-12)).unbind())
        self.fallbacks.record_flags(
            'nonfinite_direction', ok.logical_not(), labels,
            'preconditioned gradient not finite; the raw gradient was used '
            'for that step')
        return [torch.where(f, p, g)
                for f, p, g in zip(ok.unbind(), precond, grads)]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step.

        Plain and statistics steps read no device value on the host, so on
        a GPU they only queue kernels, as ``torch.optim`` steps do.

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
            self._present_flags = {}  # ids of this step's statistics only
            if self.skip_nonfinite_steps:  # host reads were opted into
                self._reset_nonfinite_state()
        self.capture.clear()
        if (self.reduce_statistics == 'before_refresh' and world_size() > 1
                and self.refresh_due(t)):
            self._reduce_running_factors()
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
        items = list(self.preconditioned_gradients(directions))
        if items:
            labels, grads, precond, stores = zip(*items)
            for store, d in zip(stores,
                                self._finish_directions(labels, grads, precond)):
                store(d)
        self.phase_seconds['precondition'] += time.perf_counter() - clock
        self.base_step(directions)
        self.steps = t + 1
        self.capture.active = self.is_stat_step(self.steps)
        return loss

    def _gradients_finite(self) -> bool:
        """Keep non-finite gradients out of the weights and the state.

        Under AMP the ``GradScaler`` has already skipped a non-finite step
        (it only calls :meth:`step` when the unscaled gradients are finite),
        so nothing is done here.  Otherwise:

        * ``skip_nonfinite_steps=False`` (default): every NaN / Inf gradient
          entry is replaced by zero in place (``nan_to_num_``; finite
          entries are untouched) and the affected parameters are counted on
          the device under ``'nonfinite_gradient_zeroed'``.  No value is read
          back, so the step stays free of host syncs; the weights still take
          their weight decay and momentum, with finite values only.
        * ``skip_nonfinite_steps=True``: one flag is read from the device and
          a non-finite step is skipped exactly like an AMP overflow step
          (weights, state and statistics unchanged; counted under
          ``'nonfinite_gradient_skipped'``).

        Returns:
            bool: ``False`` when the step is to be skipped.
        """
        scaler = self.grad_scaler
        if scaler is not None and getattr(scaler, 'is_enabled', lambda: True)():
            return True
        params = [p for g in self.param_groups for p in g['params']
                  if p.grad is not None and not p.grad.is_sparse]
        if not params:
            return True
        grads = [p.grad for p in params]
        bad = finite_flags(grads).logical_not_()
        if self.skip_nonfinite_steps:
            if not bool(bad.any()):
                return True
            self.fallbacks.record(
                'nonfinite_gradient_skipped',
                'non-finite gradient: the step was skipped (weights, optimizer '
                'state and statistics unchanged), as an AMP loss scaler would')
            return False
        for g in grads:
            g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        self.fallbacks.record_flags(
            'nonfinite_gradient_zeroed', bad, self._param_labels(params),
            'non-finite gradient entries were replaced by zero (set '
            'skip_nonfinite_steps=True to skip such steps instead)')
        return True

    def _param_labels(self, params: Sequence[Tensor]) -> List[str]:
        """Names for ``params`` in fallback messages (layer.weight, ...)."""
        names = getattr(self, '_param_names', None)
        if names is None:
            names = {}
            for layer, module in self.layers.items():
                for key, p in module.named_parameters(recurse=False):
                    names[id(p)] = f'{layer}.{key}'
            self._param_names = names
        return [names.get(id(p), f'param{i}') for i, p in enumerate(params)]

    def _reset_nonfinite_state(self) -> None:
        """Drop a layer's preconditioner state if any of it is not finite.

        Statistics are checked before they are folded, so this only acts on
        state that became non-finite some other way (a corrupted checkpoint,
        a factor overwritten by user code).  It reads one vector from the
        device, so it runs when a checkpoint is loaded and, only with
        ``skip_nonfinite_steps=True``, on statistics steps; a non-finite
        factor met at a refresh otherwise keeps its previous inverse or
        basis (counted by the refresh).  The layer restarts from zero
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

        Square matrices that are exactly symmetric (the factors, and exact
        inverses: bit for bit, checked here) are stored packed, their upper
        triangle flattened row by row (:func:`pack_symmetric`), with their
        shape under ``'packed'``; :meth:`load_state_dict` unpacks them to
        the same bits.  Inverses are left out as
        :meth:`checkpoint_omissions` says.  Saving reads each matrix once
        on the host (never during a step).
        """
        sd = super().state_dict()
        omit = self.checkpoint_omissions()
        layers: Dict[str, Dict[str, Tensor]] = {}
        packed: Dict[str, Dict[str, List[int]]] = {}
        for name, st in self.layer_state.items():
            out = layers[name] = {}
            for key, value in st.items():
                if (name, key) in omit:
                    continue
                value = value.detach()
                if is_symmetric_matrix(value):
                    out[key] = pack_symmetric(value)
                    packed.setdefault(name, {})[key] = list(value.shape)
                else:
                    out[key] = value.clone()
        sd['preconditioner'] = dict(
            steps=self.steps,
            fallbacks=dict(self.fallbacks.counts),
            phase_seconds=dict(self.phase_seconds),
            layers=layers,
            packed=packed)
        extra = self.checkpoint_extras()
        if extra:
            sd['preconditioner']['extras'] = extra
        return sd

    def checkpoint_omissions(self) -> set:
        """``(layer, key)`` pairs of ``layer_state`` left out of a checkpoint.

        With ``checkpoint_inverses=False`` every :meth:`is_derived_key`;
        otherwise none here (NKFAC leaves out, by default, the inverses it
        can rebuild bit for bit when loading).
        """
        if self.checkpoint_inverses is False:
            return {(name, key) for name, st in self.layer_state.items()
                    for key in st if self.is_derived_key(key)}
        return set()

    def checkpoint_extras(self) -> Dict[str, Any]:
        """Subclass bookkeeping saved with the preconditioner state (none)."""
        return {}

    def load_checkpoint_extras(self, extras: Dict[str, Any]) -> None:
        """Restore :meth:`checkpoint_extras` after ``layer_state`` is loaded.

        Called with ``{}`` for checkpoints that have none.
        """

    def is_derived_key(self, key: str) -> bool:
        """Whether ``layer_state[...][key]`` is recomputed from the factors.

        Inverses (``*_inv``) and inverse roots (``*_root``) are: with
        ``checkpoint_inverses=False`` they
        are left out of :meth:`state_dict`, and the first :meth:`step` after
        loading computes each missing one exactly from the loaded factor (as
        for a layer seen for the first time).  That is bit-identical to the
        uninterrupted run when the checkpoint is taken at a step where the
        uninterrupted run refreshes exactly (an iteration that is a multiple
        of ``refresh_interval``; for NKFAC also one of its exact refreshes);
        otherwise it amounts to one extra exact refresh at the resume step.
        """
        return key.endswith(('_inv', '_root'))

    def _step_counters_on_host(self) -> None:
        """Put each parameter's ``step`` counter where torch's AdamW keeps it.

        MMEngine resumes with ``map_location`` set to the GPU, and
        ``torch.optim.Optimizer.load_state_dict`` leaves ``step`` where the
        checkpoint put it; torch's (non-capturable, non-fused) foreach AdamW
        then reads a device counter with ``.item()`` for every parameter at
        every step.  The base updates here are never capturable, so every
        counter becomes the 0-dim CPU float32 tensor that ``torch.optim.AdamW``
        creates itself (one read per counter, at load time only).
        """
        for st in self.state.values():
            step = st.get('step')
            if isinstance(step, Tensor) and (step.device.type != 'cpu'
                                             or step.dtype != torch.float32
                                             or step.dim() != 0):
                st['step'] = step.detach().to('cpu', torch.float32).reshape(())

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load state saved by :meth:`state_dict` (device-agnostic)."""
        state_dict = dict(state_dict)
        pre = state_dict.pop('preconditioner', None)
        super().load_state_dict(state_dict)
        self._step_counters_on_host()
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
        packed = pre.get('packed', {})  # older checkpoints: all unpacked
        for name, st in pre['layers'].items():
            module = self.layers.get(name)
            if module is None:
                unknown.append(name)
                continue
            self.layer_state[name] = loaded_layer_state(
                st, packed.get(name, {}), module.weight.device)
        self.load_checkpoint_extras(pre.get('extras', {}))
        self._reset_nonfinite_state()
        if unknown:
            self.fallbacks.record(
                'unknown_layers_in_checkpoint',
                f'{len(unknown)} layer(s) in the checkpoint are not '
                f'preconditioned here and were ignored: {unknown[:5]}')
        self.capture.clear()
        self.capture.active = self.is_stat_step(self.steps)

    # --------------------------------------------------- engine protocol
    def state_megabytes(self) -> Tuple[float, float]:
        """Per-parameter state plus :attr:`layer_state`, in MiB."""
        base = tensor_megabytes(v for st in self.state.values()
                                for v in st.values())
        factors = tensor_megabytes(v for st in self.layer_state.values()
                                   for v in st.values())
        return base + factors, factors

    def norm_ratios(self) -> List[Tensor]:
        return diagnostics.norm_ratios(self)

    def checkpoint_layout(self) -> Optional[CheckpointLayout]:
        return diagnostics.kronecker_layout(self)

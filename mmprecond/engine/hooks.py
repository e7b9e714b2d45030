# Copyright (c) mmprecond contributors. All rights reserved.
"""Training-log visibility for preconditioned optimizers."""
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from torch import Tensor

from ..curvature.capture import gradient_matrix
from ..linalg import estimate_residual, power_iteration_lmax
from ..optim.fsgd import FeatureDescent
from .checkpoint_size import expected_state_report, saved_state_report

#: Phases of :attr:`PrecondOptimizer.phase_seconds`, in step order.
PHASES = ('statistics', 'refresh', 'precondition')
#: Checkpoint key under which the hook keeps its and the optimizer's counters.
CHECKPOINT_KEY = 'precond_stats'
MB = float(1 << 20)


def _tensors(values: Iterable) -> Iterator[Tensor]:
    """The tensors in ``values``, looking inside lists, tuples and dicts."""
    for v in values:
        if isinstance(v, Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)
        elif isinstance(v, dict):
            yield from _tensors(v.values())


def tensor_megabytes(tensors: Iterable) -> float:
    """Total size in MiB of the tensors in ``tensors`` (others are skipped).

    Lists, tuples and dicts are searched too (e.g. the per-dimension
    factor lists of pytorch-optimizer's SOAP).  Reads only shapes and
    dtypes, never device values.
    """
    return sum(t.numel() * t.element_size() for t in _tensors(tensors)) / MB


def optimizer_state_megabytes(optimizer) -> Tuple[float, float]:
    """``(all state, preconditioner state)`` of ``optimizer`` in MiB.

    *All state* is the per-parameter state of any ``torch.optim.Optimizer``
    (momentum buffers, Adam moments) plus, for mmprecond's optimizers, the
    per-layer preconditioner state (factors, inverses, bases, rotated
    moments), which is the second number.  An optimizer that keeps its
    state elsewhere reports it through a ``state_megabytes()`` method with
    the same meaning (:class:`~mmprecond.optim.PeerSINGD`).
    """
    own = getattr(optimizer, 'state_megabytes', None)
    if callable(own):
        return own()
    base = tensor_megabytes(v for st in optimizer.state.values()
                            for v in st.values())
    layer_state = getattr(optimizer, 'layer_state', None) or {}
    factors = tensor_megabytes(v for st in layer_state.values()
                               for v in st.values())
    return base + factors, factors


def damped_blocks(optimizer, stat: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The damped matrix an optimizer inverts for the statistic ``stat``.

    Returns ``(A, lambda_max, shift)`` with ``A`` as a ``(H, d, d)`` stack:
    ``A = S + max(floor, damping * lambda_max(S)) I`` where ``S`` is the
    factor itself for the Kronecker optimizers (NKFAC, AdaNKFAC, KFAC) and
    the Frobenius-normalised statistic for the feature optimizers (FSGD,
    FAdam, AFOpt, Ada_AFOpt), whose stacks share one shift over their heads.
    """
    blocks = stat.float()
    blocks = blocks.unsqueeze(0) if blocks.dim() == 2 else blocks
    if isinstance(optimizer, FeatureDescent):
        blocks = blocks / (blocks.square().sum().sqrt() + 1e-12)
    lmax = torch.stack([power_iteration_lmax(b) for b in blocks]).max()
    shift = torch.clamp(optimizer.damping * lmax, min=optimizer.damping_floor)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return blocks + shift * eye, lmax, shift


@HOOKS.register_module()
class PrecondStatsHook(Hook):
    """Put an optimizer's cost and a preconditioner's health into the log.

    Runs before MMEngine's ``LoggerHook`` (priority ``'NORMAL'`` against the
    logger's ``'BELOW_NORMAL'``), so every value printed at iteration ``i``
    was computed at iteration ``i``.  Every ``interval`` iterations it writes
    through the message hub (``LoggerHook`` prints them, visualisation
    backends such as ``vis_data/scalars.json`` record them):

    ============================  ============================================
    ``precond/fwd_bwd_s``         seconds per iteration from the start of the
                                  iteration to the optimizer step (data
                                  preprocessing, forward, backward, clipping)
    ``precond/step_s``            seconds per ``optimizer.step()``
    ``precond/statistics_s``      of which folding the statistics (with the
                                  all-reduce), ``precond/refresh_s``
                                  inverses / bases, ``precond/precondition_s``
                                  the preconditioned directions, and
                                  ``precond/base_s`` the rest (base update)
    ``precond/state_mb``          optimizer state in MiB (any optimizer)
    ``precond/factor_mb``         of which preconditioner state
    ``precond/lambda_max``        mean over factors of ``lambda_max(S)``
    ``precond/damping``           mean added damping ``max(floor, eta lmax)``
    ``precond/newton_residual``   max over factors of ``||I - A B||_F`` (4
                                  random probes) of the stored inverse ``B``
                                  against the current damped factor ``A``:
                                  Newton error plus drift since the refresh
    ``precond/norm_ratio``   mean over layers of ``||P(G)|| / ||G||``
                                  before gradient-norm recovery
    ``precond/<kind>``            cumulative fallback counts
                                  (``newton_fallback``, ``eigh_retry``, ...)
    ============================  ============================================

    No key contains ``loss``, ``time`` or ``grad_norm``: MMEngine's
    ``LogProcessor`` would print a moving average of those instead of the
    value.  Times are host wall-clock means over the logging interval (on a GPU,
    kernel launches are asynchronous: synchronise inside the model or the
    optimizer for device times).  The time and memory rows are written for
    any optimizer (SGD, AdamW, ...), so runs can be compared; the others
    only where the optimizer has them (damping and inverses: NKFAC family
    and FSGD / AFOpt family; the norm ratio: optimizers with gradient-norm
    recovery).  The curvature rows cost a power iteration and 4 mat-vecs per
    factor and one extra preconditioning, only on logged iterations;
    ``curvature=False`` turns them off.  The fallback counts and cumulative
    times are stored in checkpoints and restored on ``--resume``.

    Args:
        interval (int): Logging interval in iterations; use the
            ``LoggerHook``'s. Defaults to 50.
        curvature (bool): Log ``lambda_max``, damping, residuals and the
            norm ratio. Defaults to True.

    Example:
        >>> custom_hooks = [dict(type='PrecondStatsHook', interval=50)]
    """

    priority = 'NORMAL'

    def __init__(self, interval: int = 50, curvature: bool = True) -> None:
        if int(interval) < 1:
            raise ValueError(f'Invalid interval: {interval} (>= 1)')
        self.interval = int(interval)
        self.curvature = bool(curvature)
        self.totals: Dict[str, float] = dict(fwd_bwd=0.0, step=0.0)
        self._last_totals: Dict[str, float] = {}
        self._last_iter = 0
        self._iter_start: Optional[float] = None
        self._step_start: Optional[float] = None
        self._probe = False
        self._ratios: List[Tensor] = []
        self._handles: List[Any] = []
        self._resumed: Optional[Tuple[int, Dict[str, Any]]] = None
        # the checkpoint-size messages are logged once per run each
        self._sizes_logged: set = set()

    # ---------------------------------------------------------------- access
    @staticmethod
    def _optimizer(runner):
        return getattr(runner.optim_wrapper, 'optimizer', None)

    def _cumulative(self, optimizer) -> Dict[str, float]:
        out = dict(self.totals)
        phases = getattr(optimizer, 'phase_seconds', None)
        if phases is not None:
            out.update({p: float(phases.get(p, 0.0)) for p in PHASES})
        return out

    # ------------------------------------------------------------ lifecycle
    def before_train(self, runner) -> None:
        optimizer = self._optimizer(runner)
        if optimizer is None:
            return
        if self._resumed is not None and self._resumed[0] == runner.iter > 0:
            self._restore(optimizer, self._resumed[1])
        self._resumed = None
        if 'expected' not in self._sizes_logged and hasattr(optimizer, 'layers'):
            self._sizes_logged.add('expected')
            print_log(expected_state_report(optimizer), logger='current')
        self._last_iter = runner.iter
        self._last_totals = self._cumulative(optimizer)
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    def after_train(self, runner) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch: Optional[dict] = None) -> None:
        self._iter_start = time.perf_counter()
        self._probe = (self.curvature
                       and self.every_n_train_iters(runner, self.interval))

    def _before_step(self, optimizer, args, kwargs) -> None:
        now = time.perf_counter()
        if self._iter_start is not None:
            self.totals['fwd_bwd'] += now - self._iter_start
            self._iter_start = None
        if self._probe:
            self._probe = False
            self._ratios = self._norm_ratios(optimizer)
        self._step_start = time.perf_counter()

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self._step_start is not None:
            self.totals['step'] += time.perf_counter() - self._step_start
            self._step_start = None

    # ------------------------------------------------------------- logging
    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        optimizer = self._optimizer(runner)
        if optimizer is None:
            return
        scalars = self.scalars(optimizer, runner.iter + 1)
        for key, value in scalars.items():
            runner.message_hub.update_scalar(f'train/precond/{key}', value)

    def scalars(self, optimizer, iteration: int) -> Dict[str, float]:
        """Everything logged at 1-based ``iteration`` (see the class doc)."""
        out: Dict[str, float] = {}
        totals = self._cumulative(optimizer)
        n = max(iteration - self._last_iter, 1)
        per_iter = {k: (v - self._last_totals.get(k, 0.0)) / n
                    for k, v in totals.items()}
        out['fwd_bwd_s'] = per_iter['fwd_bwd']
        out['step_s'] = per_iter['step']
        if all(p in per_iter for p in PHASES):
            for p in PHASES:
                out[f'{p}_s'] = per_iter[p]
            out['base_s'] = max(
                per_iter['step'] - sum(per_iter[p] for p in PHASES), 0.0)
        self._last_iter, self._last_totals = iteration, totals
        out['state_mb'], factor_mb = optimizer_state_megabytes(optimizer)
        fallbacks = getattr(optimizer, 'fallbacks', None)
        if fallbacks is None:
            return out
        out['factor_mb'] = factor_mb
        if self.curvature:
            out.update(self._curvature(optimizer))
        for kind, count in fallbacks.counts.items():
            out[kind] = count
        return out

    def _curvature(self, optimizer) -> Dict[str, float]:
        """``lambda_max``, damping, residuals and the norm ratio (host sync)."""
        out: Dict[str, float] = {}
        if self._ratios:
            out['norm_ratio'] = float(torch.stack(self._ratios).mean())
            self._ratios = []
        if not hasattr(optimizer, 'damping_floor'):
            return out
        lmaxes, shifts, residuals = [], [], []
        gen: Dict[torch.device, torch.Generator] = {}
        for st in optimizer.layer_state.values():
            for key, stat in st.items():
                inv = st.get(key + '_inv')
                if inv is None or inv.shape != stat.shape:
                    continue
                a, lmax, shift = damped_blocks(optimizer, stat)
                lmaxes.append(lmax)
                shifts.append(shift)
                if a.device not in gen:
                    gen[a.device] = torch.Generator(a.device).manual_seed(0)
                b = inv.float().reshape(a.shape)
                residuals += [estimate_residual(ab, bb, generator=gen[a.device])
                              for ab, bb in zip(a, b)]
        if lmaxes:
            out['lambda_max'] = float(torch.stack(lmaxes).mean())
            out['damping'] = float(torch.stack(shifts).mean())
            out['newton_residual'] = float(torch.stack(residuals).max())
        return out

    @staticmethod
    def _norm_ratios(optimizer) -> List[Tensor]:
        """``||P(G)|| / ||G||`` per layer, before norm recovery (no sync).

        Only for optimizers whose ``precondition`` is a pure function of the
        gradient and the stored inverses with optional norm recovery.
        """
        if not hasattr(optimizer, 'grad_norm_recovery'):
            return []
        ratios = []
        recovery = optimizer.grad_norm_recovery
        optimizer.grad_norm_recovery = False
        try:
            with torch.no_grad():
                for name, module in optimizer.layers.items():
                    g = gradient_matrix(module)
                    if g is None:
                        continue
                    pg = optimizer.precondition(name, module, g)
                    if pg is not None:
                        g = g.float()
                        ratios.append(pg.norm() / (g.norm() + 1e-12))
        finally:
            optimizer.grad_norm_recovery = recovery
        return ratios

    # ------------------------------------------------------------ checkpoint
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        optimizer = self._optimizer(runner)
        saved = checkpoint.get('optimizer')
        if ('saved' not in self._sizes_logged and isinstance(saved, dict)
                and 'preconditioner' in saved):
            self._sizes_logged.add('saved')
            print_log(f'[{type(optimizer).__name__}] '
                      f'{saved_state_report(saved)} (logged once)',
                      logger='current')
        fallbacks = getattr(optimizer, 'fallbacks', None)
        checkpoint[CHECKPOINT_KEY] = dict(
            totals=dict(self.totals),
            fallbacks={} if fallbacks is None else
            {k: int(v) for k, v in fallbacks.counts.items()},
            phase_seconds={
                k: float(v)
                for k, v in getattr(optimizer, 'phase_seconds', {}).items()
            })

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        stats = checkpoint.get(CHECKPOINT_KEY)
        if stats is not None:
            # applied in before_train, and only when this load was a resume
            self._resumed = (checkpoint['meta']['iter'], stats)

    def _restore(self, optimizer, stats: Dict[str, Any]) -> None:
        self.totals.update(stats['totals'])
        fallbacks = getattr(optimizer, 'fallbacks', None)
        if fallbacks is not None:
            for kind, count in stats['fallbacks'].items():
                fallbacks.counts[kind] = count
        phases = getattr(optimizer, 'phase_seconds', None)
        if phases is not None:
            for phase, seconds in stats['phase_seconds'].items():
                phases[phase] = seconds

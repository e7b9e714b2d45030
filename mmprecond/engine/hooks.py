# Copyright (c) mmprecond contributors. All rights reserved.
"""Training-log visibility for preconditioned optimizers."""
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from torch import Tensor

from ..protocol import EngineProtocol, tensor_megabytes
from .checkpoint_size import expected_state_report, saved_state_report
from .second_pass import wrapped_optimizer

__all__ = ['PrecondStatsHook', 'optimizer_state_megabytes', 'tensor_megabytes']

#: Phases of :attr:`PrecondOptimizer.phase_seconds`, in step order.
PHASES = ('statistics', 'refresh', 'precondition')
#: Checkpoint key under which the hook keeps its and the optimizer's counters.
CHECKPOINT_KEY = 'precond_stats'


def optimizer_state_megabytes(optimizer) -> Tuple[float, float]:
    """``(all state, preconditioner state)`` of ``optimizer`` in MiB.

    *All state* is the per-parameter state of any ``torch.optim.Optimizer``
    (momentum buffers, Adam moments) plus, for mmprecond's optimizers, the
    preconditioner state (factors, inverses, bases, rotated moments), which
    is the second number and which they report through
    :meth:`~mmprecond.protocol.EngineProtocol.state_megabytes`.
    """
    if isinstance(optimizer, EngineProtocol):
        return optimizer.state_megabytes()
    return tensor_megabytes(v for st in optimizer.state.values()
                            for v in st.values()), 0.0


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
    ``precond/<diagnostic>``      the family's own measures, from the
                                  optimizer's ``diagnostics()``
                                  (:mod:`mmprecond.optim.diagnostics`):
                                  ``lambda_max`` and ``damping`` (mean over
                                  factors), ``newton_residual`` only where
                                  there are Newton inverses (NKFAC family,
                                  FSGD / AFOpt family), ``root_error`` where
                                  there are inverse roots (SGDM_BK,
                                  AdamW_BK, Shampoo), ``basis_drift`` for
                                  AdamR's eigenbases
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
        return wrapped_optimizer(runner.optim_wrapper)

    @staticmethod
    def _ours(optimizer) -> Optional[EngineProtocol]:
        """``optimizer`` if it is one of mmprecond's, else None."""
        return optimizer if isinstance(optimizer, EngineProtocol) else None

    def _cumulative(self, optimizer) -> Dict[str, float]:
        out = dict(self.totals)
        ours = self._ours(optimizer)
        if ours is not None and ours.phase_seconds is not None:
            out.update({p: float(ours.phase_seconds.get(p, 0.0))
                        for p in PHASES})
        return out

    # ------------------------------------------------------------ lifecycle
    def before_train(self, runner) -> None:
        optimizer = self._optimizer(runner)
        if optimizer is None:
            return
        if self._resumed is not None and self._resumed[0] == runner.iter > 0:
            self._restore(optimizer, self._resumed[1])
        self._resumed = None
        ours = self._ours(optimizer)
        if ('expected' not in self._sizes_logged and ours is not None
                and ours.checkpoint_layout() is not None):
            self._sizes_logged.add('expected')
            print_log(expected_state_report(ours), logger='current')
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
        ours = self._ours(optimizer)
        if ours is None or ours.fallbacks is None:
            return out
        out['factor_mb'] = factor_mb
        if self.curvature:
            out.update(self._curvature(ours))
        for kind, count in ours.fallbacks.counts.items():
            out[kind] = count
        return out

    def _curvature(self, optimizer: EngineProtocol) -> Dict[str, float]:
        """The norm ratio and the family's own diagnostics (host sync)."""
        out: Dict[str, float] = {}
        if self._ratios:
            out['norm_ratio'] = float(torch.stack(self._ratios).mean())
            self._ratios = []
        for key, value in optimizer.diagnostics().items():
            out[key] = float(value)
        return out

    def _norm_ratios(self, optimizer) -> List[Tensor]:
        """``||P(G)|| / ||G||`` per layer, before norm recovery (no sync)."""
        ours = self._ours(optimizer)
        return [] if ours is None else ours.norm_ratios()

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
        ours = self._ours(optimizer)
        fallbacks = None if ours is None else ours.fallbacks
        phases = None if ours is None else ours.phase_seconds
        checkpoint[CHECKPOINT_KEY] = dict(
            totals=dict(self.totals),
            fallbacks={} if fallbacks is None else
            {k: int(v) for k, v in fallbacks.counts.items()},
            phase_seconds={} if phases is None else
            {k: float(v) for k, v in phases.items()})

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        stats = checkpoint.get(CHECKPOINT_KEY)
        if stats is not None:
            # applied in before_train, and only when this load was a resume
            self._resumed = (checkpoint['meta']['iter'], stats)

    def _restore(self, optimizer, stats: Dict[str, Any]) -> None:
        self.totals.update(stats['totals'])
        ours = self._ours(optimizer)
        if ours is None:
            return
        if ours.fallbacks is not None:
            for kind, count in stats['fallbacks'].items():
                ours.fallbacks.counts[kind] = count
        phases = ours.phase_seconds
        if phases is not None:
            for phase, seconds in stats['phase_seconds'].items():
                phases[phase] = seconds

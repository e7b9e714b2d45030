# Copyright (c) mmprecond contributors. All rights reserved.
"""The one contract between :mod:`mmprecond.engine` and the optimizers.

Everything the MMEngine side (the optim-wrapper constructor, the Hessian
optim wrapper, :class:`~mmprecond.engine.PrecondStatsHook`,
:class:`~mmprecond.engine.SecondPassHook`,
:class:`~mmprecond.engine.WarmStartHook` and the checkpoint-size report)
asks of an optimizer is declared here, with a default that means "this
optimizer does not need it".  Every mmprecond optimizer inherits
:class:`EngineProtocol`; ``engine/`` tells them from other optimizers
(``torch.optim.AdamW``, pytorch-optimizer's, ...) by one
``isinstance(optimizer, EngineProtocol)`` and reads nothing else by name:
no ``hasattr`` / ``getattr`` probing, no import of an optimizer class.

================================  ==========================================
member                            asked by, and the default
================================  ==========================================
``requires_model``                constructor: pass ``model=`` (False)
``attach_grad_scaler(scaler)``    constructor, for ``AmpOptimWrapper``
                                  (ignores the scaler)
``prepares_hessian`` /            ``HessianOptimWrapper``: call
``prepare_hessian(loss)``         ``prepare_hessian`` before the backward
                                  (False; SGD_PH)
``uses_second_pass``,             ``SecondPassHook``: whether the step
``second_pass_due()``,            about to run needs a second pass, whether
``second_pass_pending()``,        the step just taken wants it now, and the
``second_pass(closure, ...)``     pass itself, defined only by such
                                  optimizers (False; K-BFGS, SMW-NG)
``warm_start_remaining()``        ``WarmStartHook``: statistics-only steps
                                  still to take (0; K-BFGS, TNT)
``fallbacks``                     stats hook: the :class:`FallbackLog`
                                  (None: no counters, no curvature rows)
``phase_seconds``                 stats hook: cumulative seconds per phase
                                  (None: not timed)
``state_megabytes()``             stats hook: ``(all state, preconditioner
                                  state)`` in MiB (per-parameter state, 0)
``norm_ratios()``                 stats hook, before the step of a logged
                                  iteration: ``||P(G)|| / ||G||`` per layer
                                  (none)
``diagnostics()``                 stats hook, after that step: the family's
                                  own scalars (none)
``checkpoint_layout()``           checkpoint-size report (None: no report)
================================  ==========================================

``diagnostics()`` returns the family's own health measures, each named for
what it is: ``newton_residual`` only where there are Newton inverses
(NKFAC, AdaNKFAC, KFAC, FSGD, FAdam, AFOpt, Ada_AFOpt), ``root_error``
where there are inverse roots (SGDM_BK, AdamW_BK, Shampoo), ``basis_drift``
for eigenbases (AdamR); see :mod:`mmprecond.optim.diagnostics`.  Values may
be device tensors: the hook reads them only at its logging interval, so an
optimizer's ``step()`` never synchronises for them.  See
``docs/engine_protocol.md`` for how to add an optimizer.

Example:
    >>> import torch
    >>> from mmprecond.protocol import EngineProtocol
    >>> class MySGD(torch.optim.SGD, EngineProtocol):
    ...     def diagnostics(self):
    ...         return dict(lr=self.param_groups[0]['lr'])
    >>> opt = MySGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    >>> isinstance(opt, EngineProtocol), opt.requires_model, opt.diagnostics()
    (True, False, {'lr': 0.1})
"""
from dataclasses import dataclass, field
from typing import (
    Any,
    ClassVar,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Tuple,
    Union,
)

from torch import Tensor

#: MiB in bytes.
MB = float(1 << 20)
#: A diagnostic value: a float, or a 0-dim tensor read at the log interval.
Scalar = Union[float, Tensor]


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

    Example:
        >>> import torch
        >>> tensor_megabytes([torch.zeros(1 << 18), [torch.zeros(1 << 18)]])
        2.0
    """
    return sum(t.numel() * t.element_size() for t in _tensors(tensors)) / MB


@dataclass
class CheckpointLayout:
    """What a checkpoint of the optimizer holds, from shapes alone.

    Read by :func:`mmprecond.engine.checkpoint_size.expected_state_report`.

    Attributes:
        per_param_buffers (int): Base-update buffers per parameter element
            (1 for SGDM, 2 for AdamW).
        factors (list[tuple[str, int]]): ``('layer.side', d)`` of every
            ``d x d`` factor the optimizer forms (saved packed, fp32).
        derived_kind (str): What is derived from the factors: ``'inverses'``
            or ``'bases'``.
        derived_mode (bool or str): ``checkpoint_inverses``: whether the
            derived matrices are saved (``'auto'``: when they cannot be
            rebuilt at load).
    """

    per_param_buffers: int = 1
    factors: List[Tuple[str, int]] = field(default_factory=list)
    derived_kind: str = 'inverses'
    derived_mode: Union[bool, str] = True


class EngineProtocol:
    """Mixin every mmprecond optimizer inherits; see the module docstring.

    Put it after ``torch.optim.Optimizer`` in the bases
    (``class MyOpt(Optimizer, EngineProtocol)``) and override what the
    optimizer needs.  The defaults are those of an optimizer that needs
    nothing from the engine and reports nothing beyond its state size.
    """

    #: Whether the constructor passes the unwrapped model as ``model=``.
    requires_model: ClassVar[bool] = False
    #: Whether ``prepare_hessian(loss)`` (defined by such an optimizer only,
    #: e.g. SGD_PH) must run before each backward.
    prepares_hessian: ClassVar[bool] = False
    #: Whether the optimizer takes a second forward/backward on the same
    #: minibatch after some steps: it then defines
    #: ``second_pass(closure, first_loss=None)`` (K-BFGS, SMW-NG).
    uses_second_pass: ClassVar[bool] = False
    #: Counts of every fallback taken (``FallbackLog``); None: no counters.
    fallbacks: Any = None
    #: Cumulative host seconds per step phase (``'statistics'``,
    #: ``'refresh'``, ``'precondition'``); None: phases are not timed.
    phase_seconds: Optional[Dict[str, float]] = None

    def attach_grad_scaler(self, scaler: Any) -> None:
        """Tell the optimizer which ``GradScaler`` scales the loss.

        The default ignores it (the optimizer reads no gradient statistics).
        """

    def second_pass_due(self) -> bool:
        """Whether the step about to run will want :meth:`second_pass`."""
        return False

    def second_pass_pending(self) -> bool:
        """Whether the step just taken waits for :meth:`second_pass`."""
        return False

    def warm_start_remaining(self) -> int:
        """Statistics-only steps still to take before parameters move."""
        return 0

    def state_megabytes(self) -> Tuple[float, float]:
        """``(all state, preconditioner state)`` in MiB (shapes only).

        The default counts the per-parameter ``state`` of
        ``torch.optim.Optimizer`` and no preconditioner state.
        """
        state = getattr(self, 'state', {})
        return tensor_megabytes(v for st in state.values()
                                for v in st.values()), 0.0

    def norm_ratios(self) -> List[Tensor]:
        """``||P(G)|| / ||G||`` per preconditioned layer, without a sync.

        Called on the gradients of a logged iteration, before the step.
        """
        return []

    def diagnostics(self) -> Dict[str, Scalar]:
        """The family's own health scalars, e.g. ``{'root_error': t}``.

        Called only at the stats hook's logging interval; may cost a few
        mat-vecs per factor and may return device tensors.
        """
        return {}

    def checkpoint_layout(self) -> Optional[CheckpointLayout]:
        """What a checkpoint will hold, or None when not reported."""
        return None

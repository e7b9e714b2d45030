# Copyright (c) mmprecond contributors. All rights reserved.
"""What makes a preconditioned optimizer's checkpoint large, in bytes.

:class:`~mmprecond.engine.PrecondStatsHook` logs :func:`expected_state_report`
once when training starts and :func:`saved_state_report` once when the first
checkpoint is written, so a user sees the size before the disk fills up.
See ``docs/checkpoints.md``.
"""
from typing import Any, Dict, List, Tuple

from torch import Tensor

MIB = float(1 << 20)

#: Kinds of ``layer_state`` entries, by key.
_KINDS = (('factors', ('L', 'R')), ('bases', ('U1', 'U2')),
          ('rotated moments', ('exp_avg', 'exp_avg_sq')))


def _kind(key: str) -> str:
    for kind, keys in _KINDS:
        if key in keys:
            return kind
    return 'inverses' if key.endswith(('_inv', '_root')) else 'other'


def _nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (dicts, lists and tuples searched)."""
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _mib(n: float) -> str:
    return f'{n / MIB:.4g} MiB'


def saved_state_breakdown(state: Dict[str, Any]
                          ) -> Tuple[Dict[str, int], List[Tuple[str, int]]]:
    """Bytes per kind and per entry of a saved optimizer state dict.

    Args:
        state (dict): What ``optimizer.state_dict()`` (or the optim
            wrapper's) returned, i.e. a checkpoint's ``'optimizer'`` entry.

    Returns:
        tuple[dict, list]: Bytes per kind (``'base buffers'`` for the
        per-parameter state of ``torch.optim``, then ``'factors'``,
        ``'inverses'``, ``'bases'``, ``'rotated moments'``, ``'other'``)
        and ``(layer.key, bytes)`` of every preconditioner entry, largest
        first.

    Example:
        >>> import torch
        >>> kinds, entries = saved_state_breakdown(dict(
        ...     state={0: dict(momentum_buffer=torch.zeros(4))},
        ...     preconditioner=dict(layers=dict(fc=dict(L=torch.zeros(3))))))
        >>> kinds['base buffers'], entries
        (16, [('fc.L', 12)])
    """
    kinds = dict.fromkeys(('base buffers', 'factors', 'inverses', 'bases',
                           'rotated moments', 'other'), 0)
    kinds['base buffers'] = _nbytes(state.get('state', {}))
    entries = []
    pre = state.get('preconditioner') or {}
    for name, st in (pre.get('layers') or {}).items():
        for key, value in st.items():
            n = _nbytes(value)
            kinds[_kind(key)] += n
            entries.append((f'{name}.{key}', n))
    kinds['other'] += _nbytes({k: v for k, v in state.items()
                               if k not in ('state', 'preconditioner')})
    entries.sort(key=lambda e: (-e[1], e[0]))
    return kinds, entries


def saved_state_report(state: Dict[str, Any], top: int = 5) -> str:
    """One log message: the saved optimizer state's size and largest parts."""
    kinds, entries = saved_state_breakdown(state)
    total = sum(kinds.values())
    parts = ', '.join(f'{_mib(n)} {k}' for k, n in kinds.items() if n)
    largest = '; '.join(f'{label} {_mib(n)}' for label, n in entries[:top])
    packed = sum(len(v) for v in
                 ((state.get('preconditioner') or {}).get('packed') or {}).values())
    msg = (f'optimizer state in this checkpoint: {_mib(total)} ({parts}); '
           f'{packed} symmetric matrices stored packed')
    if largest:
        msg += f'; largest: {largest}'
    return msg


def expected_state_report(optimizer, top: int = 5) -> str:
    """One log message: the optimizer state a checkpoint will hold.

    Estimated from the shapes alone (nothing is read from the device):
    the base update's per-parameter buffers (one for SGDM, two for AdamW
    and the rotated Adam moments), the fp32 factors packed to their upper
    triangle, and, where the optimizer keeps them, inverses or eigenbases
    at full size (an upper bound: see ``docs/checkpoints.md`` for when
    they are left out), as the optimizer's
    :meth:`~mmprecond.protocol.EngineProtocol.checkpoint_layout` describes
    them.
    """
    params = sum(p.numel() * p.element_size()
                 for g in optimizer.param_groups for p in g['params']
                 if p.requires_grad)
    layout = optimizer.checkpoint_layout()
    base = layout.per_param_buffers * params
    derived_kind, mode = layout.derived_kind, layout.derived_mode
    factors = derived = 0
    largest: List[Tuple[str, int, int]] = []
    for label, d in layout.factors:
        factors += 4 * d * (d + 1) // 2
        derived += 4 * d * d
        largest.append((label, d, 4 * d * (d + 1) // 2))
    if mode is False:
        derived = 0
    largest.sort(key=lambda e: (-e[2], e[0]))
    top_txt = '; '.join(f'{label} ({d}x{d}) {_mib(n)} packed'
                        for label, d, n in largest[:top])
    msg = (f'[{type(optimizer).__name__}] a checkpoint will hold about '
           f'{_mib(base + factors)} of optimizer state: {_mib(base)} of '
           f'per-parameter buffers, {_mib(factors)} of factors (packed)')
    if derived:
        when = ('when they cannot be rebuilt at load'
                if mode == 'auto' else 'as kept')
        msg += f', plus up to {_mib(derived)} of {derived_kind} ({when})'
    if top_txt:
        msg += f'; largest factors: {top_txt}'
    return msg

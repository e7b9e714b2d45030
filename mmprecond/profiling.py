# Copyright (c) mmprecond contributors. All rights reserved.
"""Count what an optimizer step dispatches: aten ops and host reads.

On a GPU every read of a device value on the host (``.item()``,
``bool(t)``, ``float(t)``, an error check of ``torch.linalg``) waits for all
queued kernels; each such read reaches the dispatcher as one of
:data:`HOST_READ_OPS`.  The
number of aten ops is the number of kernel launches, give or take views.
:class:`DispatchCounter` records both for any code block, on any device, so
a CPU run already shows what a GPU run would wait for.

Example:
    >>> import torch
    >>> with DispatchCounter() as c:
    ...     t = torch.ones(3) * 2
    ...     _ = float(t.sum())
    >>> c.ops, c.host_reads  # ones, mul, sum, _local_scalar_dense
    (4, 1)
"""
from collections import Counter
from typing import Any, Iterable, Set

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

#: Ops that read a device value on the host (``_linalg_check_errors``: the
#: error check of ``torch.linalg.solve`` / ``inv`` / ``cholesky``; ``nonzero``
#: and ``masked_select``: outputs whose size depends on the values).
HOST_READ_OPS = ('_local_scalar_dense', 'equal', 'is_nonzero',
                 '_linalg_check_errors', 'nonzero', 'masked_select')


def counter_tensors(optimizer: Any) -> Set[int]:
    """Storage addresses of the 0-dim CPU counters an optimizer keeps.

    ``torch.optim`` keeps each parameter's step count as a 0-dim CPU tensor
    and reads it with ``.item()`` every step (no device sync: the value lives
    on the host).  Reads of these are not counted by :class:`DispatchCounter`
    when it is given this set, so that a CPU run counts exactly the reads that
    would be syncs on a GPU.
    """
    states: Iterable = list(optimizer.state.values())
    states = list(states) + list(getattr(optimizer, 'layer_state', {}).values())
    return {
        v.untyped_storage().data_ptr()
        for st in states for v in st.values()
        if isinstance(v, Tensor) and v.dim() == 0 and v.device.type == 'cpu'
    }


class DispatchCounter(TorchDispatchMode):
    """A dispatch mode that counts aten ops and host reads of tensor values.

    Args:
        ignore (set[int], optional): Storage addresses whose reads are not
            counted (see :func:`counter_tensors`).

    Attributes:
        ops (int): aten ops dispatched.
        host_reads (int): Reads of tensor values on the host, each a
            host-device sync on a GPU (unless the tensor is in ``ignore``).
        by_name (Counter): Op counts by name, for diagnosis.
    """

    def __init__(self, ignore: Set[int] = frozenset()) -> None:
        super().__init__()
        self.ignore = ignore
        self.ops = 0
        self.host_reads = 0
        self.by_name: Counter = Counter()

    def _is_ignored(self, src: Any) -> bool:
        return (isinstance(src, Tensor) and src.device.type == 'cpu'
                and src.dim() == 0
                and src.untyped_storage().data_ptr() in self.ignore)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops += 1
        self.by_name[name] += 1
        if name in HOST_READ_OPS:
            if not self._is_ignored(args[0]):
                self.host_reads += 1
        return func(*args, **(kwargs or {}))

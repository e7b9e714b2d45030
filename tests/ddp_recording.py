# Copyright (c) mmprecond contributors. All rights reserved.
"""Record the collectives a block of code issues, by wrapping torch.distributed."""
import os
from datetime import timedelta
from typing import Any, Callable, List, Tuple

import torch
import torch.distributed as dist

#: The collectives that are wrapped (those this torch lacks are left out).
COLLECTIVES = ('all_reduce', 'broadcast', 'all_gather', 'all_gather_into_tensor',
               'reduce_scatter', 'reduce_scatter_tensor', 'all_to_all',
               'all_to_all_single', 'all_gather_object', 'broadcast_object_list',
               'reduce', 'gather', 'scatter', 'barrier', 'all_reduce_coalesced')

class CollectiveLog:
    """Context manager: ``calls`` gets ``(name, dtype, shapes, side_group)``.

    ``dtype`` is that of the call's first tensor (``None`` without one) and
    ``shapes`` the shapes of all its tensors, those inside list arguments
    (``all_gather``'s output list) included.  ``side_group`` is ``True`` for
    a collective on a group other than the default one.  ``int_results``
    keeps the reduced value of every int64 all-reduce (row counts).
    """

    def __init__(self) -> None:
        self.calls: List[Tuple[str, Any, Tuple[Tuple[int, ...], ...], bool]] = []
        self.int_results: List[torch.Tensor] = []
        self._saved: List[Tuple[str, Callable]] = []

    def _wrap(self, name: str, orig: Callable) -> Callable:

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            tensors = []
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor):
                    tensors.append(a)
                elif isinstance(a, (list, tuple)):
                    tensors += [t for t in a if isinstance(t, torch.Tensor)]
            group = kwargs.get('group')
            side = group is not None and group is not dist.group.WORLD
            self.calls.append((name, tensors[0].dtype if tensors else None,
                               tuple(tuple(t.shape) for t in tensors), side))
            out = orig(*args, **kwargs)
            t = args[0] if args else kwargs.get('tensor')
            if (name == 'all_reduce' and isinstance(t, torch.Tensor)
                    and t.dtype == torch.int64):
                self.int_results.append(t.clone())
            return out

        return wrapped

    def __enter__(self) -> 'CollectiveLog':
        for name in COLLECTIVES:
            orig = getattr(dist, name, None)
            if orig is None:
                continue
            self._saved.append((name, orig))
            setattr(dist, name, self._wrap(name, orig))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, orig in self._saved:
            setattr(dist, name, orig)
        self._saved = []


def join_gloo(rank: int, world: int, port: int, seconds: int = 60) -> None:
    """Join a gloo group whose collectives time out instead of hanging."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world,
                            timeout=timedelta(seconds=seconds))
    torch.set_num_threads(1)


def save_from_rank0(obj: Any, path: str) -> None:
    """Gather ``obj`` of every rank, save the list from rank 0, leave the group.

    Called outside any :class:`CollectiveLog` (the gather is a collective).
    """
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    if dist.get_rank() == 0:
        torch.save(out, path)
    dist.destroy_process_group()

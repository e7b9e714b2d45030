# Copyright (c) mmprecond contributors. All rights reserved.
"""Collectives for preconditioner statistics.

Only what the algorithms need, and written so that every rank issues the same
collectives in the same order: callers pass every registered layer in a
fixed order, with zero tensors for layers that did not run on this rank.
"""
import math
from typing import (
    Callable,
    Dict,
    Hashable,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch
import torch.distributed as dist
from torch import Tensor

#: Bytes per all-reduce bucket.  One statistics step of a ResNet-50 FPN
#: Faster R-CNN (170 tensors, Gram matrices up to 8192 wide: 0.74 GB in fp32)
#: then takes 3 collectives instead of 170; the price is one transient copy
#: of at most this size.
BUCKET_BYTES = 256 << 20


def world_size() -> int:
    """Number of processes, 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def bucket_plan(tensors: List[Tensor],
                bucket_bytes: int = BUCKET_BYTES) -> List[List[int]]:
    """Group tensor indices into flat all-reduce buckets, in order.

    Consecutive tensors of one dtype and device share a bucket of at most
    ``bucket_bytes`` (a single larger tensor gets a bucket of its own).  The
    plan depends only on shapes, dtypes and devices, so every rank that
    passes the same list issues the same collectives in the same order.
    """
    plan: List[List[int]] = []
    size = 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        last = tensors[plan[-1][0]] if plan else None
        if (last is None or size + nbytes > bucket_bytes
                or t.dtype != last.dtype or t.device != last.device):
            plan.append([])
            size = 0
        plan[-1].append(i)
        size += nbytes
    return plan


def all_reduce_sum_(tensors: List[Tensor], bucket_bytes: int = BUCKET_BYTES) -> int:
    """Sum ``tensors`` in place across ranks, packed into flat buckets.

    See :func:`bucket_plan`: a ResNet-50 FPN needs a handful of collectives
    rather than hundreds.

    Returns:
        int: Number of collectives issued (0 without distributed).
    """
    if world_size() == 1 or not tensors:
        return 0
    plan = bucket_plan(tensors, bucket_bytes)
    for idx in plan:
        bucket = [tensors[i] for i in idx]
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
    return len(plan)


_HOST_GROUP: Dict[int, Optional['dist.ProcessGroup']] = {}


def _host_group() -> Optional['dist.ProcessGroup']:
    """A process group that reduces CPU tensors (``None``: the default one).

    The default group already does when its backend is gloo (or a
    ``cpu:gloo,cuda:nccl`` mix); under plain NCCL a gloo group over the
    same ranks is created once.  Every rank reaches the first call at the
    same point of the same step, as ``new_group`` requires.
    """
    key = id(dist.group.WORLD)  # a re-initialised world gets a new group
    if key not in _HOST_GROUP:
        backend = str(dist.get_backend()).lower()
        _HOST_GROUP[key] = (None if 'gloo' in backend else
                            dist.new_group(backend='gloo'))
    return _HOST_GROUP[key]


def all_reduce_ints(values: List[int]) -> List[int]:
    """Sum Python ints across ranks without touching any device.

    Host-side counters (rows of a statistic, calls of a module) are reduced
    as a CPU tensor over a gloo group, so reading the result is no
    host-device synchronisation, unlike ``.item()`` on a reduced CUDA
    tensor.

    Example:
        >>> all_reduce_ints([3, 0])  # one process: unchanged
        [3, 0]
    """
    if world_size() == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, group=_host_group())
    return [int(v) for v in t.tolist()]


def assign_by_cost(costs: List[float], ranks: int) -> List[int]:
    """Owner rank of each task: greedy longest-processing-time balancing.

    Deterministic (ties broken by task index), so every rank computes the
    same assignment without communicating.
    """
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    load = [0.0] * ranks
    owner = [0] * len(costs)
    for i in order:
        r = min(range(ranks), key=lambda k: (load[k], k))
        owner[i] = r
        load[r] += costs[i]
    return owner


#: What a non-owner rank must know to receive one result tensor: its shape,
#: dtype and device.  A tensor serves as its own spec.
Spec = Tuple[Tuple[int, ...], torch.dtype, torch.device]


def _spec(t: Union[Tensor, Spec]) -> Spec:
    if isinstance(t, Tensor):
        return tuple(t.shape), t.dtype, t.device
    return t


def run_sharded(tasks: List[Tuple[float, Sequence[Union[Tensor, Spec]],
                                  Callable[[], List[Tensor]]]],
                shard: bool = True) -> List[List[Tensor]]:
    """Run expensive work on one rank each and share the results.

    Each task is ``(cost, templates, fn)``: ``fn()`` returns tensors shaped
    like ``templates`` (tensors, of which only the shape, dtype and device
    are used, or ``(shape, dtype, device)`` specs).  With one process every
    task runs locally.  Otherwise tasks are assigned by
    :func:`assign_by_cost`, each rank runs its own, and every rank's results
    are broadcast from it in one flat buffer per dtype and device, so all
    ranks end up with bit-identical tensors after ``world_size`` broadcasts.

    Args:
        tasks (list[tuple]): ``(cost, templates, fn)`` per task.
        shard (bool): ``False`` runs every task on every rank (no
            communication), the optimizers' "replicated" mode.

    Returns:
        list[list[Tensor]]: Each task's results, in task order.
    """
    world = world_size()
    if world == 1 or not shard:
        return [fn() for _, _, fn in tasks]
    rank = dist.get_rank()
    owner = assign_by_cost([c for c, _, _ in tasks], world)
    results: List[Optional[List[Tensor]]] = [None] * len(tasks)
    for i, (_, _, fn) in enumerate(tasks):
        if owner[i] == rank:
            results[i] = [t.contiguous() for t in fn()]
    for src in range(world):
        mine = [i for i in range(len(tasks)) if owner[i] == src]
        specs = [_spec(t) for i in mine for t in tasks[i][1]]
        if not specs:
            continue
        groups: Dict[Tuple[torch.dtype, torch.device], List[int]] = {}
        for k, (_, dtype, device) in enumerate(specs):
            groups.setdefault((dtype, device), []).append(k)
        flat_out: List[Optional[Tensor]] = [None] * len(specs)
        produced = ([t for i in mine for t in results[i]]
                    if src == rank else None)
        for (dtype, device), idx in groups.items():
            sizes = [math.prod(specs[k][0]) for k in idx]
            if src == rank:
                flat = torch.cat([produced[k].reshape(-1) for k in idx])
            else:
                flat = torch.empty(sum(sizes), dtype=dtype, device=device)
            dist.broadcast(flat, src=src)
            for k, part in zip(idx, flat.split(sizes)):
                flat_out[k] = part.view(specs[k][0])
        pos = 0
        for i in mine:
            n = len(tasks[i][1])
            results[i] = flat_out[pos:pos + n]
            pos += n
    return results  # type: ignore[return-value]


class Chunk(NamedTuple):
    """A slice of one batch of :func:`run_batched`.

    Attributes:
        key (Hashable): The batching key its items share.
        items (list[int]): Indices of its items in the caller's list.
        offset (int): Position of ``items[0]`` within the whole batch.
        batch_size (int): Number of items in the whole batch.
    """
    key: Hashable
    items: List[int]
    offset: int
    batch_size: int


def group_by_key(keys: Sequence[Hashable]) -> Dict[Hashable, List[int]]:
    """Indices of equal keys, in order of first appearance (deterministic)."""
    groups: Dict[Hashable, List[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def run_batched(keys: Sequence[Hashable],
                work: Callable[[Chunk], List[Tensor]],
                cost: Callable[[Hashable], float],
                outputs: Optional[Callable[[Hashable, int], Sequence[Spec]]] = None,
                shard: bool = True,
                max_items: Optional[Callable[[Hashable], int]] = None
                ) -> List[Tuple[Chunk, List[Tensor]]]:
    """Batch items with equal keys, run each batch once, shard over ranks.

    Items whose ``keys`` are equal (e.g. Kronecker factors of one size,
    dtype and device) form a batch that ``work`` processes with batched
    kernels, so the number of kernel launches grows with the number of
    distinct keys, not of items.  Under torch.distributed with ``shard``,
    each batch is cut into at most ``world_size`` near-equal chunks, the
    chunks are spread over the ranks by :func:`run_sharded` (balanced by
    ``cost(key)`` per item) and their results broadcast, so every rank ends
    with bit-identical results; otherwise there is one chunk per batch.
    ``max_items`` caps a chunk's size further (e.g. cache-sized batches on
    the CPU, :func:`mmprecond.linalg.batch_limit`).

    Args:
        keys (Sequence[Hashable]): Batching key of each item; identical
            (structure and order) on every rank.
        work (Callable): ``work(chunk)`` returns the chunk's result tensors,
            each with ``len(chunk.items)`` as its leading dimension.
        cost (Callable): Cost of one item of a key (e.g. ``n ** 3``).
        outputs (Callable, optional): ``outputs(key, count)``: the
            ``(shape, dtype, device)`` of each result of a chunk of
            ``count`` items, needed to receive a broadcast (with ``shard``
            under torch.distributed).
        shard (bool): ``False``: every rank runs every batch.
        max_items (Callable, optional): Most items of a key in one chunk.

    Returns:
        list[tuple[Chunk, list[Tensor]]]: Each chunk and its results.
    """
    world = world_size() if shard else 1
    if world > 1 and outputs is None:
        raise ValueError('sharded run_batched needs the outputs spec')
    chunks: List[Chunk] = []
    for key, items in group_by_key(keys).items():
        parts = min(world, len(items))
        if max_items is not None:
            parts = max(parts, -(-len(items) // max(1, max_items(key))))
        bounds = [round(len(items) * r / parts) for r in range(parts + 1)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            chunks.append(Chunk(key, items[lo:hi], lo, len(items)))
    tasks = [(cost(c.key) * len(c.items),
              outputs(c.key, len(c.items)) if world > 1 else (),
              (lambda c=c: work(c))) for c in chunks]
    return list(zip(chunks, run_sharded(tasks, shard=shard)))

# Copyright (c) mmprecond contributors. All rights reserved.
"""Collectives for preconditioner statistics.

Only what the algorithms need, and written so that every rank issues the same
collectives in the same order: callers pass every registered layer in a
fixed order, with zero tensors for layers that did not run on this rank.
"""
from typing import List

import torch
import torch.distributed as dist
from torch import Tensor

#: Bytes per all-reduce bucket.
BUCKET_BYTES = 32 << 20


def world_size() -> int:
    """Number of processes, 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_sum_(tensors: List[Tensor], bucket_bytes: int = BUCKET_BYTES) -> int:
    """Sum ``tensors`` in place across ranks, packed into flat buckets.

    Tensors of one dtype and device are concatenated into buckets of at most
    ``bucket_bytes`` (a single larger tensor gets a bucket of its own), so a
    ResNet-50 FPN needs a handful of collectives rather than hundreds.

    Returns:
        int: Number of collectives issued (0 without distributed).
    """
    if world_size() == 1 or not tensors:
        return 0
    issued = 0
    bucket: List[Tensor] = []
    size = 0

    def flush() -> None:
        nonlocal bucket, size, issued
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n
        issued += 1
        bucket, size = [], 0

    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > bucket_bytes or t.dtype != bucket[0].dtype
                       or t.device != bucket[0].device):
            flush()
        bucket.append(t)
        size += nbytes
    flush()
    return issued

# Copyright (c) mmprecond contributors. All rights reserved.
"""The 2-rank gloo half of the contract suite, for every optimizer at once.

One process group is spawned per test session; each rank runs the DDP and the
AMP x DDP cases for every registered optimizer and saves what it saw (final
parameters, the collectives it issued, loss scales, what an overflow step
changed) to ``rank<r>.pt``.  The parametrized tests read those files.  An
optimizer that raises is recorded with its error and the group carries on.
"""
import os
import traceback
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist
from contract_spec import (
    Net,
    batches,
    build,
    flat_params,
    registered,
    shard,
    state_snapshot,
    train_step,
)
from ddp_recording import CollectiveLog, join_gloo
from torch.nn.parallel import DistributedDataParallel as DDP

WORLD = 2
DDP_STEPS = 4
AMP_STEPS = 4
#: The AMP step whose loss is multiplied by inf on rank 0.
OVERFLOW_AT = 2
INIT_SCALE = 2.0**10
AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


def ddp_case(cls: type, rank: int) -> Dict[str, Any]:
    """DDP with ``aux`` idle on rank 1: final parameters and collectives."""
    model = Net(0)
    ddp = DDP(model)
    opt = build(cls, model)
    with CollectiveLog() as rec:
        for batch in batches(DDP_STEPS):
            train_step(ddp, opt, shard(batch, rank, WORLD), WORLD / len(batch[0]))
    return dict(params=flat_params(model), calls=rec.calls)


def autocast_works(dtype: torch.dtype) -> bool:
    """Whether CPU autocast runs a Linear in ``dtype`` here."""
    try:
        with torch.autocast('cpu', dtype=dtype):
            return torch.nn.Linear(2, 2)(torch.ones(1, 2)).dtype == dtype
    except (RuntimeError, AssertionError):
        return False


def scaler_alone(overflows: List[bool]) -> List[float]:
    """The scales a bare ``GradScaler`` goes through for the same overflows."""
    p = torch.zeros(1, requires_grad=True)
    sgd = torch.optim.SGD([p], lr=0.0)
    scaler = torch.amp.GradScaler('cpu', init_scale=INIT_SCALE)
    out = []
    for bad in overflows:
        sgd.zero_grad()
        loss = p.sum() + 1.0
        scaler.scale(loss * (float('inf') if bad else 1.0)).backward()
        scaler.step(sgd)
        scaler.update()
        out.append(float(scaler.get_scale()))
    return out


def amp_case(cls: type, rank: int, dtype: torch.dtype) -> Dict[str, Any]:
    """A real GradScaler on DDP: scales, and what the overflow step changed."""
    model = Net(0)
    ddp = DDP(model)
    opt = build(cls, model)
    scaler = torch.amp.GradScaler('cpu', init_scale=INIT_SCALE)
    if hasattr(opt, 'attach_grad_scaler'):
        opt.attach_grad_scaler(scaler)
    scales, changed = [], []
    for t, batch in enumerate(batches(AMP_STEPS)):
        bad = t == OVERFLOW_AT
        if bad:
            params, state = flat_params(model).clone(), state_snapshot(opt)
        train_step(ddp, opt, shard(batch, rank, WORLD), WORLD / len(batch[0]),
                   scaler=scaler, dtype=dtype, overflow=bad and rank == 0)
        scales.append(float(scaler.get_scale()))
        if bad:
            after = state_snapshot(opt)
            changed = [k for k in sorted(set(state) | set(after))
                       if k not in state or k not in after
                       or not torch.equal(state[k], after[k])]
            if not torch.equal(params, flat_params(model)):
                changed.append('params')
    expected = scaler_alone([t == OVERFLOW_AT for t in range(AMP_STEPS)])
    return dict(scales=scales, expected=expected, changed=changed,
                params=flat_params(model))


def result_path(out_dir: str, name: str, rank: int) -> str:
    """Where rank ``rank`` saves optimizer ``name``'s results."""
    return os.path.join(out_dir, f'{name}.rank{rank}.pt')


def worker(rank: int, port: int, out_dir: str, names: List[str]) -> None:
    """One rank: the optimizers ``names`` through the DDP and AMP cases.

    Each optimizer's results are saved as soon as both ranks finish it, so a
    group that gloo aborts (a collective mismatch kills the process) still
    leaves the optimizers before the culprit on disk.
    """
    join_gloo(rank, WORLD, port)
    classes = registered()
    for name in names:
        cls = classes[name]
        res: Dict[str, Any] = {}
        for case, run in [('ddp', lambda c=cls: ddp_case(c, rank))] + [
                (f'amp_{k}', lambda c=cls, d=d: amp_case(c, rank, d))
                for k, d in AMP_DTYPES.items() if autocast_works(d)]:
            try:
                res[case] = run()
            except Exception:  # noqa: BLE001 (reported by the test)
                res[case] = dict(error=traceback.format_exc(limit=6))
            dist.barrier()
        torch.save(res, result_path(out_dir, name, rank))
        dist.barrier()
    dist.destroy_process_group()


def run_all(out_dir: str, names: List[str], port: Callable[[], int]) -> Dict:
    """Every optimizer in ``names`` on 2 ranks, as few process groups as can be.

    Returns ``{name: (rank 0 results, rank 1 results)}``.  An optimizer whose
    run aborts the group gets an ``error`` for every case, and the rest run
    in a new group.
    """
    import torch.multiprocessing as mp

    out: Dict[str, Any] = {}
    todo = list(names)
    while todo:
        try:
            mp.spawn(worker, args=(port(), out_dir, todo), nprocs=WORLD,
                     join=True)
        except mp.ProcessExitedException as err:
            aborted = str(err)
        else:
            aborted = ''
        while todo and all(os.path.exists(result_path(out_dir, todo[0], r))
                           for r in range(WORLD)):
            name = todo.pop(0)
            out[name] = tuple(torch.load(result_path(out_dir, name, r),
                                         weights_only=True)
                              for r in range(WORLD))
        if todo:  # the group died in todo[0]
            if not aborted:
                raise RuntimeError(f'no results for {todo[0]}')
            error = dict(error=f'the process group died: {aborted} (gloo '
                         'aborts on a collective mismatch between ranks)')
            name = todo.pop(0)
            out[name] = tuple({c: error for c in ('ddp', 'amp_fp16',
                                                  'amp_bf16')}
                              for _ in range(WORLD))
    return out

# Copyright (c) mmprecond contributors. All rights reserved.
"""The GPU goals of the multi-GPU contract, checked in one run (< 8 min).

Three checks, one table:

1. **AMP x DDP loss scale** (``amp``): every registered mmprecond optimizer
   that takes a ``GradScaler`` trains a small CNN on 2 ranks (gloo, both
   ranks on the same GPU, CUDA tensors), fp16 autocast, with an overflow
   injected at step 3.  The scale after each ``scaler.update()`` must be the
   sequence the scaler alone produces (growth every step, halved on the
   overflow), and the overflow step must leave weights and optimizer state
   bit for bit untouched.
2. **Syncs after a resume** (``sync``): each optimizer trains 5 steps, its
   ``state_dict`` goes through ``torch.save`` / ``torch.load(map_location=
   'cuda', weights_only=True)`` into a fresh optimizer, and three whole
   iterations (plain, statistics, plain; forward and backward included) run
   under ``torch.cuda.set_sync_debug_mode('error')``; the aten-level host
   reads are counted too (:class:`mmprecond.profiling.DispatchCounter`).
   Optimizers that read the device by design (K-BFGS' second pass, SGD_PH,
   TNT's sampled labels, SMW's LM test) print their counts instead of a
   verdict.
3. **Peak memory** (``memory``): torchvision's R50-FPN Faster R-CNN at
   1333x800, batch 2, NKFAC: ``max_memory_allocated`` of a statistics
   iteration against a plain one, and the extra peak of capturing one
   2x256x200x336 input of a 3x3 256->256 conv (the issue's goal: <= 300 MiB).

Run on a GPU machine::

    python benchmarks/gpu_check.py            # all three, CUDA
    python benchmarks/gpu_check.py --device cpu --small   # a dry run here

or, on a machine with CUDA torch but no MMEngine and no package index,
``bash benchmarks/gpu_check.sh`` after ``bash benchmarks/gpu_check.sh
--fetch`` saved MMEngine's wheels into ``.whl/`` here.

``--device cpu`` runs checks 1 and 2 with bf16 autocast and the dispatch
counter only, and check 3 at 320x320 without memory numbers: it proves the
script runs, not the GPU goals.
"""
import argparse
import copy
import io
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

#: Optimizers whose step reads the device by design (their counts print).
BY_DESIGN = ('SGD_PH', 'KBFGS', 'KBFGS_L', 'TNT', 'TNT_EF', 'SMW_NG',
             'SMW_GN')
#: Statistics every step, refreshes every second step (check 1).
SHORT = dict(stat_interval=1, refresh_interval=2,
             curvature_interval=2)
#: Statistics every second step, a refresh at step 4 (check 2).
SPARSE = dict(stat_interval=2, refresh_interval=4,
              curvature_interval=4)


def registered() -> Dict[str, type]:
    """mmprecond's optimizers from MMEngine's root registry."""
    from mmengine.registry import OPTIMIZERS

    import mmprecond  # noqa: F401

    return {n: c for n, c in sorted(OPTIMIZERS.module_dict.items())
            if c.__module__.startswith('mmprecond')
            and not n.startswith('Peer')}


def keywords(cls: type) -> set:
    """Constructor keywords, following ``**kwargs`` to the parent class."""
    import inspect

    for klass in cls.__mro__:
        params = inspect.signature(klass.__init__).parameters
        if not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                   for p in params.values()):
            return set(params)
    return set(inspect.signature(cls.__init__).parameters)


def build(cls: type, model: nn.Module, intervals: dict) -> Any:
    """``cls`` with a small lr and ``intervals``, handed the model."""
    sig = keywords(cls)
    kw = {k: v for k, v in intervals.items() if k in sig}
    kw['lr'] = 1e-3 if 'betas' in sig else 1e-2
    if 'model' in sig:
        kw['model'] = model
    return cls(model.parameters(), **kw)


class SmallNet(nn.Module):
    """Conv, hidden Linear and the classifier ``head`` (TNT's logits)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc(F.relu(self.conv(x)).flatten(1))))


def data(n: int, device: str, seed: int = 1) -> List[Tuple[Any, Any]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 8, 8, generator=g).to(device),
             torch.randint(0, 10, (8, ), generator=g).to(device))
            for _ in range(n)]


def iteration(model: nn.Module, opt: Any, batch: Tuple[Any, Any],
              scaler: Any = None, dtype: Optional[torch.dtype] = None,
              overflow: bool = False) -> None:
    """One training iteration as MMEngine's loop and hooks run it."""
    x, y = batch
    device = x.device.type

    def closure() -> torch.Tensor:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            out = model(x)
        return F.cross_entropy(out.float(), y)

    opt.zero_grad()
    loss = closure()
    if overflow:
        loss = loss * float('inf')
    scaled = scaler.scale(loss) if scaler is not None else loss
    if hasattr(opt, 'prepare_hessian'):
        opt.prepare_hessian(scaled)
    scaled.backward()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    if getattr(opt, 'needs_second_pass', False):
        opt.second_pass(closure, first_loss=loss.detach())


def snapshot(model: nn.Module, opt: Any) -> List[torch.Tensor]:
    """Weights and every floating state tensor, cloned."""
    out = [p.detach().clone() for p in model.parameters()]

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            out.append(obj.detach().clone())
        elif isinstance(obj, dict):
            for k, v in obj.items():
                if 'seconds' not in str(k):
                    walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(opt.state_dict())
    return out


# ------------------------------------------------------------ 1 AMP x DDP
def _amp_worker(rank: int, world: int, port: int, device: str,
                names: List[str], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel as DDP

    dtype = torch.float16 if device == 'cuda' else torch.bfloat16
    classes = registered()
    results = {}
    for name in names:
        try:
            net = SmallNet().to(device)
            model = DDP(net)
            opt = build(classes[name], net, SHORT)
            scaler = torch.amp.GradScaler(device, init_scale=1024.,
                                          growth_interval=1)
            if hasattr(opt, 'attach_grad_scaler'):
                opt.attach_grad_scaler(scaler)
            scales, untouched = [], None
            for i, batch in enumerate(data(5, device, seed=1 + rank)):
                before = snapshot(net, opt) if i == 2 else None
                iteration(model, opt, batch, scaler, dtype, overflow=i == 2)
                if before is not None:
                    after = snapshot(net, opt)
                    untouched = len(before) == len(after) and all(
                        torch.equal(a, b) for a, b in zip(before, after))
                scales.append(float(scaler.get_scale()))
            results[name] = dict(scales=scales, untouched=untouched)
        except Exception as err:  # reported in the table, not hidden
            results[name] = dict(error=f'{type(err).__name__}: {err}'[:120])
    torch.save(results, os.path.join(out_dir, f'amp_{rank}.pt'))
    dist.destroy_process_group()


def check_amp(device: str) -> List[List[str]]:
    classes = registered()
    names = [n for n, c in classes.items() if hasattr(c, 'attach_grad_scaler')]
    expected = [2048., 4096., 2048., 4096., 8192.]  # growth 2x, overflow /2
    with tempfile.TemporaryDirectory() as out:
        import socket
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        mp.spawn(_amp_worker, args=(2, port, device, names, out), nprocs=2)
        r = [torch.load(os.path.join(out, f'amp_{k}.pt')) for k in (0, 1)]
    rows = [['amp', n, 'n/a', 'takes no GradScaler (no attach_grad_scaler)']
            for n, c in classes.items() if n not in names]
    for name in names:
        a, b = r[0][name], r[1][name]
        if 'error' in a or 'error' in b:
            rows.append(['amp', name, 'FAIL', a.get('error', b.get('error'))])
            continue
        ok = a['scales'] == expected and b['scales'] == expected \
            and a['untouched'] and b['untouched']
        rows.append(['amp', name, 'ok' if ok else 'FAIL',
                     f"scales {a['scales']}, overflow step untouched "
                     f"{a['untouched'] and b['untouched']}"])
    return rows


# ---------------------------------------------------- 2 syncs after resume
def check_sync(device: str) -> List[List[str]]:
    from mmprecond.profiling import DispatchCounter, counter_tensors

    rows = []
    for name, cls in registered().items():
        try:
            model = SmallNet().to(device)
            opt = build(cls, model, SPARSE)
            batches = data(8, device)
            for batch in batches[:5]:
                iteration(model, opt, batch)
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            buf.seek(0)
            model2 = copy.deepcopy(model)
            opt2 = build(cls, model2, SPARSE)
            opt2.load_state_dict(torch.load(buf, map_location=device,
                                            weights_only=True))
            reads, sync_error = [], ''
            for batch in batches[5:8]:  # plain, statistics, plain
                if device == 'cuda':
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode('error')
                try:
                    with DispatchCounter(counter_tensors(opt2)) as counter:
                        iteration(model2, opt2, batch)
                except RuntimeError as err:
                    sync_error = sync_error or str(err).split('\n')[0][:90]
                    counter = None
                finally:
                    if device == 'cuda':
                        torch.cuda.set_sync_debug_mode('default')
                reads.append(counter.host_reads if counter else -1)
            if name in BY_DESIGN:
                verdict = 'by design'
            else:
                verdict = 'ok' if not sync_error and reads == [0, 0, 0] \
                    else 'FAIL'
            rows.append(['sync', name, verdict,
                         f'host reads {reads} (plain, stats, plain)'
                         + (f'; {sync_error}' if sync_error else '')])
        except Exception as err:
            rows.append(['sync', name, 'FAIL',
                         f'{type(err).__name__}: {err}'[:120]])
    return rows


# -------------------------------------------------------------- 3 memory
def _peak(device: str, fn) -> float:
    """Extra peak MiB of ``fn()`` over what was allocated before it."""
    if device != 'cuda':
        fn()
        return float('nan')
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def check_memory(device: str, small: bool) -> List[List[str]]:
    rows = _r50_memory(device, small)
    if device == 'cuda':
        torch.cuda.empty_cache()
    return rows + _capture_memory(device, small)


def _r50_memory(device: str, small: bool) -> List[List[str]]:
    import torchvision

    from mmprecond.optim import NKFAC

    h, w = (160, 160) if small else (800, 1333)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, trainable_backbone_layers=5,
        min_size=h, max_size=w).to(device).train()
    opt = NKFAC(model.parameters(), model=model, lr=2e-3, weight_decay=1e-4,
                stat_interval=2, refresh_interval=10_000)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=g).to(device) for _ in range(2)]
    boxes = torch.tensor([[10., 20., 200., 220.], [50., 60., 300., 280.]])
    targets = [dict(boxes=boxes.to(device),
                    labels=torch.tensor([1, 2]).to(device))
               for _ in range(2)]

    def step() -> None:
        opt.zero_grad()
        sum(model(images, targets).values()).backward()
        opt.step()

    for _ in range(3):  # past the first statistics step and refresh
        step()
    # statistics every second step, no refresh: two of each kind; the
    # larger peaks are the statistics steps
    peaks = sorted(_peak(device, step) for _ in range(4))
    plain, stats = peaks[1], peaks[-1]
    return [['memory', f'R50-FPN {w}x{h} b2', 'info',
             f'peak extra MiB: plain {plain:.0f}, statistics {stats:.0f}'
             f' ({stats / plain:.2f}x)' if plain == plain else
             'CPU: no memory numbers']]


def _capture_memory(device: str, small: bool) -> List[List[str]]:
    from mmprecond.curvature.capture import input_rows_gram

    conv = nn.Conv2d(256, 256, 3, padding=1).to(device)
    side = (50, 84) if small else (200, 336)
    x = torch.randn(2, 256, *side, device=device)
    extra = _peak(device, lambda: input_rows_gram(conv, x))
    verdict = 'info' if extra != extra else ('ok' if extra <= 300 else 'FAIL')
    return [['memory', f'capture 2x256x{side[0]}x{side[1]} 3x3', verdict,
             f'peak extra {extra:.0f} MiB (goal <= 300)']]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', choices=('cuda', 'cpu'))
    parser.add_argument('--small', action='store_true',
                        help='320x320 images and a small capture input')
    parser.add_argument('--only', nargs='*', default=('amp', 'sync', 'memory'))
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        print('no CUDA device: run with --device cpu for a dry run')
        return 2
    table: List[List[str]] = []
    t0 = time.perf_counter()
    for check in args.only:
        t = time.perf_counter()
        if check == 'amp':
            table += check_amp(args.device)
        elif check == 'sync':
            table += check_sync(args.device)
        elif check == 'memory':
            table += check_memory(args.device, args.small)
        print(f'[{check}] {time.perf_counter() - t:.0f} s', file=sys.stderr)
    name = (torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU')
    print(f'\n{name}, torch {torch.__version__}, '
          f'{time.perf_counter() - t0:.0f} s\n')
    print('| check | what | verdict | measured |')
    print('|---|---|---|---|')
    for row in table:
        print('| ' + ' | '.join(row) + ' |')
    return int(any(r[2] == 'FAIL' for r in table))


if __name__ == '__main__':
    sys.exit(main())

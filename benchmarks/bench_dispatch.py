# Copyright (c) mmprecond contributors. All rights reserved.
"""Host reads, aten ops and wall time per ``step()``, vs torch's foreach SGD / AdamW.

Every optimizer of the package and ``torch.optim.SGD`` / ``AdamW`` with
``foreach=True`` train the same model in one run (20 ``Conv2d`` + BN layers, a
``torch.nn.MultiheadAttention`` block and a ``Linear`` head; the FSGD family
with ``precondition_convs=True`` so that every optimizer preconditions the
convs).  After warm-up past the first refresh each ``step()`` is classified
as *plain*, *statistics* or *refresh* and measured under
:class:`~mmprecond.profiling.DispatchCounter`:

* ``reads``: host reads of device values (``.item()``, ``bool(t)``, linalg
  error checks, ...), each a host-device sync on a GPU; reads of the 0-dim
  CPU step counters that torch's optimizers keep are not counted;
* ``ops``: aten ops dispatched (about the kernel launches on a GPU, plus
  views);
* ``ms``: median wall time of ``step()`` on this CPU (counted separately,
  without the dispatch mode).

Ratios are against the torch optimizer with the same base update (SGD for
NKFAC / KFAC / FSGD / AFOpt, AdamW for the others), measured in the same run.

Run::

    python benchmarks/bench_dispatch.py [--width 16] [--steps 16]
"""
import argparse
import statistics
import time
from typing import Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

STAT, INV = 2, 4

#: name -> (class name in mmprecond.optim or torch.optim, kwargs, base)
OPTIMIZERS = {
    'SGD': ('SGD', dict(lr=0.02, momentum=0.9, foreach=True), 'SGD'),
    'AdamW': ('AdamW', dict(lr=1e-3, foreach=True), 'AdamW'),
    'NKFAC': ('NKFAC', dict(lr=0.02), 'SGD'),
    'KFAC': ('KFAC', dict(lr=0.02), 'SGD'),
    'AdaNKFAC': ('AdaNKFAC', dict(lr=1e-3), 'AdamW'),
    'AdamR': ('AdamR', dict(lr=1e-3), 'AdamW'),
    'FSGD': ('FSGD', dict(lr=0.02, precondition_convs=True), 'SGD'),
    'FAdam': ('FAdam', dict(lr=1e-3, precondition_convs=True), 'AdamW'),
    'AFOpt': ('AFOpt', dict(lr=0.02, precondition_convs=True), 'SGD'),
    'Ada_AFOpt': ('Ada_AFOpt', dict(lr=1e-3, precondition_convs=True), 'AdamW'),
}


class Net(nn.Module):
    """20 conv + BN layers, self-attention over the feature map, a linear head."""

    def __init__(self, width: int, convs: int = 20) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: List[nn.Module] = []
        for i in range(convs):
            layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1),
                       nn.BatchNorm2d(width), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        t = self.features(x).flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t)[0]
        return self.fc(t.mean(1))


def build(name: str, model: nn.Module) -> torch.optim.Optimizer:
    import mmprecond.optim as ours
    cls_name, kw, _ = OPTIMIZERS[name]
    if hasattr(ours, cls_name):
        cls = getattr(ours, cls_name)
        interval = 'refresh_interval' if cls_name == 'AdamR' else 'refresh_interval'
        return cls(model.parameters(), model=model, stat_interval=STAT,
                   **{interval: INV}, **kw)
    return getattr(torch.optim, cls_name)(model.parameters(), **kw)


def phase(opt: torch.optim.Optimizer, t: int) -> str:
    if not hasattr(opt, 'layers'):
        return 'plain'
    if t % INV == 0:
        return 'refresh'
    return 'stat' if t % STAT == 0 else 'plain'


def measure(name: str, width: int, steps: int) -> Dict[str, Dict[str, float]]:
    from mmprecond.profiling import DispatchCounter, counter_tensors
    model = Net(width)
    opt = build(name, model)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 8, 8, generator=g),
                torch.randint(0, 10, (4, ), generator=g))
               for _ in range(2 * INV + 1 + steps)]
    rows: Dict[str, Dict[str, list]] = {}
    for t, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if t <= 2 * INV:  # warm-up: past the first refresh of every optimizer
            opt.step()
            continue
        kind = phase(opt, t)
        row = rows.setdefault(kind, dict(reads=[], ops=[], ms=[]))
        if (t // INV) % 2:  # alternate whole cycles: counted / timed
            with DispatchCounter(counter_tensors(opt)) as counter:
                opt.step()
            row['reads'].append(counter.host_reads)
            row['ops'].append(counter.ops)
        else:
            t0 = time.perf_counter()
            opt.step()
            row['ms'].append(1e3 * (time.perf_counter() - t0))
    out = {}
    for kind, row in rows.items():
        out[kind] = {k: statistics.median(v) if v else float('nan')
                     for k, v in row.items()}
    out['layers'] = dict(n=len(getattr(opt, 'layers', {})) +
                         len(getattr(opt, 'attention', {})))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--width', type=int, default=16)
    parser.add_argument('--steps', type=int, default=24)
    parser.add_argument('--optimizers', nargs='+', default=list(OPTIMIZERS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    names = [n for n in OPTIMIZERS if n in args.optimizers or n in ('SGD', 'AdamW')]
    res = {n: measure(n, args.width, args.steps) for n in names}
    print(f'model: 20 conv+BN, MHA, linear (width {args.width}); '
          f'T_stat={STAT}, T_inv={INV}; torch {torch.__version__}, 1 thread; '
          'ratio = ours / torch foreach base in the same run')
    head = (f"{'optimizer':<10} {'base':<6} {'layers':>6} | {'reads p/s/r':>13} | "
            f"{'ops plain':>9} {'stat':>6} {'refresh':>7} | {'ops x base p/s':>14} | "
            f"{'ms plain':>8} {'stat':>7} {'refresh':>8} | {'time x base p/s':>15}")
    print(head)
    print('-' * len(head))
    for name in names:
        r = res[name]
        base = res[OPTIMIZERS[name][2]]['plain']

        def get(kind, key, scale=1.0, fmt='.0f', r=r):
            value = r.get(kind, {}).get(key, float('nan')) / scale
            return '-' if value != value else format(value, fmt)

        reads = '/'.join(get(k, 'reads') for k in ('plain', 'stat', 'refresh'))
        ops_x = '/'.join(get(k, 'ops', base['ops'], '.2f') for k in ('plain', 'stat'))
        ms_x = '/'.join(get(k, 'ms', base['ms'], '.2f') for k in ('plain', 'stat'))
        print(f"{name:<10} {OPTIMIZERS[name][2]:<6} {r['layers']['n']:>6} | "
              f"{reads:>13} | {get('plain', 'ops'):>9} {get('stat', 'ops'):>6} "
              f"{get('refresh', 'ops'):>7} | {ops_x:>14} | "
              f"{get('plain', 'ms', fmt='.2f'):>8} {get('stat', 'ms', fmt='.2f'):>7} "
              f"{get('refresh', 'ms', fmt='.2f'):>8} | {ms_x:>15}")

if __name__ == '__main__':
    main()

# Copyright (c) mmprecond contributors. All rights reserved.
"""Plot MMEngine ``vis_data/scalars.json`` logs of any runs side by side.

Every MMEngine run (mmdet, mmpretrain, ...) writes
``<work_dir>/<timestamp>/vis_data/scalars.json``: one JSON object per line,
training lines (``loss``, ``lr``, ``time``, ``precond/...`` from
:class:`~mmprecond.engine.PrecondStatsHook`, keyed by ``step`` = iteration)
and validation lines (``coco/bbox_mAP``, ``accuracy/top1``, ...; their
``time`` / ``data_time`` are read as ``val/time`` / ``val/data_time``).
MMEngine writes a validation line's ``step`` as the epoch (``0`` throughout
an iteration-based run); this tool puts it at the training iteration it was
computed at instead (epochs times iterations per epoch for epoch-based
runs).  A run that did not log a requested key is named on the console.  Give this
tool the work dirs (or the files) of the runs to compare; a run resumed into
the same work dir is stitched together from its timestamp folders.

Examples::

    # training loss of two COCO runs against the iteration
    python tools/analysis_tools/plot_scalars.py \\
        work_dirs/faster-rcnn_r50_fpn_sgd-1x_coco \\
        work_dirs/faster-rcnn_r50_fpn_nkfac-1x_coco --keys loss --out loss.png
    # against wall-clock time, with the validation AP in a second panel
    python tools/analysis_tools/plot_scalars.py RUN_A RUN_B \\
        --keys loss coco/bbox_mAP --x time --legend SGD NKFAC --out cmp.png

MMDetection's own ``tools/analysis_tools/analyze_logs.py plot_curve`` reads
the same ``scalars.json`` files (``--keys loss_cls bbox_mAP``).
"""
import argparse
import glob
import json
import os.path as osp
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use('Agg')  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

#: A run's scalars: ``{key: {step: value}}``.
Scalars = Dict[str, Dict[int, float]]


def scalar_files(path: str) -> List[str]:
    """The ``scalars.json`` files of a run, oldest first.

    ``path`` is a ``scalars.json`` file, a ``<timestamp>`` folder or a work
    dir (all its timestamp folders: a resumed run writes a new one).
    """
    if osp.isfile(path):
        return [path]
    files = sorted(glob.glob(osp.join(path, 'vis_data', 'scalars.json')))
    files += sorted(glob.glob(osp.join(path, '*', 'vis_data', 'scalars.json')))
    if not files:
        raise FileNotFoundError(f'no vis_data/scalars.json under {path}')
    return files


def _records(path: str) -> List[dict]:
    """Every line of a run's ``scalars.json`` files, in the order written."""
    out = []
    for file in scalar_files(path):
        with open(file) as f:
            out += [json.loads(line) for line in f if line.strip()]
    return out


def iters_per_epoch(train: Sequence[dict]) -> Optional[int]:
    """Iterations per epoch of an epoch-based run (``None``: iteration-based).

    An epoch-based run logs ``epoch`` (1-based, the current one) and ``iter``
    (global) on each training line; ``iter <= epoch * n`` for each, so the
    largest ``ceil(iter / epoch)`` is ``n`` once any epoch's last logging
    window closed at its end, and at most one logging interval short of it
    otherwise.
    """
    pairs = [(int(r['epoch']), int(r.get('iter', r.get('step', 0))))
             for r in train if r.get('epoch')]
    if not pairs:
        return None
    return max(-(-it // ep) for ep, it in pairs)


def validation_iter(record: dict, previous_iter: int,
                    per_epoch: Optional[int], epochs: int = 0) -> int:
    """The training iteration at which a validation line was computed.

    MMEngine's ``LoggerHook`` writes validation metrics with ``step`` = the
    epoch by default (``log_metric_by_epoch=True``), which is ``0`` in an
    iteration-based run, and with ``step`` = the iteration otherwise.  In
    that order of preference:

    * an ``iter`` field on the line;
    * for epoch-based runs (``epochs`` logged so far), ``step`` epochs
      times the iterations per epoch (not before the preceding training
      line); a ``step`` beyond the epochs logged is an iteration already;
    * for iteration-based runs, ``step`` if it is an iteration (not before
      the preceding training line), else the preceding training line's
      iteration.
    """
    if 'iter' in record:
        return int(record['iter'])
    step = int(record.get('step', 0))
    if per_epoch is not None and step <= max(epochs, 1):
        return max(step * per_epoch, previous_iter)
    return step if step >= previous_iter > 0 else previous_iter


def load_scalars(path: str) -> Scalars:
    """Every scalar of a run, by key and training iteration (later files win).

    Validation metrics are placed at the iteration they were computed (see
    :func:`validation_iter`), so they share the x axis with the losses.
    """
    records = _records(path)
    train = [r for r in records if 'lr' in r]
    per_epoch = iters_per_epoch(train)
    out: Scalars = {}
    previous = epochs = 0
    for record in records:
        record = dict(record)
        if 'lr' in record:  # training line: step is the iteration
            step = int(record.pop('step', record.get('iter', 0)))
            previous = step
            epochs = max(epochs, int(record.get('epoch', 0)))
        else:  # validation: its own time keys, at its iteration
            step = validation_iter(record, previous, per_epoch, epochs)
            record.pop('step', None)
            record = {k if '/' in k else f'val/{k}': v
                      for k, v in record.items()}
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.setdefault(key, {})[step] = float(value)
    return out


def missing_keys(runs: Sequence[Scalars], labels: Sequence[str],
                 keys: Sequence[str]) -> Dict[str, List[str]]:
    """``{run label: [requested keys it did not log]}`` for runs lacking any."""
    out = {}
    for scalars, label in zip(runs, labels):
        lacking = [k for k in keys if not scalars.get(k)]
        if lacking:
            out[label] = lacking
    return out


def series(scalars: Scalars, key: str) -> List[tuple]:
    """``[(step, value), ...]`` of ``key``, sorted by step."""
    return sorted(scalars.get(key, {}).items())


def elapsed_seconds(scalars: Scalars) -> Dict[int, float]:
    """Training wall time (s) at each logged step.

    MMEngine logs ``time``, the mean iteration time over the logging
    window; integrating it over the steps gives the elapsed training time,
    also across a resume (validation and checkpointing are not counted).
    """
    out, total, last = {}, 0.0, 0
    for step, t in series(scalars, 'time'):
        total += t * (step - last)
        out[step] = total
        last = step
    return out


def plot(runs: Sequence[Scalars],
         labels: Sequence[str],
         keys: Sequence[str],
         out: str,
         x: str = 'iter',
         title: Optional[str] = None) -> None:
    """One panel per key, one line per run; saved as ``out`` (PNG)."""
    fig, axes = plt.subplots(
        1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for scalars, label in zip(runs, labels):
            points = series(scalars, key)
            if not points:
                continue
            if x == 'time':
                clock = elapsed_seconds(scalars)
                points = [(clock[s], v) for s, v in points if s in clock]
            xs, ys = zip(*points) if points else ((), ())
            ax.plot(xs, ys, marker='o' if len(xs) < 3 else None, label=label)
        ax.set_xlabel('training seconds' if x == 'time' else 'iteration')
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        'runs', nargs='+', help='work dirs, timestamp folders or '
        'scalars.json files')
    parser.add_argument(
        '--keys', nargs='+', default=['loss'],
        help='scalars to plot, one panel each (default: loss)')
    parser.add_argument(
        '--x', choices=['iter', 'time'], default='iter',
        help='x axis: iteration or training wall time')
    parser.add_argument('--legend', nargs='+', help='one label per run')
    parser.add_argument('--title', help='figure title')
    parser.add_argument('--out', default='scalars.png', help='output PNG')
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> None:
    args = parse_args(argv)
    labels = args.legend or [osp.basename(osp.normpath(r)) for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit('--legend needs one label per run')
    runs = [load_scalars(r) for r in args.runs]
    missing = [k for k in args.keys if not any(k in r for r in runs)]
    if missing:
        known = sorted({k for r in runs for k in r})
        raise SystemExit(f'no run logged {missing}; logged keys: {known}')
    for label, lacking in missing_keys(runs, labels, args.keys).items():
        print(f'{label}: no {", ".join(lacking)} logged; its line is missing '
              f'from the panel(s) {", ".join(lacking)}')
    plot(runs, labels, args.keys, args.out, args.x, args.title)
    print(f'saved {args.out}')


if __name__ == '__main__':
    main()

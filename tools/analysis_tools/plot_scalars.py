# Copyright (c) mmprecond contributors. All rights reserved.
"""Plot MMEngine ``vis_data/scalars.json`` logs of any runs side by side.

Every MMEngine run (mmdet, mmpretrain, ...) writes
``<work_dir>/<timestamp>/vis_data/scalars.json``: one JSON object per line,
training lines (``loss``, ``lr``, ``time``, ``precond/...`` from
:class:`~mmprecond.engine.PrecondStatsHook`, keyed by ``step`` = iteration)
and validation lines (``coco/bbox_mAP``, ``accuracy/top1``, ...; their
``time`` / ``data_time`` are read as ``val/time`` / ``val/data_time``).  Give this
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


def load_scalars(path: str) -> Scalars:
    """Every scalar of a run, by key and step (later files win)."""
    out: Scalars = {}
    for file in scalar_files(path):
        with open(file) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                record = json.loads(line)
                step = int(record.pop('step', record.get('iter', 0)))
                if 'lr' not in record:  # validation: its own time keys
                    record = {k if '/' in k else f'val/{k}': v
                              for k, v in record.items()}
                for key, value in record.items():
                    if isinstance(value, (int, float)):
                        out.setdefault(key, {})[step] = float(value)
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
    plot(runs, labels, args.keys, args.out, args.x, args.title)
    print(f'saved {args.out}')


if __name__ == '__main__':
    main()

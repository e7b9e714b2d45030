# Copyright (c) mmprecond contributors. All rights reserved.
"""Train one model with several optimizers and seeds; plot and tabulate.

Every optimizer setting is trained with the same seeds, hence the same
initial weights and data order, for the same number of iterations (or
epochs), through ``tools/train.py`` (one process per run).  The tool then
reads each run's ``vis_data/scalars.json`` (``PrecondStatsHook`` is added
to every run, so the optimizer's time per phase and state memory are there
too) and writes, into ``--out-dir``:

* ``loss_vs_iter.png``, ``loss_vs_time.png``: training loss (mean over
  seeds, band = min..max) against the iteration and the training seconds;
* ``metric_vs_iter.png``, ``metric_vs_time.png``: validation bbox AP /
  mask AP / top-1 (``--val-points K``: K validations per run) against the
  iteration and the training seconds;
* ``phase_seconds.png``: seconds per iteration in forward + backward,
  statistics, refresh, precondition and the base step;
* ``state_memory.png``: optimizer-state memory;
* ``results.md``: mean ± std over seeds, iterations and seconds to reach
  the reference optimizer's final loss (losses are means over the last 10 %
  of the iterations, ``--loss-window``), time per iteration relative to it;
  ``summary.json``: every run's numbers.

An optimizer setting is one of::

    NAME=CONFIG.py                 # take CONFIG's optim_wrapper (zoo config)
    CONFIG.py                      # the same, named after the file
    'NAME:key=value;key=value'     # --cfg-options fragments for this setting

Equal wall-clock instead of equal iterations (``--time-budget SECONDS``
or ``--match-time REF``): every setting's s / iter is calibrated in a short
run (``--calibrate-iters``), its length set to what fills the budget and
its schedule stretched to it; ``results.md`` then adds the metric at equal
time and the seconds to reach the reference's final metric (see
``docs/benchmarks.md``, "Equal wall-clock").

Finished runs are skipped when the tool is started again and interrupted
ones resume from their last checkpoint, so it can be stopped at any time;
``--report-only`` tabulates the finished runs without training.

Examples::

    # the demo detector, 3 seeds, 300 iterations, synthetic data
    python tools/analysis_tools/compare_optimizers.py \\
        configs/demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py \\
        --optimizers adamw: \\
            'sgd:optim_wrapper.optimizer.type=SGD;optim_wrapper.optimizer.lr=0.02' \\
            adankfac=configs/demo/faster-rcnn_r18-tiny_fpn_adankfac_synthetic.py \\
        --seeds 0 1 2 --max-iters 300 --work-dir work_dirs/compare

    # the same two at equal wall-clock: AdamW's seconds for 300 iterations
    python tools/analysis_tools/compare_optimizers.py \\
        configs/demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py \\
        --optimizers adamw: \\
            adankfac=configs/demo/faster-rcnn_r18-tiny_fpn_adankfac_synthetic.py \\
        --seeds 0 1 2 --max-iters 300 --match-time adamw --val-points 5 \\
        --work-dir work_dirs/compare_time

    # a zoo config on real COCO (data/coco) with two zoo optimizers
    python tools/analysis_tools/compare_optimizers.py \\
        configs/baselines/faster-rcnn_r50_fpn_sgd-1x_coco.py \\
        --optimizers sgd: nkfac=configs/nkfac/faster-rcnn_r50_fpn_nkfac-1x_coco.py \\
        --seeds 0 --data-root data/coco
"""
import argparse
import json
import math
import os
import os.path as osp
import re
import shutil
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from mmengine.config import Config, DictAction
from mmengine.utils import ProgressBar

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from plot_scalars import (  # noqa: E402
    Scalars,
    elapsed_seconds,
    load_scalars,
    plt,
    series,
)

TOOLS_DIR = osp.dirname(osp.dirname(osp.abspath(__file__)))
#: Validation metrics looked for, in this order.
METRIC_KEYS = ('coco/bbox_mAP', 'coco/segm_mAP', 'accuracy/top1')
#: Per-iteration phases logged by PrecondStatsHook, in step order.
PHASES = ('fwd_bwd', 'statistics', 'refresh', 'precondition', 'base')
PHASE_LABELS = dict(fwd_bwd='forward + backward', statistics='statistics',
                    refresh='refresh', precondition='precondition',
                    base='base step')
TIMESTAMP_DIR = re.compile(r'^\d{8}_\d{6}$')


# ------------------------------------------------------------------ settings
def parse_setting(text: str) -> Tuple[str, Dict[str, Any]]:
    """``(name, how)`` of one ``--optimizers`` item (see the module doc)."""
    if ':' in text and not text.endswith('.py'):
        name, _, fragments = text.partition(':')
        action = DictAction(option_strings=[], dest='x')
        namespace = argparse.Namespace()
        parts = [f for f in fragments.split(';') if f.strip()]
        if parts:
            action(None, namespace, parts)
        return name, dict(options=getattr(namespace, 'x', {}) or {})
    name, _, path = text.rpartition('=')
    if not name:
        name = osp.splitext(osp.basename(path))[0]
    if not osp.isfile(path):
        raise SystemExit(f'{text!r}: no config file {path!r}')
    return name, dict(config=path)


def set_data_root(cfg: Config, root: str) -> None:
    """Point every loader (and COCO evaluator) of ``cfg`` at ``root``."""
    root = root.rstrip('/') + '/'
    for split in ('train', 'val', 'test'):
        loader = cfg.get(f'{split}_dataloader')
        if not loader:
            continue
        dataset = loader['dataset']
        while 'dataset' in dataset:  # RepeatDataset / ClassBalancedDataset
            dataset = dataset['dataset']
        dataset['data_root'] = root
        evaluators = cfg.get(f'{split}_evaluator')
        if split == 'train' or not evaluators:
            continue
        for ev in evaluators if isinstance(evaluators, list) else [evaluators]:
            if 'ann_file' in ev:
                ann = dataset.get('ann_file', '')
                ev['ann_file'] = root + ann
    cfg['data_root'] = root


def scale_schedulers(cfg: Config, by_epoch: bool, factor: float) -> None:
    """Stretch the schedulers counted in the loop's unit by ``factor``.

    ``begin`` / ``end`` / ``T_max`` / ``milestones`` of every scheduler whose
    ``by_epoch`` matches the loop's are multiplied by ``factor`` (rounded;
    ``end`` and ``T_max`` at least 1), so warm-up, steps and decay keep
    their share of the run; an open ``end`` (beyond 100x the run) stays.
    """
    schedulers = cfg.get('param_scheduler') or []
    for sch in schedulers if isinstance(schedulers, list) else [schedulers]:
        if bool(sch.get('by_epoch', True)) != by_epoch:
            continue
        for key in ('begin', 'end', 'T_max'):
            if key in sch and not (key == 'end' and sch[key] > 1e6):
                sch[key] = max(1 if key != 'begin' else 0,
                               round(sch[key] * factor))
        if 'milestones' in sch:
            sch['milestones'] = [max(1, round(m * factor))
                                 for m in sch['milestones']]


def scale_iteration_schedule(cfg: Config, max_iters: int) -> None:
    """Set an iteration-based run's length and stretch its LR schedule.

    Iteration-based schedulers' ``begin`` / ``end`` / ``T_max`` /
    ``milestones`` are scaled by ``max_iters / old max_iters``, so warm-up
    and decay keep their share of the run.
    """
    old = cfg.train_cfg.get('max_iters')
    if old is None:
        raise SystemExit('--max-iters needs an IterBasedTrainLoop config; '
                         'use --max-epochs for epoch-based ones')
    cfg.train_cfg.max_iters = max_iters
    scale_schedulers(cfg, False, max_iters / old)


def set_length(cfg: Config, length: int) -> None:
    """Set a run's length (iterations or epochs, the loop's unit) and
    stretch the schedulers counted in that unit to it."""
    by_epoch = 'max_epochs' in cfg.train_cfg
    key = 'max_epochs' if by_epoch else 'max_iters'
    old = cfg.train_cfg[key]
    cfg.train_cfg[key] = length
    scale_schedulers(cfg, by_epoch, length / old)


def build_config(args: argparse.Namespace, name: str,
                 how: Dict[str, Any], length: Optional[int] = None,
                 budget_s: Optional[float] = None) -> Config:
    """The config of setting ``name`` (seeds are set per run).

    ``length``: the run's iterations (epochs for an epoch-based config),
    its schedule stretched to it (the time-matched plan).  ``budget_s``:
    the training seconds after which a :class:`~mmprecond.engine.TimeBudgetHook`
    ends an iteration-based run (checked at the logged steps).
    """
    cfg = Config.fromfile(args.config)
    if 'config' in how:
        other = Config.fromfile(how['config'])
        cfg.optim_wrapper = other.optim_wrapper
        imports = set(cfg.get('custom_imports', {}).get('imports', []))
        imports |= set(other.get('custom_imports', {}).get('imports', []))
        cfg.custom_imports = dict(imports=sorted(imports | {'mmprecond'}),
                                  allow_failed_imports=False)
    else:
        cfg.merge_from_dict(how['options'])
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.data_root:
        set_data_root(cfg, args.data_root)
    by_epoch = 'max_epochs' in cfg.train_cfg
    if args.max_iters:
        scale_iteration_schedule(cfg, args.max_iters)
    if args.max_epochs:
        cfg.train_cfg.max_epochs = args.max_epochs
    if length is not None:
        set_length(cfg, length)
    length = cfg.train_cfg.get('max_epochs' if by_epoch else 'max_iters')
    logger = cfg.default_hooks.logger
    if args.log_interval:
        logger.interval = args.log_interval
    if args.val_interval:
        cfg.train_cfg.val_interval = args.val_interval
    elif args.val_points > 1:
        # every run validated at the same fractions of its length; for
        # iteration-based runs at logged iterations (their training clock)
        unit = 1 if by_epoch else logger.interval
        cfg.train_cfg.val_interval = max(
            unit, round(length / args.val_points / unit) * unit)
    else:
        cfg.train_cfg.val_interval = length
    logger.log_metric_by_epoch = False  # validation keyed by iteration
    # logged loss and time: means over the logging interval
    cfg.log_processor = dict(cfg.get('log_processor', {}),
                             window_size=logger.interval)
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', by_epoch=by_epoch,
        interval=args.checkpoint_interval or length, max_keep_ckpts=1)
    hooks = [h for h in cfg.get('custom_hooks', [])
             if h.get('type') != 'PrecondStatsHook']
    cfg.custom_hooks = hooks + [
        dict(type='PrecondStatsHook', interval=logger.interval)
    ]
    if budget_s is not None and not by_epoch:
        cfg.custom_hooks = [h for h in cfg.custom_hooks
                            if h.get('type') != 'TimeBudgetHook'] + [
            dict(type='TimeBudgetHook', budget_s=budget_s,
                 interval=logger.interval)]
    imports = cfg.get('custom_imports', {}).get('imports', [])
    if 'mmprecond' not in imports:
        cfg.custom_imports = dict(imports=list(imports) + ['mmprecond'],
                                  allow_failed_imports=False)
    return cfg


def ensure_data(cfg: Config, args: argparse.Namespace) -> None:
    """Generate the built-in synthetic data when a run needs it."""
    root = cfg.train_dataloader.dataset.get('data_root', '')
    if 'synthetic' not in root or osp.isdir(root):
        return
    from mmprecond.datasets import ensure_synthetic_cls, ensure_synthetic_coco
    sizes = dict(num_train=args.num_train, num_val=args.num_val)
    sizes = {k: v for k, v in sizes.items() if v}
    if cfg.get('default_scope') == 'mmpretrain':
        ensure_synthetic_cls(root, **sizes)
    else:
        ensure_synthetic_coco(root, **sizes)


# ---------------------------------------------------------------------- runs
def run_one(cfg_path: str, run_dir: str, seed: int,
            log_file: str) -> int:
    """Train (or resume) one run in a subprocess; return its exit code."""
    cmd = [sys.executable, osp.join(TOOLS_DIR, 'train.py'), cfg_path,
           '--work-dir', run_dir, '--cfg-options', f'randomness.seed={seed}']
    if osp.isfile(osp.join(run_dir, 'last_checkpoint')):
        cmd.append('--resume')  # interrupted: continue from the checkpoint
    elif osp.isdir(run_dir):  # interrupted before any checkpoint: restart
        for entry in os.listdir(run_dir):
            if TIMESTAMP_DIR.match(entry):
                shutil.rmtree(osp.join(run_dir, entry))
    os.makedirs(run_dir, exist_ok=True)
    with open(log_file, 'a') as out:
        return subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)


def clock_rate(scalars: Scalars) -> Tuple[Optional[float], float, int]:
    """``(s / iter, start-up seconds, iterations)`` of a run's training clock.

    The first logging interval holds the one-off costs (the first forward,
    lazily built state, the first exact refresh); the rate is measured over
    the intervals after it and the start-up is what the first interval took
    beyond that rate.
    """
    clock = elapsed_seconds(scalars)
    steps = sorted(clock)
    if len(steps) < 2:
        return None, 0.0, steps[-1] if steps else 0
    first, last = steps[0], steps[-1]
    rate = (clock[last] - clock[first]) / (last - first)
    return rate, max(0.0, clock[first] - first * rate), last


def calibrate(args: argparse.Namespace,
              settings: List[Tuple[str, Dict[str, Any]]]) -> Dict[str, Any]:
    """Measure every setting's s / iter in a short run (first seed).

    ``--calibrate-iters`` iterations (one epoch for an epoch-based config),
    no validation, under ``<work-dir>/_calibration/<name>``; the results are
    kept in ``<work-dir>/calibration.json`` and reused when the tool is run
    again (delete the file to measure again).
    """
    path = osp.join(args.work_dir, 'calibration.json')
    known: Dict[str, Any] = {}
    if osp.isfile(path):
        with open(path) as f:
            known = json.load(f)
    for name, how in settings:
        if name in known:
            continue
        if args.report_only:
            raise SystemExit(f'--report-only: no calibration of {name!r} '
                             f'in {path}')
        cfg = build_config(args, name, how)
        by_epoch = 'max_epochs' in cfg.train_cfg
        n = 1 if by_epoch else args.calibrate_iters
        cfg.train_cfg['max_epochs' if by_epoch else 'max_iters'] = n
        cfg.train_cfg.val_interval = n + 1  # time training only
        interval = max(1, min(cfg.default_hooks.logger.interval, n // 5))
        cfg.default_hooks.logger.interval = interval
        cfg.log_processor = dict(cfg.log_processor, window_size=interval)
        cfg.default_hooks.checkpoint.interval = n
        run_dir = osp.join(args.work_dir, '_calibration', name)
        if osp.isdir(run_dir):
            shutil.rmtree(run_dir)
        os.makedirs(run_dir)
        cfg_path = osp.join(run_dir, 'config.py')
        cfg.dump(cfg_path)
        print(f'calibrating {name}: {n} {"epoch" if by_epoch else "iters"}')
        code = run_one(cfg_path, run_dir, args.seeds[0],
                       osp.join(run_dir, 'train.out'))
        if code != 0:
            raise SystemExit(f'calibration of {name} failed (exit {code}, '
                             f'see {run_dir}/train.out)')
        rate, startup, iters = clock_rate(load_scalars(run_dir))
        if rate is None:
            raise SystemExit(f'calibration of {name}: fewer than 2 logged '
                             'intervals; raise --calibrate-iters')
        known[name] = dict(s_per_iter=rate, startup_s=startup,
                           iters=iters, iters_per_epoch=iters // n
                           if by_epoch else None)
        with open(path, 'w') as f:
            json.dump(known, f, indent=1)
    return known


def time_plan(args: argparse.Namespace,
              settings: List[Tuple[str, Dict[str, Any]]]) -> Dict[str, Any]:
    """Every setting's length for an equal training wall-clock budget.

    The budget is ``--time-budget`` seconds, or (``--match-time REF``) what
    REF's calibrated rate gives for the run's length (``--max-iters`` /
    ``--max-epochs`` / the config's).  A setting is planned ``(budget -
    start-up) / (s / iter) * --overshoot`` iterations, rounded to whole
    logging intervals (whole epochs for epoch-based configs), at least one;
    in the runs a :class:`~mmprecond.engine.TimeBudgetHook` ends each
    iteration-based run when its training seconds reach the budget, so the
    plan is an upper bound and a slower machine than at calibration cuts
    the run short of its schedule's tail instead of running over.  The
    reference of ``--match-time`` keeps its own length (no overshoot).
    """
    calib = calibrate(args, settings)
    hows = dict(settings)
    base = {n: build_config(args, n, how) for n, how in settings}
    if args.match_time:
        ref = args.match_time
        if ref not in hows:
            raise SystemExit(f'--match-time {ref!r} is not among '
                             f'{list(hows)}')
        cfg = base[ref]
        by_epoch = 'max_epochs' in cfg.train_cfg
        iters = cfg.train_cfg.max_epochs * calib[ref]['iters_per_epoch'] \
            if by_epoch else cfg.train_cfg.max_iters
        budget = calib[ref]['startup_s'] + iters * calib[ref]['s_per_iter']
    else:
        budget = args.time_budget
    plan: Dict[str, Any] = dict(budget_s=budget, overshoot=args.overshoot,
                                settings={})
    for name, _ in settings:
        cfg, c = base[name], calib[name]
        iters = max(0.0, budget - c['startup_s']) / c['s_per_iter'] \
            * args.overshoot
        if 'max_epochs' in cfg.train_cfg:
            length = max(1, round(iters / c['iters_per_epoch']))
            unit = 'epochs'
        else:
            step = cfg.default_hooks.logger.interval
            length = max(step, round(iters / step) * step)
            unit = 'iters'
        if name == args.match_time:  # the reference keeps its own length
            length = cfg.train_cfg.get('max_' + unit)
        plan['settings'][name] = dict(c, length=length, unit=unit)
    with open(osp.join(args.work_dir, 'time_plan.json'), 'w') as f:
        json.dump(plan, f, indent=1)
    print(f'time budget {budget:.1f} s: ' + ', '.join(
        f"{n} {p['length']} {p['unit']} ({p['s_per_iter']:.3f} s/iter)"
        for n, p in plan['settings'].items()))
    return plan


def run_all(args: argparse.Namespace,
            settings: List[Tuple[str, Dict[str, Any]]],
            plan: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train every (setting, seed) that is not finished yet.

    ``plan``: the time-matched lengths (:func:`time_plan`).
    """
    runs = {}
    todo = []
    cfg_paths = {}
    for name, how in settings:
        length = plan['settings'][name]['length'] if plan else None
        cfg = build_config(args, name, how, length,
                           plan['budget_s'] if plan else None)
        ensure_data(cfg, args)
        setting_dir = osp.join(args.work_dir, name)
        os.makedirs(setting_dir, exist_ok=True)
        cfg_paths[name] = osp.join(setting_dir, 'config.py')
        cfg.dump(cfg_paths[name])
    # seed by seed, so that a stopped comparison has every setting at the
    # same number of seeds
    for seed in args.seeds:
        for name, _ in settings:
            run_dir = osp.join(args.work_dir, name, f'seed{seed}')
            runs[(name, seed)] = run_dir
            if not osp.isfile(osp.join(run_dir, 'done.json')):
                todo.append((name, seed, cfg_paths[name], run_dir))
    print(f'{len(runs)} runs, {len(runs) - len(todo)} already finished')
    if args.report_only:
        return runs
    bar = ProgressBar(len(todo)) if todo else None
    failed = []
    for name, seed, cfg_path, run_dir in todo:
        code = run_one(cfg_path, run_dir, seed,
                       osp.join(osp.dirname(run_dir), f'seed{seed}.out'))
        if code == 0:
            with open(osp.join(run_dir, 'done.json'), 'w') as f:
                json.dump(dict(name=name, seed=seed), f)
        else:
            failed.append(f'{name} seed {seed} (exit {code}, see '
                          f'{osp.dirname(run_dir)}/seed{seed}.out)')
        bar.update()
    if bar is not None:
        print()
    for line in failed:
        print(f'FAILED: {line}')
    return runs


# ------------------------------------------------------------------- numbers
def weighted_mean(scalars: Scalars, key: str) -> Optional[float]:
    """Mean of a per-interval scalar, weighted by the interval lengths."""
    total, steps, last = 0.0, 0, 0
    for step, value in series(scalars, key):
        total += value * (step - last)
        steps += step - last
        last = step
    return total / steps if steps else None


def metric_key(scalars: Scalars, wanted: Optional[str]) -> Optional[str]:
    if wanted:
        return wanted if wanted in scalars else None
    return next((k for k in METRIC_KEYS if k in scalars), None)


def trailing_mean(curve: Sequence[Tuple[float, float]], end: float,
                  window: float) -> Optional[float]:
    """Mean training loss over the iterations ``(end - window, end]``.

    ``curve`` holds ``(iteration, mean loss of the iterations since the
    previous entry)``, as MMEngine logs it; each entry is weighted by the
    length of its interval inside the window.  ``None`` before a full window
    has been logged.
    """
    if end < window:
        return None
    total, weight, last = 0.0, 0.0, 0.0
    for step, value in curve:
        if step > end:
            break
        overlap = step - max(last, end - window)
        if overlap > 0:
            total += value * overlap
            weight += overlap
        last = step
    return total / weight if weight else None


def summarise_run(scalars: Scalars, metric: Optional[str],
                  loss_window: float = 0.1) -> Dict[str, Any]:
    """The numbers of one run, all read from its ``scalars.json``.

    ``final_loss`` is the mean training loss over the last ``loss_window``
    of the run's iterations (at least one logging interval): a single
    logged value of a detector's loss is too noisy to rank optimizers by.
    """
    loss = series(scalars, 'loss')
    clock = elapsed_seconds(scalars)
    last_step = loss[-1][0] if loss else 0
    first_interval = loss[0][0] if loss else 0
    window = max(first_interval, round(loss_window * last_step))
    out = dict(
        final_loss=trailing_mean(loss, last_step, window) if loss else None,
        loss_window=window,
        iters=last_step,
        seconds=clock.get(last_step),
        s_per_iter=clock[last_step] / last_step if last_step in clock else None,
        state_mb=(series(scalars, 'precond/state_mb') or [(0, None)])[-1][1],
        factor_mb=(series(scalars, 'precond/factor_mb') or [(0, None)])[-1][1],
        phases={p: weighted_mean(scalars, f'precond/{p}_s') for p in PHASES},
        loss_curve=loss,
        clock=clock)
    if out['phases']['base'] is None:  # first-order: the whole step
        out['phases']['base'] = weighted_mean(scalars, 'precond/step_s')
    key = metric_key(scalars, metric)
    out['metric_curve'] = series(scalars, key) if key else []
    out['final_metric'] = out['metric_curve'][-1][1] if key else None
    out['metric_time_curve'] = [(clock_at(clock, step), value)
                                for step, value in out['metric_curve']]
    return out


def clock_at(clock: Dict[int, float], step: float) -> Optional[float]:
    """Training seconds at ``step``, linear between the logged steps."""
    last_step, last_time = 0, 0.0
    for s, t in sorted(clock.items()):
        if s >= step:
            return last_time + (t - last_time) * (step - last_step) / (
                s - last_step)
        last_step, last_time = s, t
    return None


def metric_at_time(run: Dict[str, Any], seconds: float,
                   tolerance: float = 0.1) -> Optional[float]:
    """A run's validation metric at ``seconds`` of training.

    Linear between the validation points (in training seconds); a run whose
    last validation came before ``seconds`` but within ``tolerance`` of it
    (a time-matched run stops within its budget's error) gives that last
    value; ``None`` before the first validation or after a shorter run.
    """
    points = [(t, v) for t, v in run['metric_time_curve'] if t is not None]
    if not points or seconds < points[0][0]:
        return None
    for (t0, v0), (t1, v1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return v0 + (v1 - v0) * (seconds - t0) / (t1 - t0)
    t, v = points[-1]
    return v if seconds <= t * (1 + tolerance) else None


def seconds_to_metric(run: Dict[str, Any],
                      target: float) -> Optional[float]:
    """Training seconds at the first validation whose metric reaches
    ``target`` (higher is better: AP, top-1)."""
    return next((t for t, v in run['metric_time_curve']
                 if t is not None and v >= target), None)


def band(curves: List[List[Tuple[float, float]]],
         clocks: List[List[Tuple[float, float]]]) -> List[Dict[str, float]]:
    """Mean, std, min and max over seeds at the steps every run validated
    at, with the mean training seconds there."""
    if not curves or not all(curves):
        return []
    common = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
    out = []
    for step in common:
        values = [dict(c)[step] for c in curves]
        times = [t for c, k in zip(curves, clocks)
                 for (s, _), (t, _) in zip(c, k) if s == step
                 and t is not None]
        stat = mean_std(values)
        out.append(dict(iter=step, seconds=statistics.fmean(times)
                        if times else None, mean=stat[0], std=stat[1],
                        min=min(values), max=max(values), runs=len(values)))
    return out


def reach(run: Dict[str, Any], target: float) -> Tuple[Optional[int],
                                                        Optional[float]]:
    """Iteration (and its seconds) from which the trailing mean loss, over
    the same window as ``final_loss``, stays at or below ``target``.

    "Stays" matters for detectors, whose total loss is not monotone (the
    RoI head's loss grows while the RPN starts to find objects): an early
    dip below the target is not counted.
    """
    reached: Tuple[Optional[int], Optional[float]] = (None, None)
    for step, _ in run['loss_curve']:
        value = trailing_mean(run['loss_curve'], step, run['loss_window'])
        if value is None:
            continue
        if value > target:
            reached = (None, None)
        elif reached[0] is None:
            reached = (step, run['clock'].get(step))
    return reached


def mean_std(values: Sequence[Optional[float]]) -> Optional[Tuple[float, float,
                                                                  int]]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return statistics.fmean(vals), std, len(vals)


def fmt(stat: Optional[Tuple[float, float, int]], digits: int,
        total: int) -> str:
    if stat is None:
        return 'not reached' if total else '—'
    mean, std, n = stat
    text = f'{mean:.{digits}f} ± {std:.{digits}f}'
    return text if n == total else f'{text} ({n}/{total})'


def summarise(runs: Dict[Tuple[str, int], str], names: List[str],
              reference: str, metric: Optional[str],
              loss_window: float = 0.1,
              budget: Optional[float] = None) -> Dict[str, Any]:
    """Per-run numbers and their mean ± std per setting.

    ``budget``: the training seconds of a time-matched comparison, at which
    the metric "at equal time" is read (default: the shortest setting's
    mean training seconds).
    """
    per_run = {key: summarise_run(load_scalars(run_dir), metric, loss_window)
               for key, run_dir in runs.items()
               if osp.isfile(osp.join(run_dir, 'done.json'))}
    ref_runs = [r for (n, _), r in per_run.items() if n == reference]
    ref_loss = mean_std([r['final_loss'] for r in ref_runs])
    ref_time = mean_std([r['s_per_iter'] for r in ref_runs])
    ref_metric = mean_std([r['final_metric'] for r in ref_runs])
    # equal time: the budget of a time-matched comparison, else the
    # shortest setting's mean training seconds
    finals = [mean_std([r['seconds'] for (n, _), r in per_run.items()
                        if n == name]) for name in names]
    finals = [f[0] for f in finals if f]
    equal_time = budget or (min(finals) if finals else None)
    table = {}
    for name in names:
        rs = [r for (n, _), r in per_run.items() if n == name]
        reached = [reach(r, ref_loss[0]) if ref_loss else (None, None)
                   for r in rs]
        table[name] = dict(
            runs=len(rs),
            final_metric=mean_std([r['final_metric'] for r in rs]),
            final_loss=mean_std([r['final_loss'] for r in rs]),
            s_per_iter=mean_std([r['s_per_iter'] for r in rs]),
            iters_to_ref=mean_std([i for i, _ in reached]),
            seconds_to_ref=mean_std([s for _, s in reached]),
            state_mb=mean_std([r['state_mb'] for r in rs]),
            phases={p: mean_std([r['phases'][p] for r in rs])
                    for p in PHASES},
            iters=mean_std([r['iters'] for r in rs]),
            train_seconds=mean_std([r['seconds'] for r in rs]),
            metric_at_time=mean_std([metric_at_time(r, equal_time)
                                     for r in rs]) if equal_time else None,
            seconds_to_ref_metric=mean_std([
                seconds_to_metric(r, ref_metric[0]) for r in rs])
            if ref_metric else None,
            metric_vs_iter=band([r['metric_curve'] for r in rs],
                                [r['metric_time_curve'] for r in rs]))
        t = table[name]['s_per_iter']
        table[name]['time_vs_ref'] = (t[0] / ref_time[0]
                                      if t and ref_time else None)
    windows = sorted({r['loss_window'] for r in per_run.values()})
    return dict(per_run=per_run, table=table, reference=reference,
                reference_final_loss=ref_loss[0] if ref_loss else None,
                reference_final_metric=ref_metric[0] if ref_metric else None,
                equal_time=equal_time, time_matched=budget is not None,
                loss_windows=windows)


def markdown(summary: Dict[str, Any], metric: str) -> str:
    ref = summary['reference']
    lines = [
        f'| optimizer | runs | final {metric} | final loss | '
        f'iterations to {ref} final loss | seconds to {ref} final loss | '
        f's / iter | time vs {ref} | state MB |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for name, row in summary['table'].items():
        n = row['runs']
        ratio = row['time_vs_ref']
        lines.append(
            f"| {name} | {n} | {fmt(row['final_metric'], 4, n)} | "
            f"{fmt(row['final_loss'], 4, n)} | {fmt(row['iters_to_ref'], 0, n)}"
            f" | {fmt(row['seconds_to_ref'], 1, n)} | "
            f"{fmt(row['s_per_iter'], 3, n)} | "
            f"{'—' if ratio is None else f'{ratio:.2f}'} | "
            f"{fmt(row['state_mb'], 1, n)} |")
    lines += [
        '',
        '| optimizer | ' + ' | '.join(PHASE_LABELS[p] for p in PHASES) +
        ' (s / iter) |',
        '|---|' + '---|' * len(PHASES),
    ]
    for name, row in summary['table'].items():
        n = row['runs']
        lines.append(f'| {name} | ' + ' | '.join(
            fmt(row['phases'][p], 4, n) if row['phases'][p] else '—'
            for p in PHASES) + ' |')
    t_eq = summary.get('equal_time')
    if t_eq:
        kind = ('the time budget' if summary.get('time_matched') else
                'the shortest setting\'s training time')
        lines += [
            '',
            f'| optimizer | runs | iterations | training s | final {metric} '
            f'| {metric} at {t_eq:.0f} s | seconds to {ref} final {metric} |',
            '|---|---|---|---|---|---|---|',
        ]
        for name, row in summary['table'].items():
            n = row['runs']
            lines.append(
                f"| {name} | {n} | {fmt(row['iters'], 0, n)} | "
                f"{fmt(row['train_seconds'], 1, n)} | "
                f"{fmt(row['final_metric'], 4, n)} | "
                f"{fmt(row['metric_at_time'], 4, n)} | "
                f"{fmt(row['seconds_to_ref_metric'], 1, n)} |")
        lines += [
            '',
            '*iterations*: those run, read from the logs (in a '
            'time-matched comparison the budget guard may end a run '
            'before its planned length); '
            f'*training s*: training wall-clock read from the logs '
            f'(validation and checkpoints not counted); *at {t_eq:.0f} s* '
            f'({kind}): the validation metric interpolated in training '
            f'seconds; *seconds to {ref} final {metric}*: training seconds '
            f'at the first validation that reaches {ref}\'s mean final '
            f'{metric}.'
        ]
    windows = '/'.join(str(w) for w in summary.get('loss_windows', []))
    if windows:
        lines += [
            '',
            f'*final loss*: mean training loss over the last {windows} '
            f'iterations; *iterations / seconds to {ref} final loss*: the '
            f'logged iteration from which the mean loss over the preceding '
            f'{windows} iterations stays at or below {ref}\'s mean final '
            'loss (`(k/n)`: only k of n seeds got there).'
        ]
    return '\n'.join(lines) + '\n'


# --------------------------------------------------------------------- plots
def _mean_curve(curves: List[List[Tuple[float, float]]]):
    """Mean, min and max over runs at the steps all runs logged."""
    common = sorted(set.intersection(*[{s for s, _ in c} for c in curves]))
    values = [[dict(c)[s] for c in curves] for s in common]
    return (common, [statistics.fmean(v) for v in values],
            [min(v) for v in values], [max(v) for v in values])


def plot_all(summary: Dict[str, Any], names: List[str], metric: str,
             out_dir: str) -> List[str]:
    per_run = summary['per_run']
    by_name = {n: [r for (k, _), r in per_run.items() if k == n]
               for n in names}
    by_name = {n: rs for n, rs in by_name.items() if rs}
    paths = []

    def save(fig, file):
        fig.tight_layout()
        path = osp.join(out_dir, file)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    for x in ('iter', 'time'):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, rs in by_name.items():
            curves = [r['loss_curve'] for r in rs]
            steps, mean, lo, hi = _mean_curve(curves)
            if x == 'time':
                clocks = [r['clock'] for r in rs]
                xs = [statistics.fmean(c[s] for c in clocks) for s in steps]
            else:
                xs = steps
            ax.plot(xs, mean, label=f'{name} ({len(rs)} seeds)')
            ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set_xlabel('iteration' if x == 'iter' else 'training seconds')
        ax.set_ylabel('training loss')
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, f'loss_vs_{x}.png')

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rs in by_name.items():
        curves = [r['metric_curve'] for r in rs if r['metric_curve']]
        if not curves:
            continue
        steps, mean, lo, hi = _mean_curve(curves)
        err = [[m - a for m, a in zip(mean, lo)], [b - m for m, b in zip(mean, hi)]]
        ax.errorbar(steps, mean, yerr=err, marker='o', capsize=4, label=name)
    ax.set_xlabel('iteration')
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, 'metric_vs_iter.png')

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in by_name:
        points = [p for p in summary['table'][name]['metric_vs_iter']
                  if p['seconds'] is not None]
        if not points:
            continue
        xs = [p['seconds'] for p in points]
        ax.plot(xs, [p['mean'] for p in points], marker='o', label=name)
        ax.fill_between(xs, [p['min'] for p in points],
                        [p['max'] for p in points], alpha=0.2)
    ax.set_xlabel('training seconds')
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, 'metric_vs_time.png')

    table = summary['table']
    shown = [n for n in names if n in by_name]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(shown) + 2))
    left = [0.0] * len(shown)
    for phase in PHASES:
        widths = [(table[n]['phases'][phase] or (0.0, 0, 0))[0] for n in shown]
        ax.barh(shown, widths, left=left, label=PHASE_LABELS[phase])
        left = [a + b for a, b in zip(left, widths)]
    ax.set_xlabel('seconds per iteration (mean over seeds)')
    ax.invert_yaxis()
    ax.legend(fontsize='small', ncol=len(PHASES), loc='lower center',
              bbox_to_anchor=(0.5, 1.0), frameon=False)
    save(fig, 'phase_seconds.png')

    fig, ax = plt.subplots(figsize=(7, 0.6 * len(shown) + 1.5))
    memory = [(table[n]['state_mb'] or (0.0, 0, 0))[0] for n in shown]
    ax.barh(shown, memory)
    for i, v in enumerate(memory):
        ax.text(v, i, f' {v:.1f}', va='center')
    ax.set_xlabel('optimizer state (MiB)')
    ax.invert_yaxis()
    save(fig, 'state_memory.png')
    return paths


# ---------------------------------------------------------------------- main
def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='model config (data, schedule, model)')
    parser.add_argument(
        '--optimizers', nargs='+', required=True,
        help="settings: NAME=CONFIG.py, CONFIG.py or 'NAME:key=value;...'")
    parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2])
    parser.add_argument('--max-iters', type=int,
                        help='iterations per run (iteration-based configs; '
                        'the LR schedule is stretched to match)')
    parser.add_argument('--max-epochs', type=int,
                        help='epochs per run (epoch-based configs)')
    parser.add_argument('--val-interval', type=int,
                        help='validate every N iterations / epochs '
                        '(default: see --val-points)')
    parser.add_argument('--val-points', type=int, default=1,
                        help='validate at this many evenly spaced points '
                        'of every run (the last at its end); default 1')
    timed = parser.add_mutually_exclusive_group()
    timed.add_argument('--time-budget', type=float,
                       help='time-matched: every setting trains for this '
                       'many seconds (its iterations from a calibration of '
                       'its s / iter, its schedule stretched to them)')
    timed.add_argument('--match-time', metavar='REF',
                       help='time-matched: every setting gets the training '
                       "seconds REF's calibrated rate gives for the run's "
                       'length')
    parser.add_argument('--calibrate-iters', type=int, default=50,
                        help='iterations of the s / iter calibration of the '
                        'time-matched mode (epoch-based configs: one '
                        'epoch); default 50')
    parser.add_argument('--overshoot', type=float, default=1.15,
                        help='time-matched: plan this factor more iterations '
                        'than the calibration predicts for the budget; a '
                        'TimeBudgetHook ends each run at the budget (so a '
                        'slower machine than at calibration does not run '
                        'over); default 1.15')
    parser.add_argument('--log-interval', type=int,
                        help='logging interval (default: the config\'s)')
    parser.add_argument('--checkpoint-interval', type=int,
                        help='checkpoint (resume point) every N iterations '
                        '/ epochs (default: at the end)')
    parser.add_argument('--data-root',
                        help='dataset root (default: the config\'s; the '
                        'built-in synthetic data is generated if missing)')
    parser.add_argument('--num-train', type=int,
                        help='images of generated synthetic train data')
    parser.add_argument('--num-val', type=int,
                        help='images of generated synthetic val data')
    parser.add_argument('--reference',
                        help='setting the others are compared with '
                        '(default: adamw if present, else the first)')
    parser.add_argument('--metric', help='validation metric key '
                        f'(default: the first of {", ".join(METRIC_KEYS)})')
    parser.add_argument('--work-dir', default='work_dirs/compare_optimizers')
    parser.add_argument('--out-dir', help='plots and tables (default: '
                        'the work dir)')
    parser.add_argument('--report-only', action='store_true',
                        help='train nothing: plot and tabulate the runs '
                        'that are finished')
    parser.add_argument('--loss-window', type=float, default=0.1,
                        help='final loss = mean training loss over this '
                        'fraction of the iterations (at least one logging '
                        'interval); default 0.1')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='config overrides for every setting')
    return parser.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    args = parse_args(argv)
    settings = [parse_setting(s) for s in args.optimizers]
    names = [n for n, _ in settings]
    if len(set(names)) != len(names):
        raise SystemExit(f'setting names must be unique: {names}')
    reference = args.reference or ('adamw' if 'adamw' in names else names[0])
    if reference not in names:
        raise SystemExit(f'--reference {reference!r} is not among {names}')
    if args.overshoot < 1:
        raise SystemExit(f'--overshoot must be >= 1: {args.overshoot}')
    if not 0 < args.loss_window <= 1:
        raise SystemExit(f'--loss-window must be in (0, 1]: {args.loss_window}')
    plan = None
    if args.time_budget is not None or args.match_time:
        os.makedirs(args.work_dir, exist_ok=True)
        plan = time_plan(args, settings)
    runs = run_all(args, settings, plan)
    summary = summarise(runs, names, reference, args.metric, args.loss_window,
                        plan['budget_s'] if plan else None)
    metric = args.metric or next(
        (metric_key(load_scalars(d), None) for d in runs.values()
         if osp.isfile(osp.join(d, 'done.json'))), None) or 'metric'
    out_dir = args.out_dir or args.work_dir
    os.makedirs(out_dir, exist_ok=True)
    plots = plot_all(summary, names, metric, out_dir)
    table = markdown(summary, metric)
    with open(osp.join(out_dir, 'results.md'), 'w') as f:
        f.write(table)
    per_run = {f'{n}/seed{s}': {k: v for k, v in r.items()
                                 if k not in ('loss_curve', 'clock')}
               for (n, s), r in summary['per_run'].items()}
    with open(osp.join(out_dir, 'summary.json'), 'w') as f:
        json.dump(dict(reference=reference, metric=metric, runs=per_run,
                       table=summary['table'], plan=plan,
                       equal_time_s=summary['equal_time']), f, indent=1)
    print(table)
    print('wrote ' + ', '.join(plots + [osp.join(out_dir, 'results.md')]))
    missing = len(runs) - len(summary['per_run'])
    return 1 if missing else 0


if __name__ == '__main__':
    sys.exit(main())

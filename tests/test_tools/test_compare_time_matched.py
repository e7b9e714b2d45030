# Copyright (c) mmprecond contributors. All rights reserved.
"""compare_optimizers.py's time-matched mode end to end on the demo detector.

Two settings, AdamW and PeerMuon (Newton-Schulz steps on every hidden
weight: a higher cost per iteration), one seed, a budget of a few seconds:
the tool calibrates each setting's s / iter, plans each ``--overshoot``
times the iterations that fill the budget, stretches its schedule to them,
and a TimeBudgetHook ends each run at the budget.  The realised training
wall-clock (read from each run's own log, not from the plan) is within
10 % of the budget for every setting, also when the machine's load changes
between calibration and run (which made the plan alone miss by 18-65 %).
"""
import json
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import DEMO_DET_CONFIG, TOOLS_DIR, run_command

pytest.importorskip('mmdet')
pytest.importorskip('mmcv.ops')
pytest.importorskip('pytorch_optimizer')

pytestmark = pytest.mark.slow

OPT = 'optim_wrapper.optimizer'
MUON = (f'peer_muon:optim_wrapper.constructor=PrecondOptimWrapperConstructor;'
        f'{OPT}.type=PeerMuon')
BUDGET = 6.0
OVERSHOOT = 1.5  # the guard, not the plan, ends the runs


def training_lines(run_dir: Path) -> List[Dict[str, float]]:
    """The training lines of a run's scalars.json (those with an ``lr``)."""
    lines = []
    for file in sorted(run_dir.glob('2*/vis_data/scalars.json')):
        lines += [json.loads(line) for line in file.read_text().splitlines()]
    return [r for r in lines if 'lr' in r]


def realised_seconds(run_dir: Path) -> float:
    """Training seconds: each logged mean iteration time times its window."""
    total, last = 0.0, 0
    for record in training_lines(run_dir):
        total += record['time'] * (record['step'] - last)
        last = record['step']
    return total


@pytest.fixture(scope='module')
def coco64(tmp_path_factory) -> Path:
    """64 train images (16 iterations per epoch): no epoch boundary, whose
    data-loader restart costs about 2 s here, falls inside the short runs."""
    from mmprecond.datasets import generate_synthetic_coco

    root = tmp_path_factory.mktemp('coco64')
    generate_synthetic_coco(str(root), num_train=64, num_val=8, img_size=128,
                            seed=0)
    return root


def test_time_matched_budgets_agree(coco64, tmp_path):
    work = tmp_path / 'compare'
    proc = run_command([
        sys.executable, TOOLS_DIR / 'analysis_tools' / 'compare_optimizers.py',
        DEMO_DET_CONFIG, '--optimizers', 'adamw:', MUON, '--seeds', 0,
        '--time-budget', BUDGET, '--calibrate-iters', 6, '--log-interval', 1,
        '--overshoot', OVERSHOOT, '--val-points', 2, '--data-root', coco64,
        '--work-dir', work, '--cfg-options', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False'
    ], timeout=600)
    plan = json.loads((work / 'time_plan.json').read_text())
    assert plan['overshoot'] == OVERSHOOT
    planned = {n: plan['settings'][n]['length'] for n in ('adamw', 'peer_muon')}
    for name, n in planned.items():  # the budget over the calibrated rate
        p = plan['settings'][name]
        assert n == max(1, round((BUDGET - p['startup_s']) / p['s_per_iter']
                                 * OVERSHOOT))
    summary = json.loads((work / 'summary.json').read_text())
    assert summary['equal_time_s'] == BUDGET
    ratios = {}
    for name, n in planned.items():
        run = work / name / 'seed0'
        ran = training_lines(run)[-1]['step']
        assert 0 < ran <= n
        seconds = realised_seconds(run)
        ratios[name] = seconds / BUDGET
        # its schedule stretched to its planned length
        cfg = (work / name / 'config.py').read_text().replace(' ', '')
        assert f'max_iters={n},' in cfg and f'end={n},' in cfg
        assert "type='TimeBudgetHook'" in cfg
        row = summary['table'][name]
        assert row['train_seconds'][0] == pytest.approx(seconds, rel=1e-6)
        assert row['iters'][0] == ran  # realised, not planned
        # validated at half the plan and, after the guard's stop, at the end
        curve = row['metric_vs_iter']
        assert [p['iter'] for p in curve] == [round(n / 2), ran]
        assert 0 < curve[0]['seconds'] < curve[1]['seconds']
        if ran < n:
            log = (work / name / 'seed0.out').read_text()
            assert f'after {ran} of {n} planned iterations' in log
    print('realised / budget:', ratios)
    assert all(abs(r - 1) <= 0.10 for r in ratios.values()), (ratios, planned)
    assert f'at {BUDGET:.0f} s' in proc.stdout


def tool():
    sys.path.insert(0, str(TOOLS_DIR / 'analysis_tools'))
    import compare_optimizers
    return compare_optimizers


def test_set_length_stretches_the_demo_schedule():
    """The demo detector's warm-up + cosine, and a MultiStepLR's milestones,
    keep their share of the run when its length is planned."""
    from mmengine.config import Config

    cfg = Config.fromfile(str(DEMO_DET_CONFIG))
    cfg.param_scheduler.append(
        dict(type='MultiStepLR', by_epoch=False, milestones=[500, 800]))
    tool().set_length(cfg, 2500)
    warm, cosine, steps = cfg.param_scheduler
    assert cfg.train_cfg.max_iters == 2500
    assert (warm.begin, warm.end) == (0, 250)
    assert (cosine.begin, cosine.end, cosine.T_max) == (250, 2500, 2250)
    assert steps['milestones'] == [1250, 2000]


def test_metric_at_equal_time_and_seconds_to_target():
    run = dict(metric_time_curve=[(10.0, 0.1), (20.0, 0.3), (30.0, 0.4)])
    t = tool()
    assert t.metric_at_time(run, 15.0) == pytest.approx(0.2)
    assert t.metric_at_time(run, 5.0) is None  # before the first validation
    assert t.metric_at_time(run, 32.0) == 0.4  # within 10 % of the end
    assert t.metric_at_time(run, 40.0) is None
    assert t.seconds_to_metric(run, 0.25) == 20.0
    assert t.seconds_to_metric(run, 0.5) is None
    clock = {2: 1.0, 4: 3.0}
    assert t.clock_at(clock, 3) == pytest.approx(2.0)
    assert t.clock_at(clock, 1) == pytest.approx(0.5)

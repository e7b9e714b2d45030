# Copyright (c) mmprecond contributors. All rights reserved.
"""TimeBudgetHook ends a real MMEngine run at its training-seconds budget.

A toy regression model whose training forward sleeps ``SLEEP`` seconds (a
real per-iteration cost, measured by the same clocks as any workload) runs
in a real ``Runner`` with an ``IterBasedTrainLoop`` planned far beyond the
budget; validation every 4 iterations, its own time excluded from the clock.
"""
import json
import time
import uuid
from pathlib import Path
from typing import List, Optional

import pytest
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.runner import Runner

from mmprecond.engine import TimeBudgetHook

SLEEP = 0.02  # s per training iteration
VAL_SLEEP = 0.05  # s per validation batch: must not count
PLANNED = 200
BUDGET = 0.5  # s: about 25 iterations
VALIDATED_AT: List[int] = []


class SlowToy(BaseModel):

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x, y, mode='tensor'):
        out = self.fc(x)
        if mode == 'loss':
            time.sleep(SLEEP)
            return dict(loss=((out - y)**2).mean())
        time.sleep(VAL_SLEEP)
        return [dict(err=float(((out - y)**2).mean()))]


class AtIter(BaseMetric):
    """``toy/at``: the training iteration a validation ran at."""

    runner = None
    default_prefix = 'toy'

    def process(self, data_batch, data_samples):
        self.results.extend(data_samples)

    def compute_metrics(self, results):
        VALIDATED_AT.append(self.runner.iter)
        return dict(at=float(self.runner.iter))


def toy_data(n: int):
    g = torch.Generator().manual_seed(0)
    return [dict(x=torch.randn(2, generator=g), y=torch.randn(1, generator=g))
            for _ in range(n)]


def train(work_dir: Path, hook: Optional[dict], max_iters: int = PLANNED,
          val_interval: int = 4):
    loader = dict(dataset=toy_data(2 * PLANNED), batch_size=2,  # no restart
                  sampler=dict(type='DefaultSampler', shuffle=True),
                  collate_fn=dict(type='default_collate'))
    runner = Runner(
        model=SlowToy(), work_dir=str(work_dir), train_dataloader=loader,
        val_dataloader=dict(loader, dataset=toy_data(2)),
        val_evaluator=[AtIter()],
        train_cfg=dict(by_epoch=False, max_iters=max_iters,
                       val_interval=val_interval),
        val_cfg=dict(), optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1),
                           checkpoint=dict(type='CheckpointHook',
                                           interval=10**6)),
        custom_hooks=[hook] if hook else [],
        log_processor=dict(by_epoch=False, window_size=1),
        default_scope='mmengine',
        experiment_name=f'budget-{uuid.uuid4().hex}')
    AtIter.runner = runner
    VALIDATED_AT.clear()
    runner.train()
    return runner


def logged_seconds(work_dir: Path) -> float:
    """Training seconds as the comparison tool reads them (``time`` x steps)."""
    lines = [json.loads(line) for f in work_dir.glob('2*/vis_data/scalars.json')
             for line in f.read_text().splitlines()]
    total, last = 0.0, 0
    for r in lines:
        if 'lr' in r:
            total += r['time'] * (r['step'] - last)
            last = r['step']
    return total


def test_stops_at_the_budget_and_validates_the_end(tmp_path):
    hook = dict(type='TimeBudgetHook', budget_s=BUDGET)
    runner = train(tmp_path, hook)
    budget_hook = next(h for h in runner.hooks
                       if isinstance(h, TimeBudgetHook))
    n = runner.iter
    assert budget_hook.stopped and runner.train_loop.stop_training
    assert 5 < n < PLANNED
    # within half an iteration of the budget, validation not counted
    per_iter = budget_hook.spent_s / n
    assert abs(budget_hook.spent_s - BUDGET) <= 0.5 * per_iter + 1e-9
    assert logged_seconds(tmp_path) == pytest.approx(BUDGET, rel=0.1)
    # the loop's validation points, then one at the guard's stop
    expected = list(range(4, n + 1, 4))
    if n % 4:
        expected.append(n)
    assert VALIDATED_AT == expected


def test_without_the_hook_the_plan_runs_over(tmp_path):
    runner = train(tmp_path, None, max_iters=40)
    assert runner.iter == 40
    assert logged_seconds(tmp_path) > 1.5 * BUDGET
    assert VALIDATED_AT == list(range(4, 41, 4))


def test_checks_only_at_its_interval(tmp_path):
    hook = dict(type='TimeBudgetHook', budget_s=BUDGET, interval=5)
    runner = train(tmp_path, hook, val_interval=5)
    assert runner.iter % 5 == 0
    assert VALIDATED_AT == list(range(5, runner.iter + 1, 5))  # no extra one
    assert logged_seconds(tmp_path) == pytest.approx(BUDGET, rel=0.25)


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match='budget_s'):
        TimeBudgetHook(budget_s=0)
    with pytest.raises(ValueError, match='interval'):
        TimeBudgetHook(budget_s=1.0, interval=0)

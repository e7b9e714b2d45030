# Copyright (c) mmprecond contributors. All rights reserved.
"""plot_scalars.py places validation points at their iteration (issue 23).

The ``scalars.json`` files are written by a real MMEngine ``Runner`` (a toy
regression model, a metric that records the iteration it was computed at),
once iteration-based and once epoch-based, with MMEngine's default
``LoggerHook`` (validation ``step`` = the epoch).
"""
import json
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import TOOLS_DIR
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.runner import Runner

sys.path.insert(0, str(TOOLS_DIR / 'analysis_tools'))
import plot_scalars  # noqa: E402

COMPUTED_AT = []  # (iteration, metric) of each validation, as the run saw it


class Toy(BaseModel):

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 1)

    def forward(self, x, y, mode='tensor'):
        out = self.fc(x)
        if mode == 'loss':
            return dict(loss=((out - y)**2).mean())
        return [dict(err=float(((out - y)**2).mean()))]


class IterMetric(BaseMetric):
    """``toy/at``: the training iteration the validation ran at."""

    runner = None
    default_prefix = 'toy'

    def process(self, data_batch, data_samples):
        self.results.extend(data_samples)

    def compute_metrics(self, results):
        at = self.runner.iter
        COMPUTED_AT.append(at)
        return dict(at=float(at))


def toy_data(n=8):
    g = torch.Generator().manual_seed(0)
    return [dict(x=torch.randn(2, generator=g), y=torch.randn(1, generator=g))
            for _ in range(n)]


def run(work_dir: Path, by_epoch: bool) -> Path:
    loader = dict(dataset=toy_data(), batch_size=2,
                  sampler=dict(type='DefaultSampler', shuffle=False),
                  collate_fn=dict(type='default_collate'))
    train_cfg = (dict(by_epoch=True, max_epochs=3, val_interval=1) if by_epoch
                 else dict(by_epoch=False, max_iters=10, val_interval=5))
    metric = IterMetric()
    runner = Runner(
        model=Toy(), work_dir=str(work_dir), train_dataloader=loader,
        val_dataloader=loader, val_evaluator=[metric], train_cfg=train_cfg,
        val_cfg=dict(), optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=1),
                           checkpoint=dict(type='CheckpointHook',
                                           interval=100)),
        log_processor=dict(by_epoch=by_epoch), default_scope='mmengine',
        experiment_name=f'plot-{uuid.uuid4().hex}')  # unique logger/visualizer
    IterMetric.runner = runner
    COMPUTED_AT.clear()
    runner.train()
    return work_dir


@pytest.mark.parametrize('by_epoch', [False, True])
def test_validation_points_sit_at_their_iteration(tmp_path, by_epoch):
    work = run(tmp_path / 'run', by_epoch)
    computed = list(COMPUTED_AT)
    lines = [json.loads(ln) for f in plot_scalars.scalar_files(str(work))
             for ln in open(f) if ln.strip()]
    val_steps = [r['step'] for r in lines if 'toy/at' in r]
    # what MMEngine writes: the epoch (0 for an iteration-based run)
    assert val_steps == ([1, 2, 3] if by_epoch else [0, 0])
    scalars = plot_scalars.load_scalars(str(work))
    at = plot_scalars.series(scalars, 'toy/at')
    # MMEngine's runner.iter counts finished iterations; the tool's x is
    # the logged training iteration of the same moment
    assert [x for x, _ in at] == [int(v) for _, v in at] == computed
    assert computed == ([4, 8, 12] if by_epoch else [5, 10])
    loss_steps = [x for x, _ in plot_scalars.series(scalars, 'loss')]
    assert max(loss_steps) == computed[-1]


def test_runs_lacking_a_key_are_named(tmp_path, capsys):
    a = run(tmp_path / 'a', by_epoch=False)
    b = tmp_path / 'b' / 'vis_data'
    b.mkdir(parents=True)
    # a run that never validated: training lines only
    (b / 'scalars.json').write_text(''.join(
        ln for ln in open(plot_scalars.scalar_files(str(a))[0])
        if '"lr"' in ln))
    out = tmp_path / 'p.png'
    plot_scalars.main([str(a), str(tmp_path / 'b'), '--keys', 'loss',
                       'toy/at', '--legend', 'A', 'B', '--out', str(out)])
    printed = capsys.readouterr().out
    assert 'B: no toy/at logged' in printed
    assert 'A: no' not in printed
    assert out.is_file()

# Copyright (c) mmprecond contributors. All rights reserved.
"""PrecondStatsHook, checked on the log file a real mmdet training prints."""
import re
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from conftest import DEMO_DET_CONFIG, use_coco_root
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint

from mmprecond.linalg import power_iteration_lmax

pytest.importorskip('mmdet')
pytest.importorskip('mmcv.ops')

pytestmark = pytest.mark.slow

LOG_LINE = re.compile(r'Iter\(train\) \[\s*(\d+)/\d+\](.*)$')
SCALAR = re.compile(r'([\w/]+): (-?\d+\.\d+(?:e[-+]\d+)?|\d+)')
ROUND = 1e-4  # LoggerHook prints 4 decimals
ADANKFAC = dict(type='AdaNKFAC', lr=2e-3, weight_decay=0.05, stat_interval=1,
                refresh_interval=2)


def demo_cfg(data_root: Path, work_dir: Path, optimizer: dict, iters: int,
             interval: int = 2) -> Config:
    cfg = Config.fromfile(str(DEMO_DET_CONFIG))
    use_coco_root(cfg, data_root)
    cfg.train_cfg.max_iters = iters
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None  # log only
    # MMEngine's printed `time` is then the mean over the logging interval
    cfg.log_processor = dict(by_epoch=False, window_size=interval)
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
    cfg.default_hooks.checkpoint = dict(
        type='CheckpointHook', by_epoch=False, interval=2, max_keep_ckpts=5)
    cfg.default_hooks.logger.interval = interval
    if optimizer['type'] in ('SGD', 'AdamW'):
        cfg.optim_wrapper = dict(type='OptimWrapper', optimizer=optimizer)
    else:
        cfg.optim_wrapper = dict(
            type='OptimWrapper', constructor='PrecondOptimWrapperConstructor',
            optimizer=optimizer)
    cfg.custom_hooks = [dict(type='PrecondStatsHook', interval=interval)]
    cfg.work_dir = str(work_dir)
    return cfg


def printed_log(work_dir: Path) -> Dict[int, Dict[str, float]]:
    """``{iteration: {key: value}}`` of the training lines of the log file."""
    logs = sorted(work_dir.glob('*/*.log'))
    assert logs, f'no log file under {work_dir}'
    out: Dict[int, Dict[str, float]] = {}
    for line in logs[-1].read_text().splitlines():
        match = LOG_LINE.search(line)
        if match:
            out[int(match.group(1))] = {
                k: float(v) for k, v in SCALAR.findall(match.group(2))
            }
    return out


class Reference(Hook):
    """Computes, after the logger, what the log should show at that iteration."""

    priority = 'LOWEST'

    def __init__(self, interval: int, inject_at: int = -1) -> None:
        self.interval = interval
        self.inject_at = inject_at
        self.seen: Dict[int, Dict[str, float]] = {}

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        opt = runner.optim_wrapper.optimizer
        if runner.iter == self.inject_at:  # a fallback at this iteration
            opt.fallbacks.record('test_event', 'injected by the test')
        if not self.every_n_train_iters(runner, self.interval):
            return
        state = [v for st in opt.state.values() for v in st.values()]
        state += [v for st in getattr(opt, 'layer_state', {}).values()
                  for v in st.values()]
        ref = dict(state_mb=sum(t.numel() * t.element_size()
                                for t in state if torch.is_tensor(t)) / 2**20)
        factors = [st[k] for st in getattr(opt, 'layer_state', {}).values()
                   for k in ('L', 'R') if k in st and k + '_inv' in st]
        if factors:
            ref['lambda_max'] = float(torch.stack(
                [power_iteration_lmax(f) for f in factors]).mean())
        self.seen[runner.iter + 1] = ref


def train(cfg: Config, reference: Reference) -> Runner:
    runner = Runner.from_cfg(cfg)
    runner.register_hook(reference)
    runner.train()
    return runner


def test_log_shows_this_iterations_values(tiny_coco, tmp_path) -> None:
    iters, interval = 8, 2
    reference = Reference(interval, inject_at=2)  # 0-based: 3rd iteration
    cfg = demo_cfg(tiny_coco, tmp_path, ADANKFAC, iters, interval)
    cfg.default_hooks.checkpoint.interval = iters
    train(cfg, reference)
    log = printed_log(tmp_path)
    assert sorted(log) == [2, 4, 6, 8]
    # the first log line already has every value (it had none before)
    expected_keys = {
        'precond/fwd_bwd_s', 'precond/step_s', 'precond/statistics_s',
        'precond/refresh_s', 'precond/precondition_s', 'precond/base_s',
        'precond/state_mb', 'precond/factor_mb', 'precond/lambda_max',
        'precond/damping', 'precond/newton_residual',
        'precond/norm_ratio', 'precond/excluded_layers'
    }
    for it in log:
        assert expected_keys <= set(log[it]), (it, sorted(log[it]))
    # values are those of the iteration they are printed at, not of the
    # previous log: lambda_max moves every step (stat_interval=1) and the
    # fallback injected at iteration 3 shows at 4, not at 6
    for it, ref in reference.seen.items():
        assert log[it]['precond/lambda_max'] == pytest.approx(
            ref['lambda_max'], abs=ROUND, rel=1e-4), it
        assert log[it]['precond/state_mb'] == pytest.approx(
            ref['state_mb'], abs=ROUND), it
    assert len({round(log[it]['precond/lambda_max'], 4) for it in log}) > 1
    assert 'precond/test_event' not in log[2]
    assert log[4]['precond/test_event'] == 1
    for values in log.values():
        # phases add up to the step, and step + forward/backward fit in the
        # iteration time MMEngine measured
        phases = sum(values[f'precond/{p}_s'] for p in
                     ('statistics', 'refresh', 'precondition', 'base'))
        assert phases == pytest.approx(values['precond/step_s'], abs=5 * ROUND)
        assert values['precond/fwd_bwd_s'] > 0
        assert (values['precond/fwd_bwd_s'] + values['precond/step_s']
                <= values['time'] + 2 * ROUND)
        assert 0 < values['precond/damping'] < values['precond/lambda_max']
        assert values['precond/newton_residual'] >= 0
        assert values['precond/norm_ratio'] > 0
        assert 0 < values['precond/factor_mb'] < values['precond/state_mb']
    # inverses every 2 steps: the refresh phase is non-zero in every interval
    assert all(v['precond/refresh_s'] > 0 for v in log.values())


@pytest.mark.parametrize('optimizer, moments', [
    (dict(type='SGD', lr=0.01, momentum=0.9), 1),
    (dict(type='AdamW', lr=1e-3), 2),
])
def test_first_order_optimizers_log_time_and_memory(optimizer, moments,
                                                    tiny_coco,
                                                    tmp_path) -> None:
    reference = Reference(2)
    runner = train(demo_cfg(tiny_coco, tmp_path, optimizer, 2), reference)
    values = printed_log(tmp_path)[2]
    params = sum(p.numel() * p.element_size()
                 for p in runner.model.parameters() if p.requires_grad)
    # SGD keeps one momentum buffer per parameter, AdamW two moments
    # (and a 4-byte step counter per parameter)
    assert values['precond/state_mb'] == pytest.approx(
        moments * params / 2**20, rel=1e-3)
    assert values['precond/state_mb'] == pytest.approx(
        reference.seen[2]['state_mb'], abs=ROUND)
    assert values['precond/step_s'] > 0 and values['precond/fwd_bwd_s'] > 0
    assert not any(k in values for k in ('precond/factor_mb',
                                         'precond/refresh_s'))


def test_counters_survive_resume(tiny_coco, tmp_path) -> None:
    first = Reference(2, inject_at=0)
    runner = train(demo_cfg(tiny_coco, tmp_path / 'a', ADANKFAC, 2), first)
    saved = _load_checkpoint(str(tmp_path / 'a' / 'iter_2.pth'))
    stats = saved['precond_stats']
    # plain numbers under str keys: readable with weights_only=True
    assert all(isinstance(v, (int, float)) for part in stats.values()
               for v in part.values())
    assert stats['fallbacks']['test_event'] == 1
    assert stats['phase_seconds'] == dict(
        runner.optim_wrapper.optimizer.phase_seconds)

    cfg = demo_cfg(tiny_coco, tmp_path / 'b', ADANKFAC, 4)
    cfg.resume = True
    cfg.load_from = str(tmp_path / 'a' / 'iter_2.pth')
    resumed = train(cfg, Reference(2))
    log = printed_log(tmp_path / 'b')
    assert sorted(log) == [4]
    assert log[4]['precond/test_event'] == 1
    phases = resumed.optim_wrapper.optimizer.phase_seconds
    for phase, seconds in stats['phase_seconds'].items():
        assert phases[phase] > seconds
    # per-iteration times cover iterations 3-4 only, not 1-4
    per_iter: List[float] = [log[4][f'precond/{p}_s'] for p in
                             ('statistics', 'refresh', 'precondition')]
    since_resume = sum(phases.values()) - sum(stats['phase_seconds'].values())
    assert 2 * sum(per_iter) == pytest.approx(since_resume, abs=6 * ROUND)

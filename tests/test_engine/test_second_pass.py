# Copyright (c) mmprecond contributors. All rights reserved.
"""K-BFGS's second pass inside MMEngine's loop, on the real demo detector."""
import pytest
import torch
from conftest import LossRecorder
from mmengine.runner import Runner
from test_mmdet_training import demo_cfg

from mmprecond.engine import SecondPassHook


def kbfgs_cfg(data_root, work_dir, iters, optimizer, **wrapper):
    """The demo detector's training config with K-BFGS and the hook, no val."""
    cfg = demo_cfg(data_root, work_dir, optimizer, iters)
    cfg.train_cfg.val_interval = 10**6
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.optim_wrapper.update(wrapper)
    cfg.custom_hooks = [dict(type='SecondPassHook')]
    return cfg


def _second_pass_hook(runner):
    return next(h for h in runner.hooks if isinstance(h, SecondPassHook))


@pytest.mark.slow
def test_second_pass_repeats_sampling(tiny_coco, tmp_path):
    """With a negligible step, the second pass re-runs the detector loss on
    the same batch with the same RPN/RoI sampling: the losses agree.  (Without
    the RNG restore, RandomSampler draws other RoIs and they do not.)"""
    opt = dict(type='KBFGS', lr=1e-12, damping=1.0, curvature_interval=2,
               weight_decay=0.0)
    runner = Runner.from_cfg(kbfgs_cfg(tiny_coco, tmp_path, 4, opt))
    recorder = LossRecorder()
    runner.register_hook(recorder)
    hook = _second_pass_hook(runner)
    seconds = []
    orig = hook.after_train_iter

    def spy(*args, **kwargs):
        orig(*args, **kwargs)
        if hook.last_loss is not None:
            seconds.append(float(hook.last_loss))
            hook.last_loss = None

    hook.after_train_iter = spy
    runner.train()
    assert hook.passes == 2
    firsts = [recorder.losses[1], recorder.losses[3]]
    for a, b in zip(firsts, seconds):
        assert abs(a - b) <= 1e-5 * abs(a), (firsts, seconds)


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['KBFGS', 'KBFGS_L'])
def test_kbfgs_trains_faster_rcnn(kind, tiny_coco, tmp_path):
    """The real demo Faster R-CNN trains with K-BFGS: curvature updates with
    the second pass every 4 iterations, the loss falls, state stays finite."""
    iters = 40
    opt = dict(type=kind, lr=0.02, damping=1.0, curvature_interval=4,
               weight_decay=1e-4)
    if kind == 'KBFGS_L':
        opt['history'] = 20
    runner = Runner.from_cfg(kbfgs_cfg(tiny_coco, tmp_path, iters, opt))
    recorder = LossRecorder()
    runner.register_hook(recorder)
    runner.train()
    optimizer = runner.optim_wrapper.optimizer
    assert _second_pass_hook(runner).passes == iters // 4
    assert optimizer.fallbacks.counts['nonfinite_direction'] == 0
    for name in ('roi_head.bbox_head.shared_fcs.1', 'rpn_head.rpn_conv'):
        st = optimizer.layer_state[name]
        assert bool(st['s_G'].abs().sum() > 0)
        for v in st.values():
            assert bool(torch.isfinite(v.float()).all())
    losses = recorder.losses
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_refuses_gradient_accumulation(tiny_coco, tmp_path):
    opt = dict(type='KBFGS', lr=0.01, damping=1.0, weight_decay=0.0)
    runner = Runner.from_cfg(
        kbfgs_cfg(tiny_coco, tmp_path, 2, opt, accumulative_counts=2))
    with pytest.raises(RuntimeError, match='gradient accumulation'):
        runner.train()

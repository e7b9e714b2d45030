# Copyright (c) mmprecond contributors. All rights reserved.
"""K-BFGS / TNT configs train a real mmpretrain classifier through the Runner."""
import copy

import pytest
import torch
from conftest import REPO_ROOT, LossRecorder
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

pytest.importorskip('torchvision')  # mmpretrain 1.2 imports it
pytest.importorskip('mmpretrain')

CONFIGS = {
    'KBFGS': 'configs/kbfgs/resnet18-tiny_kbfgs_synthetic-cls.py',
    'KBFGS_L': 'configs/kbfgs/resnet18-tiny_kbfgs-l_synthetic-cls.py',
    'TNT': 'configs/tnt/resnet18-tiny_tnt_synthetic-cls.py',
    'TNT_EF': 'configs/tnt/resnet18-tiny_tnt-ef_synthetic-cls.py',
}


def cls_cfg(name, data_root, work_dir, iters, flip=True):
    cfg = Config.fromfile(str(REPO_ROOT / CONFIGS[name]))
    for split in ('train', 'val', 'test'):
        loader = cfg[f'{split}_dataloader']
        loader.dataset.data_root = f'{data_root}/'
        loader.num_workers = 0
        loader.persistent_workers = False
    if not flip:  # no data randomness: resumed == uninterrupted exactly
        cfg.train_dataloader.dataset.pipeline = [
            t for t in cfg.train_dataloader.dataset.pipeline
            if t['type'] != 'RandomFlip'
        ]
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters,
                         val_interval=10**6)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=False)]
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10**6,
                                        by_epoch=False)
    cfg.work_dir = str(work_dir)
    return cfg


class FirstIterProbe(Hook):
    """Parameters and BN buffers before the warm start (initialised) and as
    the first training iteration sees them."""

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        self.init = copy.deepcopy(runner.model.state_dict())

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if runner.iter == 0:
            self.state = copy.deepcopy(runner.model.state_dict())
            self.steps = runner.optim_wrapper.optimizer.steps


@pytest.mark.slow
@pytest.mark.parametrize('name', list(CONFIGS))
def test_config_trains_classifier(name, tiny_cls, tmp_path):
    """The config's optimizer trains the mmpretrain ResNet-18 (loss falls);
    WarmStartHook's statistics-only steps leave weights and BN statistics
    as they were at initialisation."""
    iters = 40
    runner = Runner.from_cfg(cls_cfg(name, tiny_cls, tmp_path, iters))
    recorder, probe = LossRecorder(), FirstIterProbe()
    runner.register_hook(recorder)
    runner.register_hook(probe)
    runner.train()
    opt = runner.optim_wrapper.optimizer
    assert type(opt).__name__ == name
    assert probe.steps == opt.warm_start_iters > 0
    for k, v in probe.init.items():
        assert torch.equal(probe.state[k], v), k
    losses = recorder.losses
    assert len(losses) == iters
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)


@pytest.mark.slow
def test_kbfgs_resume_equals_uninterrupted(tiny_cls, tmp_path):
    """Checkpoint at iteration 4 (after a curvature update with its second
    pass), resume, train to 8: the same weights as 8 iterations at once."""
    def cfg(work, iters, interval=10**6):
        c = cls_cfg('KBFGS', tiny_cls, tmp_path / work, iters, flip=False)
        c.optim_wrapper.optimizer.curvature_interval = 2
        c.optim_wrapper.optimizer.warm_start_iters = 2
        c.default_hooks.checkpoint.interval = interval
        return c

    full = Runner.from_cfg(cfg('full', 8))
    full.train()
    Runner.from_cfg(cfg('first', 4, interval=4)).train()
    resumed_cfg = cfg('first', 8)
    resumed_cfg.resume = True
    resumed_cfg.load_from = str(tmp_path / 'first' / 'iter_4.pth')
    resumed = Runner.from_cfg(resumed_cfg)
    resumed.train()
    assert resumed.optim_wrapper.optimizer.steps == 2 + 8
    for (k, v), (k2, v2) in zip(full.model.state_dict().items(),
                                resumed.model.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, msg=k)

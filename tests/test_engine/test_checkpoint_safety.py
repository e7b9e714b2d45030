# Copyright (c) mmprecond contributors. All rights reserved.
"""Real mmdet checkpoints load through the safe (``weights_only=True``) path.

A tiny Faster R-CNN is trained for 2 iterations by MMEngine's ``Runner`` with
a preconditioned optimizer; its checkpoint then serves ``resume`` and
``load_from``, while a file carrying code is refused
(``tests/test_compat.py``).
"""
import pickle

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner
from test_mmdet_training import demo_cfg

from mmprecond.optim.base import loaded_layer_state

pytestmark = pytest.mark.slow

OPTIMIZER = dict(type='NKFAC', lr=0.01, weight_decay=1e-4, stat_interval=1,
                 refresh_interval=1)


class StartProbe(Hook):
    """What the train loop starts from (after any resume)."""

    def before_train(self, runner) -> None:
        opt = runner.optim_wrapper.optimizer
        self.iter = runner.iter
        self.steps = opt.steps
        self.layer_state = {n: {k: v.clone() for k, v in st.items()}
                            for n, st in opt.layer_state.items()}
        self.params = {k: v.clone() for k, v in runner.model.state_dict().items()}


def _cfg(tiny_coco, work_dir, iters):
    cfg = demo_cfg(tiny_coco, work_dir, OPTIMIZER, iters)
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=2,
                                        by_epoch=False)
    cfg.default_hooks.logger.interval = 1
    cfg.train_cfg.val_interval = 10**6
    return cfg


def test_mmdet_checkpoint_resume_and_load_from(tiny_coco, tmp_path):
    first = Runner.from_cfg(_cfg(tiny_coco, tmp_path / 'first', 2))
    first.train()
    ckpt = tmp_path / 'first' / 'iter_2.pth'
    saved_state = first.optim_wrapper.optimizer.state_dict()
    # the real checkpoint needs more than tensors: plain torch.load refuses it
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(ckpt)
    assert any(g.endswith('HistoryBuffer') for g in unsafe)

    # resume: iteration, weights and preconditioner state come back
    cfg = _cfg(tiny_coco, tmp_path / 'resumed', 3)
    cfg.resume, cfg.load_from = True, str(ckpt)
    resumed = Runner.from_cfg(cfg)
    probe = StartProbe()
    resumed.register_hook(probe)
    resumed.train()
    assert probe.iter == 2 and probe.steps == 2 and resumed.iter == 3
    saved_pre = saved_state['preconditioner']
    saved_layers = saved_pre['layers']
    assert set(probe.layer_state) == set(saved_layers)
    for name, st in saved_layers.items():
        st = loaded_layer_state(st, saved_pre['packed'].get(name, {}), 'cpu')
        for key, value in st.items():
            torch.testing.assert_close(probe.layer_state[name][key], value,
                                       rtol=0, atol=0)
    hub = resumed.message_hub.get_scalar('train/loss')
    assert len(hub.data[0]) == 3  # the loss history of the first run + 1

    # load_from without resume: weights only, iteration restarts at 0
    cfg = _cfg(tiny_coco, tmp_path / 'loaded', 1)
    cfg.load_from = str(ckpt)
    loaded = Runner.from_cfg(cfg)
    probe = StartProbe()
    loaded.register_hook(probe)
    loaded.train()
    assert probe.iter == 0 and probe.steps == 0
    want = first.model.state_dict()
    for key, value in probe.params.items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0)

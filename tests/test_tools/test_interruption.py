# Copyright (c) mmprecond contributors. All rights reserved.
"""``tools/train.py`` killed with SIGKILL, restarted with ``--resume``.

For every optimizer: a run killed (``kill -9``, by a hook, right after
iteration 5; the last checkpoint is iteration 4) and restarted with
``--resume`` ends at iteration 10 with exactly the parameters, optimizer
state, fallback counters and step count of an uninterrupted 10-iteration
run; the phase timers continue from the checkpoint instead of restarting.
CPU, deterministic kernels, no random augmentation.
"""
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, TOOLS_DIR, data_cfg_options, run_command
from mmengine.runner.checkpoint import _load_checkpoint

import mmprecond  # noqa: F401  (the safe checkpoint loader)

pytest.importorskip('torchvision')  # mmpretrain 1.2 imports it
pytest.importorskip('mmpretrain')
pytestmark = pytest.mark.slow

CONFIG = (REPO_ROOT / 'tests' / 'test_tools' / 'configs' /
          'vit-tiny_interrupt_synthetic-cls.py')
SIGKILL_CONFIG = CONFIG.with_name('vit-tiny_interrupt_sigkill-cls.py')
HERE = os.path.dirname(os.path.abspath(__file__))

#: optimizer -> (lr, refresh-interval keyword); refreshes every 2 steps,
#: statistics every step.
OPTIMIZERS = {
    'NKFAC': (0.01, 'refresh_interval'), 'AdaNKFAC': (1e-3, 'refresh_interval'),
    'KFAC': (0.01, 'refresh_interval'), 'AdamR': (1e-3, 'refresh_interval'),
    'FSGD': (0.01, 'refresh_interval'), 'FAdam': (1e-3, 'refresh_interval'),
    'AFOpt': (0.01, 'refresh_interval'), 'Ada_AFOpt': (1e-3, 'refresh_interval'),
}


def train_cmd(work_dir, name, tiny_cls, *extra, config=CONFIG):
    lr, interval = OPTIMIZERS[name]
    opt = 'optim_wrapper.optimizer.'
    return [
        sys.executable, TOOLS_DIR / 'train.py', config, '--work-dir', work_dir,
        *extra, '--cfg-options', f'{opt}type={name}', f'{opt}lr={lr}',
        f'{opt}{interval}=2', *data_cfg_options(tiny_cls, splits=['train'])
    ]


def load(path):
    """Through MMEngine's (safe, ``weights_only=True``) checkpoint loader."""
    return _load_checkpoint(str(path), map_location='cpu')


@pytest.mark.parametrize('name', list(OPTIMIZERS))
def test_sigkill_then_resume_equals_uninterrupted(name, tiny_cls, tmp_path):
    straight = tmp_path / 'straight'
    run_command(train_cmd(straight, name, tiny_cls))

    killed = tmp_path / 'killed'
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [HERE, os.environ.get('PYTHONPATH', '')]))
    cmd = train_cmd(killed, name, tiny_cls, config=SIGKILL_CONFIG)
    proc = subprocess.run(list(map(str, cmd)), env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (killed / 'iter_4.pth').is_file()
    assert not (killed / 'iter_6.pth').exists()
    at_kill = load(killed / 'iter_4.pth')

    resumed = run_command(train_cmd(killed, name, tiny_cls, '--resume'))
    assert 'Advance dataloader 4 steps' in resumed.stdout + resumed.stderr

    want, got = load(straight / 'iter_10.pth'), load(killed / 'iter_10.pth')
    assert got['meta']['iter'] == want['meta']['iter'] == 10
    for key, value in want['state_dict'].items():
        torch.testing.assert_close(got['state_dict'][key], value, rtol=0,
                                   atol=0, msg=key)
    pre_want = want['optimizer']['preconditioner']
    pre_got = got['optimizer']['preconditioner']
    assert pre_got['steps'] == pre_want['steps'] == 10
    assert pre_got['fallbacks'] == pre_want['fallbacks']
    for layer, state in pre_want['layers'].items():
        for key, value in state.items():
            torch.testing.assert_close(pre_got['layers'][layer][key], value,
                                       rtol=0, atol=0, msg=f'{layer}.{key}')
    # phase timers kept counting from the checkpoint
    before = at_kill['optimizer']['preconditioner']['phase_seconds']
    after = pre_got['phase_seconds']
    assert before and all(after[k] > v for k, v in before.items())

# Copyright (c) mmprecond contributors. All rights reserved.
"""The tools on an MMPretrain config: train, then evaluate the checkpoint."""
import re
import sys

import pytest
from conftest import REPO_ROOT, TOOLS_DIR, data_cfg_options, run_command

pytest.importorskip('torchvision')  # mmpretrain 1.2 imports it
pytest.importorskip('mmpretrain')

CLS_CONFIG = (REPO_ROOT / 'configs' / 'demo' /
              'resnet18-tiny_adamw_synthetic-cls.py')


def test_train_and_test_mmpretrain_config(tiny_cls, tmp_path) -> None:
    work_dir = tmp_path / 'work'
    train = run_command([
        sys.executable, TOOLS_DIR / 'train.py', CLS_CONFIG, '--work-dir',
        work_dir, '--cfg-options', 'train_cfg.max_epochs=1',
        'train_cfg.val_interval=1', 'default_hooks.checkpoint.interval=1',
        *data_cfg_options(tiny_cls)
    ])
    assert re.search(r'^accuracy/top1: \d+\.\d+$', train.stdout, re.M), \
        train.stdout[-3000:]
    ckpt = work_dir / 'epoch_1.pth'
    assert ckpt.is_file()

    test = run_command([
        sys.executable, TOOLS_DIR / 'test.py', CLS_CONFIG, ckpt,
        '--work-dir', tmp_path / 'test', '--out', tmp_path / 'preds.pkl',
        '--cfg-options', *data_cfg_options(tiny_cls, splits=['test'])
    ])
    match = re.search(r'^accuracy/top1: (\d+\.\d+)$', test.stdout, re.M)
    assert match, test.stdout[-3000:]
    assert 0.0 <= float(match.group(1)) <= 100.0
    assert (tmp_path / 'preds.pkl').stat().st_size > 0

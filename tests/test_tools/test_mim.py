# Copyright (c) mmprecond contributors. All rights reserved.
"""``mim train mmprecond CONFIG`` finds this package's tools and configs."""
import os.path as osp
import sys
from pathlib import Path

import pytest
from conftest import DEMO_DET_CONFIG, REPO_ROOT, coco_cfg_options, run_command

mim_utils = pytest.importorskip('mim.utils')
MIM = Path(sys.executable).parent / 'mim'


def test_mim_locates_tools_and_configs() -> None:
    """mim's own lookup (the one ``mim train`` uses) reaches the sources."""
    pkg_root = mim_utils.get_installed_path('mmprecond')
    train_script = osp.join(pkg_root, '.mim', 'tools', 'train.py')
    assert osp.samefile(train_script, REPO_ROOT / 'tools' / 'train.py')
    found = mim_utils.recursively_find(
        pkg_root, DEMO_DET_CONFIG.name, followlinks=True)
    assert len(found) == 1 and osp.samefile(found[0], DEMO_DET_CONFIG)


@pytest.mark.skipif(not MIM.exists(), reason='mim is not installed')
def test_mim_train_by_config_name(tiny_coco, tmp_path) -> None:
    """``mim train`` with only the config's file name trains 2 iterations."""
    pytest.importorskip('mmdet')
    work_dir = tmp_path / 'work'
    proc = run_command(
        [MIM, 'train', 'mmprecond', DEMO_DET_CONFIG.name,
         '--work-dir', work_dir, '--cfg-options', 'train_cfg.max_iters=2',
         'val_cfg=None', 'val_dataloader=None', 'val_evaluator=None',
         *coco_cfg_options(tiny_coco, splits=['train'])],
        cwd=tmp_path,
        timeout=300)
    assert 'Training finished successfully' in proc.stdout
    assert (work_dir / 'iter_2.pth').is_file()

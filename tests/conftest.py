# Copyright (c) mmprecond contributors. All rights reserved.
"""Fixtures shared by the whole test suite."""
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest
from mmengine.hooks import Hook

REPO_ROOT = Path(__file__).resolve().parents[1]
TOOLS_DIR = REPO_ROOT / 'tools'
DEMO_DET_CONFIG = (REPO_ROOT / 'configs' / 'demo' /
                   'faster-rcnn_r18-tiny_fpn_adamw_synthetic.py')


@pytest.fixture(scope='session')
def tiny_coco(tmp_path_factory) -> Path:
    """A tiny synthetic COCO set: 16 train / 8 val images, 160x160."""
    from mmprecond.datasets import generate_synthetic_coco

    root = tmp_path_factory.mktemp('tiny_coco')
    generate_synthetic_coco(
        str(root), num_train=16, num_val=8, img_size=160, seed=0)
    return root


@pytest.fixture(scope='session')
def tiny_cls(tmp_path_factory) -> Path:
    """A tiny synthetic classification set: 64 train / 32 val images."""
    from mmprecond.datasets import generate_synthetic_cls

    root = tmp_path_factory.mktemp('tiny_cls')
    generate_synthetic_cls(str(root), num_train=64, num_val=32, seed=0)
    return root


def data_cfg_options(data_root: Path,
                     evaluator_ann: str = '',
                     splits: Sequence[str] = ('train', 'val',
                                              'test')) -> List[str]:
    """``--cfg-options`` that point a config's data at ``data_root``.

    Also runs the dataloaders in the main process (``num_workers=0``), which
    is faster for a handful of images and keeps the tests to two cores.

    Args:
        data_root: Dataset root directory.
        evaluator_ann: Annotation file (relative to ``data_root``) that the
            val/test evaluators read, if they read one (COCO does).
        splits: The dataloaders (and evaluators) to redirect.
    """
    root = f'{data_root}/'
    opts = []
    for split in splits:
        opts += [
            f'{split}_dataloader.dataset.data_root={root}',
            f'{split}_dataloader.num_workers=0',
            f'{split}_dataloader.persistent_workers=False',
        ]
    if evaluator_ann:
        opts += [
            f'{split}_evaluator.ann_file={root}{evaluator_ann}'
            for split in splits if split != 'train'
        ]
    return opts


def coco_cfg_options(data_root: Path,
                     splits: Sequence[str] = ('train', 'val',
                                              'test')) -> List[str]:
    """:func:`data_cfg_options` for the synthetic COCO detection set."""
    return data_cfg_options(data_root, 'annotations/instances_val.json',
                            splits)


class LossRecorder(Hook):
    """Keeps every training iteration's total loss (``runner.register_hook``)."""

    def __init__(self) -> None:
        self.losses: List[float] = []

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        self.losses.append(float(outputs['loss']))


def use_coco_root(cfg, data_root: Path) -> None:
    """Point a loaded mmdet config's loaders and COCO evaluators at ``data_root``.

    The in-process counterpart of :func:`coco_cfg_options` (loaders in the
    main process, evaluators reading ``data_root``'s val annotations).
    """
    root = f'{data_root}/'
    for split in ('train', 'val', 'test'):
        loader = cfg[f'{split}_dataloader']
        loader.dataset.data_root = root
        loader.num_workers = 0
        loader.persistent_workers = False
        if split != 'train':
            cfg[f'{split}_evaluator'].ann_file = (
                root + 'annotations/instances_val.json')


def run_command(cmd: Sequence[str],
                timeout: float = 600,
                env: dict = None,
                cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run ``cmd``; fail the test with the output's tail if it fails.

    ``$PYTHON`` (read by ``tools/*.sh``) is set to this interpreter.
    """
    full_env = dict(os.environ)
    full_env['PYTHON'] = sys.executable
    full_env.update(env or {})
    proc = subprocess.run(
        list(map(str, cmd)),
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout)
    assert proc.returncode == 0, (
        f'{" ".join(map(str, cmd))} exited with {proc.returncode}\n'
        f'--- stdout (tail) ---\n{proc.stdout[-4000:]}\n'
        f'--- stderr (tail) ---\n{proc.stderr[-6000:]}')
    return proc

# Copyright (c) mmprecond contributors. All rights reserved.
"""Every config under ``configs/`` parses; every full config builds."""
import re
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DET_CONFIG, REPO_ROOT
from mmengine.config import Config

CONFIG_DIR = REPO_ROOT / 'configs'
ALL_CONFIGS = sorted(CONFIG_DIR.rglob('*.py'))
# Small configs that are trained here (the others need GPUs and COCO).
DEMO_CONFIGS = sorted((CONFIG_DIR / 'demo').glob('*.py'))


def config_id(path: Path) -> str:
    return str(path.relative_to(CONFIG_DIR))


def load(path: Path) -> Config:
    """``Config.fromfile``, skipping if a ``pkg::`` base is not installed."""
    text = path.read_text()
    for package in ('mmdet', 'mmpretrain'):
        if f'{package}::' in text:
            pytest.importorskip(package)
    return Config.fromfile(str(path))


def test_zoo_table_lists_every_config() -> None:
    """configs/README.md links every config (the zoo table is complete)."""
    readme = (CONFIG_DIR / 'README.md').read_text()
    linked = set(re.findall(r'\]\(([\w./-]+\.py)\)', readme))
    configs = {config_id(p) for p in ALL_CONFIGS if '_base_' not in p.parts}
    assert configs - linked == set()
    linked = {p for p in linked if not p.startswith('_base_/')}  # fragments
    assert linked - configs == set()  # no link to a config that is gone


@pytest.mark.parametrize('path', ALL_CONFIGS, ids=config_id)
def test_config_parses(path: Path) -> None:
    cfg = load(path)
    assert len(cfg.keys()) > 0
    if '_base_' not in path.parts:
        for key in ('model', 'default_scope', 'train_dataloader',
                    'optim_wrapper', 'train_cfg'):
            assert key in cfg, f'{key} missing'
        # the optimizer's cost and health are logged with the logger
        assert 'mmprecond' in cfg.custom_imports['imports']
        hooks = [h for h in cfg.custom_hooks if h.type == 'PrecondStatsHook']
        assert len(hooks) == 1
        assert hooks[0].interval == cfg.default_hooks.logger.interval
        # checkpoints with preconditioner state are large: few are kept
        keep = cfg.default_hooks.checkpoint.max_keep_ckpts
        assert keep == (1 if path.parts[-2] == 'demo' else 3)


@pytest.mark.parametrize('path', DEMO_CONFIGS, ids=config_id)
def test_demo_config_builds_model(path: Path) -> None:
    """The model builds and its backbone/neck shapes fit together."""
    from mmengine.registry import MODELS, init_default_scope

    cfg = load(path)
    if cfg.default_scope == 'mmpretrain':
        # mmpretrain 1.2 imports torchvision with its models
        pytest.importorskip('torchvision')
    init_default_scope(cfg.default_scope)
    model = MODELS.build(cfg.model).eval()
    with torch.no_grad():
        feats = model.extract_feat(torch.zeros(2, 3, 64, 64))
    assert all(torch.isfinite(f).all() for f in feats)
    bbox_head = cfg.model.get('roi_head', {}).get('bbox_head')
    if bbox_head is not None and 'metainfo' in cfg:
        assert bbox_head.num_classes == len(cfg.metainfo['classes'])


def test_demo_detector_is_small() -> None:
    cfg = load(DEMO_DET_CONFIG)
    backbone = cfg.model.backbone
    assert (backbone.depth, backbone.base_channels) == (18, 16)
    assert backbone.init_cfg is None
    assert cfg.model.neck.in_channels == [16, 32, 64, 128]
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'
    # the SGD momentum of mmdet's schedules must not leak into AdamW
    assert 'momentum' not in cfg.optim_wrapper.optimizer
    assert cfg.custom_imports['imports'] == ['mmprecond']

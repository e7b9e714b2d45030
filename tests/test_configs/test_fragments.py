# Copyright (c) mmprecond contributors. All rights reserved.
"""The lines every config shares come from ``configs/_base_`` (issue 19).

``custom_imports`` and the default ``PrecondStatsHook`` live in
``_base_/precond_runtime.py`` (interval 100 for ImageNet:
``precond_runtime_in1k.py``); a config restates the hook only where its
interval or its other hooks differ.
"""
from pathlib import Path

import pytest
from mmengine.config import Config

CONFIG_DIR = Path(__file__).parents[2] / 'configs'
CONFIGS = sorted(p for p in CONFIG_DIR.rglob('*.py') if '_base_' not in p.parts)
IMPORT_LINE = "custom_imports = dict(imports=['mmprecond'], allow_failed_imports=False)"
DEFAULT_HOOKS = ("custom_hooks = [dict(type='PrecondStatsHook', interval=50)]",
                 "custom_hooks = [dict(type='PrecondStatsHook', interval=100)]")


def test_no_config_restates_what_the_fragment_holds():
    assert len(CONFIGS) == 71
    restated = [p.relative_to(CONFIG_DIR).as_posix() for p in CONFIGS
                if IMPORT_LINE in p.read_text()
                or any(h in p.read_text() for h in DEFAULT_HOOKS)]
    assert restated == []


@pytest.mark.parametrize('name,interval', [
    ('nkfac/faster-rcnn_r50_fpn_nkfac-1x_coco.py', 50),
    ('adamr/mask-rcnn_swin-t-p4-w7_fpn_ms-crop_adamr-2x_coco.py', 50),
    ('shampoo/resnet50_8xb32-shampoo_in1k.py', 100),
    ('demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py', 50),
])
def test_fragment_supplies_imports_and_stats_hook(name, interval):
    cfg = Config.fromfile(str(CONFIG_DIR / name))
    assert cfg.custom_imports == dict(imports=['mmprecond'],
                                      allow_failed_imports=False)
    assert cfg.custom_hooks == [dict(type='PrecondStatsHook',
                                     interval=interval)]

# Copyright (c) mmprecond contributors. All rights reserved.
"""The AdamR demo detector differs from the AdamW demo in the optimizer only."""
from conftest import REPO_ROOT
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

import mmprecond  # noqa: F401  (registers)
from mmprecond.optim import AdamR

DEMO = REPO_ROOT / 'configs' / 'demo'


def test_adamr_demo_builds_and_only_the_optimizer_differs():
    adamr = Config.fromfile(
        str(DEMO / 'faster-rcnn_r18-tiny_fpn_adamr_synthetic.py'))
    adamw = Config.fromfile(
        str(DEMO / 'faster-rcnn_r18-tiny_fpn_adamw_synthetic.py'))
    a, w = adamr.to_dict(), adamw.to_dict()
    assert {k for k in a if a[k] != w.get(k)} == {'optim_wrapper'}
    assert a['optim_wrapper']['optimizer']['type'] == 'AdamR'
    init_default_scope('mmdet')
    from mmdet.registry import MODELS
    model = MODELS.build(adamr.model)
    wrapper = build_optim_wrapper(model, adamr.optim_wrapper)
    assert isinstance(wrapper.optimizer, AdamR)
    assert wrapper.optimizer.refresh_interval == 100

# Copyright (c) mmprecond contributors. All rights reserved.
"""The AFOpt family on mmpretrain's Swin (the small Swin demo config)."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip('torchvision')  # mmpretrain 1.2 imports it
pytest.importorskip('mmpretrain')

from conftest import REPO_ROOT  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402

import mmprecond  # noqa: E402,F401

SWIN_CONFIG = REPO_ROOT / 'configs' / 'demo' / 'swin-mini_adamw_synthetic-cls.py'
SGD = dict(lr=0.05, momentum=0.9, weight_decay=1e-4)
ADAM = dict(lr=2e-3, weight_decay=0.05)


@pytest.mark.parametrize('name,hp', [('AFOpt', SGD), ('Ada_AFOpt', ADAM)])
def test_window_attention_is_preconditioned_and_trains(name, hp):
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    cfg = Config.fromfile(str(SWIN_CONFIG))
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    wrapper_cfg = cfg.optim_wrapper.to_dict()
    wrapper_cfg.update(
        constructor='PrecondOptimWrapperConstructor',
        optimizer=dict(type=name, stat_interval=2, refresh_interval=4, **hp))
    opt = build_optim_wrapper(model, wrapper_cfg).optimizer
    # every WindowMSA of the 3 stages x 2 blocks is an attention block
    msa = {n for n, m in model.named_modules()
           if type(m).__name__ == 'WindowMSA'}
    assert len(msa) == 6 and set(opt.attention) == msa
    assert any(n.endswith('ffn.layers.1') for n in opt.layers)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 64, 64, generator=gen)
    y = torch.randint(0, 5, (16, ), generator=gen)

    def loss_fn():
        return F.cross_entropy(model.head(model.extract_feat(x)), y)

    with torch.no_grad():
        first = float(loss_fn())
    for _ in range(30):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    with torch.no_grad():
        assert float(loss_fn()) < first / 2
    assert opt.fallbacks.counts.get('newton_fallback', 0) == 0

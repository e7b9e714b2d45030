# Copyright (c) mmprecond contributors. All rights reserved.
"""``factor_memory_budget_mb`` bounds the preconditioner's factor memory."""
import pytest
import torch
import torch.nn.functional as F
from test_afopt import _log_lines, cnn_batches, run, tiny_cnn

from mmprecond.optim import FSGD, KFAC, NKFAC, SGDM_BK, AdamR, AdaNKFAC, Shampoo

SQUARE_KEYS = {'L', 'R', 'L_inv', 'R_inv', 'L_root', 'R_root', 'U1', 'U2'}


def factor_bytes_held(opt):
    """Bytes of the square factor matrices the optimizer really holds."""
    return sum(v.numel() * v.element_size() for st in opt.layer_state.values()
               for k, v in st.items() if k in SQUARE_KEYS)


@pytest.mark.parametrize('cls,kw', [
    (NKFAC, {}), (AdaNKFAC, {}), (KFAC, {}), (AdamR, dict(refresh_interval=1)),
    (FSGD, dict(precondition_convs=True)), (SGDM_BK, {}), (Shampoo, {})])
def test_budget_is_enforced_on_the_state_really_held(tmp_path, cls, kw):
    ref = tiny_cnn()
    full = cls(ref.parameters(), model=ref, stat_interval=1, **kw)
    costs = {n: full.factor_bytes(m) for n, m in full.layers.items()}
    # a budget between the two largest layers' sizes drops exactly the largest
    ranked = sorted(costs.values(), reverse=True)
    budget_mb = (sum(costs.values()) - ranked[0] / 2) / 2**20
    model = tiny_cnn()
    opt, lines = _log_lines(tmp_path, lambda: cls(
        model.parameters(), model=model, stat_interval=1, lr=1e-3,
        factor_memory_budget_mb=budget_mb, **kw))
    largest = max(costs, key=costs.get)
    assert set(opt.layers) == set(costs) - {largest}
    assert opt.fallbacks.counts['over_memory_budget'] == 1
    assert any(f'budget_mb={budget_mb:g}: 1 layer(s)' in ln for ln in lines)
    assert any(ln.strip().startswith(f'{largest} (') for ln in lines)
    run(model, opt, cnn_batches(2))
    held = factor_bytes_held(opt)
    assert held == sum(c for n, c in costs.items() if n != largest)
    assert held <= budget_mb * 2**20
    assert largest not in opt.layer_state


def test_dropped_layers_get_the_plain_update():
    """Budget too small for anything: NKFAC(momentum) == torch SGD."""
    a, b = tiny_cnn(), tiny_cnn()
    opt = NKFAC(a.parameters(), model=a, lr=0.05, factor_memory_budget_mb=1e-9)
    assert not opt.layers
    run(a, opt, cnn_batches(3))
    run(b, torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9), cnn_batches(3))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    x, y = cnn_batches(1)[0]
    assert torch.isfinite(F.cross_entropy(a(x), y))


@pytest.mark.parametrize('value', [0, -1, float('inf'), '1GB', True])
def test_bad_budget(value):
    model = tiny_cnn()
    with pytest.raises(ValueError, match='factor_memory_budget_mb'):
        NKFAC(model.parameters(), model=model, factor_memory_budget_mb=value)


@pytest.mark.slow
def test_r50_fpn_faster_rcnn_stays_under_the_budget(tmp_path):
    """mmdet's real Faster R-CNN R50-FPN, built on the CPU (no training)."""
    from mmdet.registry import MODELS
    from mmengine.hub import get_config
    from mmengine.registry import init_default_scope

    init_default_scope('mmdet')
    cfg = get_config('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py')
    cfg.model.backbone.init_cfg = None  # no download
    model = MODELS.build(cfg.model)
    unbounded = NKFAC(model.parameters(), model=model)
    full_mb = unbounded.factor_memory_mb()
    unbounded.capture.remove()
    budget_mb = 1024.0
    assert full_mb > budget_mb
    opt, lines = _log_lines(tmp_path, lambda: NKFAC(
        model.parameters(), model=model, factor_memory_budget_mb=budget_mb))
    assert opt.factor_memory_mb() <= budget_mb
    dropped = opt.fallbacks.counts['over_memory_budget']
    assert 0 < dropped < len(unbounded.layers) // 4
    text = '\n'.join(lines)
    assert f'{dropped} layer(s) get the plain sgdm update to fit' in text
    assert 'optimizer state:' in text
    # the dropped layers are the costliest ones: every kept layer is cheaper
    kept_max = max(opt.factor_bytes(m) for m in opt.layers.values())
    for name, module in unbounded.layers.items():
        if name not in opt.layers:
            assert opt.factor_bytes(module) >= kept_max

# Copyright (c) mmprecond contributors. All rights reserved.
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

import mmprecond  # noqa: F401  (registers)
from mmprecond.engine import HessianOptimWrapper
from mmprecond.optim import SGD_PH


def net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def build(model, wrapper_type, **opt):
    cfg = dict(type=wrapper_type, optimizer=dict(type='SGD_PH', lr=0.05, **opt))
    return OPTIM_WRAPPER_CONSTRUCTORS.build(
        dict(type='PrecondOptimWrapperConstructor', optim_wrapper_cfg=cfg))(model)


def data(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4, ), generator=g))
            for _ in range(n)]


def test_update_params_equals_manual_create_graph_loop():
    a, b = net(), net()
    wrapper = build(a, 'HessianOptimWrapper', weight_decay=1e-3)
    assert isinstance(wrapper, HessianOptimWrapper)
    assert isinstance(wrapper.optimizer, SGD_PH)
    opt_b = SGD_PH(b.parameters(), model=b, lr=0.05, weight_decay=1e-3)
    for x, y in data(5):
        wrapper.update_params(F.cross_entropy(a(x), y))
        opt_b.zero_grad()
        F.cross_entropy(b(x), y).backward(create_graph=True)
        opt_b.step()
    opt_a = wrapper.optimizer
    assert opt_a.steps == 5
    for p in opt_a.partial_hessian.params:
        assert opt_a.state[p]['hessian_diag'].gt(0).all()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_plain_wrapper_stops_with_instructions():
    model = net()
    wrapper = build(model, 'OptimWrapper')
    x, y = data(1)[0]
    with pytest.raises(RuntimeError, match="type='HessianOptimWrapper'"):
        wrapper.update_params(F.cross_entropy(model(x), y))


def test_other_optimizers_get_create_graph_backward():
    model = net()
    cfg = dict(type='HessianOptimWrapper', optimizer=dict(type='SGD', lr=0.1))
    wrapper = OPTIM_WRAPPER_CONSTRUCTORS.build(
        dict(type='PrecondOptimWrapperConstructor', optim_wrapper_cfg=cfg))(model)
    x, y = data(1)[0]
    wrapper.backward(F.cross_entropy(model(x), y))
    assert model[1].weight.grad.grad_fn is not None
    wrapper.step()
    wrapper.zero_grad()
    assert model[1].weight.grad is None

# Copyright (c) mmprecond contributors. All rights reserved.
import pytest
import torch
import torch.nn as nn
from mmengine.optim import AmpOptimWrapper, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIMIZERS

import mmprecond  # noqa: F401  (registers)
from mmprecond.engine import PrecondOptimWrapperConstructor
from mmprecond.optim import AdaNKFAC


class Net(nn.Module):

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


class Wrapper(nn.Module):  # stands for (MM)DistributedDataParallel

    def __init__(self, module):
        super().__init__()
        self.module = module


def build(cfg, model):
    cfg = dict(cfg)
    constructor = cfg.pop('constructor', 'PrecondOptimWrapperConstructor')
    paramwise = cfg.pop('paramwise_cfg', None)
    return OPTIM_WRAPPER_CONSTRUCTORS.build(
        dict(type=constructor, optim_wrapper_cfg=cfg, paramwise_cfg=paramwise))(model)


def test_registered_in_root_registries_and_visible_from_children():
    from mmengine.registry import Registry
    assert OPTIMIZERS.get('AdaNKFAC') is AdaNKFAC
    for name in ('NKFAC', 'KFAC'):
        assert OPTIMIZERS.get(name) is not None
    child = Registry('optimizer', parent=OPTIMIZERS, scope='somewhere')
    assert child.get('AdaNKFAC') is AdaNKFAC
    assert OPTIM_WRAPPER_CONSTRUCTORS.get(
        'PrecondOptimWrapperConstructor') is PrecondOptimWrapperConstructor


def test_passes_unwrapped_model_and_honours_paramwise_cfg():
    net = Net()
    wrapper = build(
        dict(type='OptimWrapper',
             optimizer=dict(type='AdaNKFAC', lr=1e-3, weight_decay=0.2),
             paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0,
                                custom_keys={'fc': dict(lr_mult=0.1)})),
        Wrapper(net))
    assert isinstance(wrapper, OptimWrapper)
    opt = wrapper.optimizer
    assert isinstance(opt, AdaNKFAC)
    assert set(opt.layers) == {'conv', 'fc'}
    assert opt.layers['conv'] is net.conv
    by_param = {id(p): g for g in opt.param_groups for p in g['params']}
    assert by_param[id(net.conv.weight)]['weight_decay'] == 0.2
    assert by_param[id(net.conv.bias)]['weight_decay'] == 0.0
    assert by_param[id(net.bn.weight)]['weight_decay'] == 0.0
    assert by_param[id(net.fc.weight)]['lr'] == pytest.approx(1e-4)


def test_plain_torch_optimizers_build_unchanged():
    net = Net()
    wrapper = build(dict(optimizer=dict(type='SGD', lr=0.02, momentum=0.9)), net)
    assert type(wrapper.optimizer) is torch.optim.SGD
    assert wrapper.optimizer.defaults['momentum'] == 0.9


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason='mmengine builds AmpOptimWrapper only with an accelerator; '
                    'the scaler path itself is tested on CPU in test_nkfac.py')
def test_amp_wrapper_attaches_loss_scaler():
    net = Net()
    wrapper = build(
        dict(type='AmpOptimWrapper', dtype='bfloat16',
             optimizer=dict(type='NKFAC', lr=0.01)), net)
    assert isinstance(wrapper, AmpOptimWrapper)
    assert wrapper.optimizer.grad_scaler is wrapper.loss_scaler


def test_default_constructor_fails_with_instructions():
    with pytest.raises(TypeError, match="constructor='PrecondOptimWrapperConstructor'"):
        build(dict(constructor='DefaultOptimWrapperConstructor',
                   optimizer=dict(type='AdaNKFAC', lr=1e-3)), Net())


def test_frozen_parameters_are_skipped():
    net = Net()
    net.conv.requires_grad_(False)
    wrapper = build(dict(optimizer=dict(type='NKFAC', lr=0.01, weight_decay=1e-4),
                         paramwise_cfg=dict(norm_decay_mult=0.0)), net)
    assert set(wrapper.optimizer.layers) == {'fc'}

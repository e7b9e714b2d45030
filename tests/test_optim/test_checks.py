# Copyright (c) mmprecond contributors. All rights reserved.
"""Bad optimizer configs fail at build time with one message naming the fix.

Each case builds through the same path a training run takes (MMEngine's
``build_optim_wrapper`` on a config, or the optimizer class directly) and
checks the message names the field, the value and what to write instead.
"""
import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from test_afopt import _log_lines, tiny_cnn

import mmprecond  # noqa: F401  (registers)
from mmprecond.optim import FSGD, KFAC, NKFAC, Ada_AFOpt, AdamR, AdaNKFAC, AFOpt, FAdam
from mmprecond.optim.checks import accepted_keywords, check_keywords

PRECOND = dict(constructor='PrecondOptimWrapperConstructor')


def build(model, optimizer, **wrapper):
    cfg = dict(type='OptimWrapper', optimizer=optimizer, **PRECOND, **wrapper)
    return build_optim_wrapper(model, Config(dict(optim_wrapper=cfg)).optim_wrapper)


def test_unknown_keyword_lists_the_existing_ones():
    with pytest.raises(ValueError) as info:
        build(tiny_cnn(), dict(type='NKFAC', lr=0.01, refresh_intervall=10))
    msg = str(info.value)
    assert "unknown optimizer keyword(s) 'refresh_intervall'" in msg
    for kw in ('refresh_interval', 'stat_interval', 'damping', 'max_factor_dim'):
        assert kw in msg
    assert '_delete_' not in msg  # not an inherited SGD key


def test_inherited_sgd_keys_explain_delete(tmp_path):
    """A real mmdet schedule gives SGD(momentum=0.9); AdamR has no momentum."""
    child = tmp_path / 'child.py'
    child.write_text(
        "_base_ = 'mmdet::_base_/schedules/schedule_1x.py'\n"
        "optim_wrapper = dict(constructor='PrecondOptimWrapperConstructor',\n"
        "                     optimizer=dict(type='AdamR', lr=1e-4))\n")
    cfg = Config.fromfile(str(child))
    assert cfg.optim_wrapper.optimizer.momentum == 0.9  # inherited
    with pytest.raises(ValueError) as info:
        build_optim_wrapper(tiny_cnn(), cfg.optim_wrapper)
    msg = str(info.value)
    assert "'momentum'" in msg and '_delete_=True' in msg
    assert "type='AdamR'" in msg
    # the fix the message gives works
    child.write_text(child.read_text().replace(
        "optimizer=dict(type", "optimizer=dict(_delete_=True, type"))
    cfg = Config.fromfile(str(child))
    wrapper = build_optim_wrapper(tiny_cnn(), cfg.optim_wrapper)
    assert isinstance(wrapper.optimizer, AdamR)


@pytest.mark.parametrize('cls,field', [
    (NKFAC, 'stat_interval'), (NKFAC, 'refresh_interval'),
    (NKFAC, 'exact_inv_period'), (NKFAC, 'newton_steps'),
    (AdaNKFAC, 'refresh_interval'), (KFAC, 'stat_interval'),
    (AdamR, 'refresh_interval'), (AdamR, 'stat_interval'),
    (FSGD, 'refresh_interval'), (FAdam, 'stat_interval'), (AFOpt, 'refresh_interval'),
    (Ada_AFOpt, 'refresh_interval')])
@pytest.mark.parametrize('value', [1e3, 10.5, 0, -5, True, '100'])
def test_bad_intervals(cls, field, value):
    with pytest.raises(ValueError) as info:
        build(tiny_cnn(), {'type': cls.__name__, field: value})
    msg = str(info.value)
    assert f'Invalid {field}={value!r}' in msg and 'integer' in msg or (
        f'Invalid {field}={value}' in msg and '>= 1' in msg)
    if value == 1e3:
        assert f'write {field}=1000' in msg


@pytest.mark.parametrize('cls', [NKFAC, AdaNKFAC, KFAC, FSGD, FAdam, AFOpt,
                                 Ada_AFOpt])
@pytest.mark.parametrize('eta', [0, 1, 1.5, -0.01, float('nan')])
def test_damping_outside_unit_interval(cls, eta):
    with pytest.raises(ValueError, match=r'Invalid damping=.*\(0, 1\)') as info:
        build(tiny_cnn(), dict(type=cls.__name__, damping=eta))
    assert 'damping=0.01' in str(info.value)


@pytest.mark.parametrize('cls,field', [(NKFAC, 'refresh_interval'),
                                       (FSGD, 'refresh_interval'),
                                       (AdamR, 'refresh_interval')])
def test_unaligned_refresh_interval_is_explained(tmp_path, cls, field):
    model = tiny_cnn()
    _, lines = _log_lines(tmp_path, lambda: build(
        model, {'type': cls.__name__, 'stat_interval': 4, field: 10}))
    hits = [ln for ln in lines if f'{field}=10 is not a multiple' in ln]
    assert len(hits) == 1
    assert 'up to 3 steps old' in hits[0] and f'{field}=8' in hits[0]
    _, lines = _log_lines(tmp_path, lambda: build(
        model, {'type': cls.__name__, 'stat_interval': 4, field: 12}))
    assert not any('is not a multiple' in ln for ln in lines)


@pytest.mark.parametrize('kw', [dict(newton_steps=2),
                                dict(exact_inv_period=5)])
def test_kfac_rejects_newton_keywords(kw):
    model = tiny_cnn()
    for make in (lambda: build(model, dict(type='KFAC', **kw)),
                 lambda: KFAC(model.parameters(), model=model, **kw)):
        with pytest.raises(ValueError) as info:
            make()
        msg = str(info.value)
        assert next(iter(kw)) in msg and "type='NKFAC'" in msg
    assert 'newton_steps' not in accepted_keywords(KFAC)
    assert 'refresh_interval' in accepted_keywords(KFAC)
    assert 'newton_steps' in accepted_keywords(NKFAC)


def test_without_the_constructor_the_message_says_how():
    with pytest.raises(TypeError) as info:
        build_optim_wrapper(tiny_cnn(), Config(dict(optim_wrapper=dict(
            type='OptimWrapper', optimizer=dict(type='NKFAC')))).optim_wrapper)
    assert "constructor='PrecondOptimWrapperConstructor'" in str(info.value)


@pytest.mark.parametrize('cls,twin', [(AFOpt, 'FSGD'), (Ada_AFOpt, 'FAdam')])
def test_afopt_on_a_cnn_says_use_fsgd(tmp_path, cls, twin):
    _, lines = _log_lines(tmp_path, lambda: build(tiny_cnn(),
                                                  dict(type=cls.__name__)))
    hits = [ln for ln in lines if 'no supported self-attention' in ln]
    assert len(hits) == 1 and f"type='{twin}'" in hits[0]


def test_layers_that_cannot_be_preconditioned_are_named(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8),
        nn.Conv2d(8, 4, 3, padding=1, padding_mode='reflect'),
        nn.Conv1d(4, 4, 1), nn.Linear(4, 2))
    opt, lines = _log_lines(tmp_path,
                            lambda: build(model, dict(type='NKFAC')).optimizer)
    assert set(opt.layers) == {'0', '4'}
    text = '\n'.join(lines)
    assert '3 layer(s) get the plain sgdm update' in text
    assert '1: grouped conv (groups=8)' in text
    assert "2: padding_mode='reflect'" in text
    assert '3: unsupported type Conv1d' in text
    assert opt.fallbacks.counts['excluded_layers'] == 3


def test_variants_take_their_base_keywords_only():
    """One family, two variants: each signature has its base update's keys,
    the other base's keys are refused at build time, old names name the new."""
    import inspect

    from mmprecond.optim import VARIANTS, KroneckerInverse
    assert VARIANTS['AdaNKFAC'].family is KroneckerInverse
    assert VARIANTS['NKFAC'].base == 'sgdm' and VARIANTS['AdaNKFAC'].base == 'adamw'
    assert isinstance(KFAC, type) and issubclass(KFAC, NKFAC)
    sgd, adam = accepted_keywords(NKFAC), accepted_keywords(AdaNKFAC)
    assert {'momentum', 'nesterov'} <= set(sgd) and not {'betas', 'eps'} & set(sgd)
    assert {'betas', 'eps'} <= set(adam) and not {'momentum', 'nesterov'} & set(adam)
    assert inspect.signature(AdaNKFAC).parameters['weight_decay'].default == 0.2
    with pytest.raises(ValueError, match='_delete_=True'):
        check_keywords(AdaNKFAC, dict(type='AdaNKFAC', momentum=0.9))
    with pytest.raises(ValueError, match='inv_interval was renamed refresh_interval'):
        check_keywords(NKFAC, dict(type='NKFAC', inv_interval=10))
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError):
        AdaNKFAC(model.parameters(), model=model, momentum=0.9)
    with pytest.raises(TypeError):  # keyword-only: no positional lr
        NKFAC(model.parameters(), 0.1, model=model)


def test_class_renamed_keywords_name_the_new_keyword() -> None:
    """A class-only rename (``renamed_keywords``) fails at build time with
    the new name, and only for that class."""

    class Absolute(torch.optim.SGD):
        renamed_keywords = {'damping': 'abs_damping'}

        def __init__(self, params, lr: float = 0.1,
                     abs_damping: float = 1e-3) -> None:
            super().__init__(params, lr=lr)

    with pytest.raises(ValueError, match=r'damping was renamed abs_damping '
                       r'\(write abs_damping=0\.01\)'):
        check_keywords(Absolute, dict(type='Absolute', damping=0.01))
    check_keywords(Absolute, dict(type='Absolute', abs_damping=0.01))
    with pytest.raises(ValueError, match='unknown optimizer keyword'):
        check_keywords(torch.optim.SGD, dict(type='SGD', lr=0.1, damping=0.01))

# Copyright (c) mmprecond contributors. All rights reserved.
"""Issue 23: the messages a new user meets name the field or file and the fix.

Every optimizer case is derived from the registry (the contract suite's
``registered`` / ``signature``), so an optimizer added later is covered.
"""
import os
import sys
import uuid

import pytest
import torch
import torch.nn as nn
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.optim import OptimWrapper, build_optim_wrapper
from mmengine.runner.checkpoint import _load_checkpoint

import mmprecond  # noqa: F401  (registers, applies the compat fixes)
from mmprecond.compat import CorruptCheckpointError
from mmprecond.optim import AdaNKFAC

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..',
                                'test_contract'))
from contract_spec import Net, batches, registered, signature  # noqa: E402

OURS = {n: c for n, c in registered().items() if not n.startswith('Peer')}
WITH_MOMENTUM = [n for n, c in registered().items() if 'momentum' in signature(c)]
WITH_BETAS = [n for n, c in OURS.items() if 'betas' in signature(c)]
REFRESHING = [(n, f) for n, c in OURS.items() for f in ('refresh_interval',
                                                        'refresh_interval')
              if f in signature(c) and 'stat_interval' in signature(c)]


def make(name, **kw):
    cls = registered()[name]
    model = Net()
    if 'model' in signature(cls):
        kw['model'] = model
    return cls(model.parameters(), **kw)


def from_config(name, **kw):
    cfg = dict(type='OptimWrapper', constructor='PrecondOptimWrapperConstructor',
               optimizer=dict(type=name, **kw))
    return build_optim_wrapper(Net(), Config(dict(optim_wrapper=cfg)).optim_wrapper)


def log_lines(tmp_path, fn):
    log_file = tmp_path / f'{uuid.uuid4().hex}.log'
    logger = MMLogger.get_instance(f'messages-{uuid.uuid4().hex}',
                                   log_file=str(log_file))
    fn()
    for h in logger.handlers:
        h.flush()
    return log_file.read_text()


# ------------------------------------------------------------ (a) checkpoint
@pytest.mark.parametrize('damage', ['header', 'key', 'truncated'])
def test_damaged_checkpoint_names_the_file_and_the_fix(tmp_path, damage):
    path = tmp_path / 'iter_4.pth'
    torch.save(dict(state_dict=Net().state_dict(), meta=dict(iter=4)), path)
    data = bytearray(path.read_bytes())
    if damage == 'header':  # zip local header and first name bytes
        data[0:8] = b'\xff' * 8
    elif damage == 'key':  # a pickled key, decoded as UTF-8
        at = data.index(b'state_dict')
        data[at:at + 2] = b'\xff\xfe'
    else:
        data = data[:len(data) // 2]
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError) as info:
        _load_checkpoint(str(path), map_location='cpu')
    msg = str(info.value)
    assert repr(str(path)) in msg and 'damaged' in msg
    assert '--resume PATH' in msg and 'load_from' in msg
    assert 'could run code' not in msg  # not mistaken for a refusal


# -------------------------------------------------------------- (b) lr type
@pytest.mark.parametrize('name', sorted(OURS))
def test_string_lr_names_the_field_and_type(name):
    with pytest.raises(TypeError) as info:
        make(name, lr='1e-3')
    msg = str(info.value)
    assert "Invalid lr='1e-3'" in msg and 'got str' in msg
    assert 'lr=0.001 without quotes' in msg


# ---------------------------------------------------------- (c) momentum
@pytest.mark.parametrize('name', WITH_MOMENTUM)
@pytest.mark.parametrize('value', [1.5, 1.0, -0.1])
def test_momentum_outside_unit_interval_is_refused(name, value):
    makers = [lambda: from_config(name, momentum=value)]
    if name in OURS:  # built directly, without the config check
        makers.append(lambda: make(name, momentum=value))
    for maker in makers:
        with pytest.raises(ValueError, match=r'momentum') as info:
            maker()
        assert '[0, 1)' in str(info.value)


@pytest.mark.parametrize('name', WITH_BETAS)
@pytest.mark.parametrize('betas,field', [((1.0, 0.999), 'betas[0]'),
                                         ((0.9, 1.5), 'betas[1]'),
                                         ((-0.1, 0.999), 'betas[0]')])
def test_betas_outside_unit_interval_are_refused(name, betas, field):
    with pytest.raises(ValueError) as info:
        make(name, betas=betas)
    assert f'Invalid {field}=' in str(info.value)
    assert '[0, 1)' in str(info.value)


def test_momentum_check_matches_torch_for_the_betas():
    """torch.optim.Adam refuses the same betas the shared check refuses."""
    p = [nn.Parameter(torch.zeros(2))]
    for betas in ((1.0, 0.999), (0.9, 1.5), (-0.1, 0.999)):
        with pytest.raises(ValueError):
            torch.optim.Adam(p, betas=betas)
    torch.optim.Adam(p, betas=(0.0, 0.0))
    make('NKFAC', momentum=0.0)  # the closed end stays legal


# --------------------------------------------------- (d) refresh interval
@pytest.mark.parametrize('name,field', REFRESHING)
def test_refresh_interval_below_stat_interval_is_refused(name, field):
    with pytest.raises(ValueError) as info:
        make(name, stat_interval=10, **{field: 5})
    msg = str(info.value)
    assert f'{field}=5 < stat_interval=10' in msg and f'{field}=10' in msg
    make(name, stat_interval=10, **{field: 10})  # equal is fine


# ---------------------------------------- (e) first-order from preconditioned
def _adanfkac_state():
    torch.manual_seed(0)
    model = Net()
    opt = AdaNKFAC(model.parameters(), model=model, lr=1e-2, stat_interval=1,
                   refresh_interval=2)
    wrapper = OptimWrapper(opt)
    for x, y, rows in batches(3):
        loss = nn.functional.cross_entropy(model(x, rows), y)
        wrapper.update_params(loss)
    return model, wrapper.state_dict()


def test_adamw_resumed_from_adanfkac_checkpoint_warns(tmp_path):
    model, state = _adanfkac_state()
    adamw = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3))
    text = log_lines(tmp_path, lambda: adamw.load_state_dict(state))
    assert "AdamW does not read ('preconditioner')" in text
    assert 'exp_avg' in text and 'load_from' in text
    # a matching checkpoint says nothing
    same = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-3))
    quiet = adamw.state_dict()
    text = log_lines(tmp_path, lambda: same.load_state_dict(quiet))
    assert 'does not read' not in text


def test_adanfkac_resumed_from_adamw_checkpoint_still_warns(tmp_path):
    """The opposite direction (the optimizer's own fallback count)."""
    model, _ = _adanfkac_state()
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = AdaNKFAC(model.parameters(), model=model, lr=1e-2)
    opt.load_state_dict(adamw.state_dict())
    assert opt.fallbacks.counts['missing_preconditioner_state'] == 1

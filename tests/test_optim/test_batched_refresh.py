# Copyright (c) mmprecond contributors. All rights reserved.
"""Preconditioner refreshes are batched by factor size.

Counted with a ``TorchDispatchMode``: the aten ops a refresh dispatches do
not depend on the number of layers, only on the number of distinct factor
sizes (the factors here are small enough for one CPU batch, see
``mmprecond.linalg.batch_limit``); a factor that cannot be inverted fails
alone and is counted.
"""
from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mmprecond.optim import FSGD, NKFAC, AdamR, AdaNKFAC


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched, by name (``aten.bmm`` -> ``bmm``).

    Views (``select``, ``slice``, ``view``, ...) launch no kernel and are
    not counted: handing each factor its slice of a batched result is one
    view per factor.
    """

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def deep_net(layers, seed=0):
    """``layers`` Linear(16, 16) plus a classifier: 3 factor sizes (4, 16, 17)."""
    torch.manual_seed(seed)
    mods = [m for _ in range(layers) for m in (nn.Linear(16, 16), nn.Tanh())]
    return nn.Sequential(*mods, nn.Linear(16, 4))


def trained(cls, layers, steps, **kw):
    model = deep_net(layers)
    if cls is not AdamR:
        kw = dict(refresh_interval=1, **kw)
    opt = cls(model.parameters(), model=model, lr=0.01, stat_interval=1, **kw)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64, ), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return opt


def refresh_ops(opt, step):
    with OpCounter() as counter:
        opt.update_preconditioners(step)
    return counter.counts


@pytest.mark.parametrize('cls,kw', [(NKFAC, dict(exact_inv_period=100)),
                                    (AdaNKFAC, dict(exact_inv_period=100)),
                                    (FSGD, {})])
def test_refresh_kernels_do_not_grow_with_the_number_of_layers(cls, kw):
    # steps 0-2 are exact refreshes, 3 and 4 Newton ones (FSGD: all exact)
    few, many = trained(cls, 3, 4, **kw), trained(cls, 12, 4, **kw)
    for step in (4, 100):  # a Newton and an exact refresh
        ops_few, ops_many = refresh_ops(few, step), refresh_ops(many, step)
        assert ops_few == ops_many, step
        sizes = 1 if cls is FSGD else 3  # FSGD: only the 17-wide input side
        exact = cls is FSGD or step == 100
        # one batched Cholesky per size at an exact refresh, none at a
        # Newton refresh (no fallback), one tiny eigvalsh per size (Lanczos)
        assert ops_many['linalg_cholesky_ex'] == (sizes if exact else 0)
        assert ops_many['_linalg_eigh'] == sizes
        # host reads: one 'all ok?' per size (plus one flags read per size)
        assert ops_many['_local_scalar_dense'] == sizes
    assert few.fallbacks.counts.get('newton_fallback', 0) == 0


def test_adamr_basis_refresh_is_one_batched_eigh_per_size():
    def eigh_calls(layers):
        opt = trained(AdamR, layers, 5, refresh_interval=4)  # 1st basis at t=4
        assert opt.fallbacks.counts.get('eigh_failure', 0) == 0
        u = opt.layer_state['0']['U2']
        torch.testing.assert_close(u.T @ u, torch.eye(17), rtol=0, atol=1e-5)
        ops = refresh_ops(opt, 8)
        return ops['_linalg_eigh'], ops['linalg_eigh']

    # one fp64 eigh per factor size (4, 16, 17), however many layers
    assert eigh_calls(3) == eigh_calls(12) == (3, 0)


def test_one_nonfinite_factor_fails_alone_and_is_counted():
    clean, bad = trained(NKFAC, 6, 4), trained(NKFAC, 6, 4)
    before = {k: v.clone() for k, v in bad.layer_state['4'].items()}
    bad.layer_state['4']['R'][0, 0] = float('nan')
    clean.update_preconditioners(4)
    bad.update_preconditioners(4)
    counts = bad.fallbacks.counts
    assert counts['newton_fallback'] == 1 and counts['inverse_failure'] == 1
    assert clean.fallbacks.counts.get('inverse_failure', 0) == 0
    # the broken factor keeps its previous inverse, every other is as if
    # nothing had happened (same batch, bit for bit)
    assert torch.equal(bad.layer_state['4']['R_inv'], before['R_inv'])
    for name, st in clean.layer_state.items():
        for key in ('L_inv', 'R_inv'):
            if (name, key) != ('4', 'R_inv'):
                assert torch.equal(bad.layer_state[name][key], st[key]), (name, key)

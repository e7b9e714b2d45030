# Copyright (c) mmprecond contributors. All rights reserved.
"""``checkpoint_inverses=False``: factors only in the checkpoint.

What holds exactly: the first step after loading recomputes every inverse
exactly from its saved factor.  So a run resumed from a checkpoint taken at
an exact-refresh step equals the uninterrupted run bit for bit; elsewhere the
resumed run has done one extra exact refresh (checked against the formula).
"""
import io

import pytest
import torch
from test_afopt import TinyTransformer, seq_batches
from test_nkfac import batches, run, tiny_net

from mmprecond.linalg import damp, exact_inverse, lanczos_lmax
from mmprecond.logging import FallbackLog
from mmprecond.optim import (
    FSGD,
    KFAC,
    NKFAC,
    SGDM_BK,
    Ada_AFOpt,
    AdamR,
    AdamW_BK,
    AdaNKFAC,
    AFOpt,
    FAdam,
    Shampoo,
)

CASES = [
    (KFAC, tiny_net, batches, dict(lr=0.05)),
    (NKFAC, tiny_net, batches, dict(lr=0.05)),
    (AdaNKFAC, tiny_net, batches, dict(lr=1e-3, weight_decay=0.1)),
    (FSGD, tiny_net, batches, dict(lr=0.05, precondition_convs=True)),
    (FAdam, tiny_net, batches, dict(lr=1e-3, precondition_convs=True)),
    (AFOpt, TinyTransformer, seq_batches, dict(lr=0.05)),
    (Ada_AFOpt, TinyTransformer, seq_batches, dict(lr=1e-2)),
    (SGDM_BK, tiny_net, batches, dict(lr=0.05)),
    (AdamW_BK, tiny_net, batches, dict(lr=1e-3)),
    (Shampoo, tiny_net, batches, dict(lr=0.05)),
]
ROOTS = [SGDM_BK, AdamW_BK, Shampoo]


def tensor_bytes(layers):
    return sum(v.numel() * v.element_size() for st in layers.values()
               for v in st.values())


def checkpoint_at(cls, make, data, hp, stop):
    """Train ``stop`` steps, save and reload (weights_only) model + optimizer."""
    first = make()
    opt1 = cls(first.parameters(), model=first, **hp)
    run(first, opt1, data[:stop])
    buf = io.BytesIO()
    torch.save(dict(model=first.state_dict(), optim=opt1.state_dict()), buf)
    size = buf.tell()
    buf.seek(0)
    return torch.load(buf, weights_only=True), size


def resume(cls, make, hp, ckpt):
    second = make(seed=123)
    second.load_state_dict(ckpt['model'])
    opt = cls(second.parameters(), model=second, **hp)
    opt.load_state_dict(ckpt['optim'])
    return second, opt


@pytest.mark.parametrize('cls,make,data_fn,kw', CASES)
def test_resume_at_a_refresh_step_is_bit_identical(cls, make, data_fn, kw):
    data = data_fn(10)
    hp = dict(stat_interval=1, refresh_interval=3, **kw)
    ref = make()
    run(ref, cls(ref.parameters(), model=ref, **hp), data)

    light, light_size = checkpoint_at(
        cls, make, data, dict(hp, checkpoint_inverses=False), stop=6)
    full, full_size = checkpoint_at(cls, make, data, hp, stop=6)
    light_layers = light['optim']['preconditioner']['layers']
    full_layers = full['optim']['preconditioner']['layers']
    assert not any(k.endswith(('_inv', '_root'))
                   for st in light_layers.values() for k in st)
    assert set(light_layers) == set(full_layers)
    # the preconditioner part shrinks by the inverses (Kronecker: exactly half)
    inverse_bytes = sum(v.numel() * v.element_size()
                        for st in full_layers.values()
                        for k, v in st.items() if k.endswith(('_inv', '_root')))
    assert tensor_bytes(light_layers) == tensor_bytes(full_layers) - inverse_bytes
    assert light_size < full_size - inverse_bytes * 0.9
    if cls in (KFAC, NKFAC, AdaNKFAC, *ROOTS):
        # factors are packed (upper triangle); an inverse is packed too when
        # it is exactly symmetric (KFAC's Cholesky inverses), else whole
        # (Newton iterates, inverse roots): at most twice a packed factor
        assert tensor_bytes(full_layers) <= 3 * tensor_bytes(light_layers)

    # step 6 is a refresh step (6 % 3 == 0; for NKFAC an exact one, <= 2 T)
    second, opt2 = resume(cls, make, dict(hp, checkpoint_inverses=False), light)
    run(second, opt2, data[6:])
    for pa, pb in zip(ref.parameters(), second.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize('cls', [KFAC, NKFAC])
def test_elsewhere_the_resume_step_refreshes_exactly(cls):
    """Checkpoint between refreshes: the inverse used at the resume step is
    the exact damped inverse of the factor at that step (one extra refresh),
    not the uninterrupted run's older one."""
    data = batches(8)
    hp = dict(lr=0.05, stat_interval=1, refresh_interval=4,
              checkpoint_inverses=False)
    ckpt, _ = checkpoint_at(cls, tiny_net, data, hp, stop=5)
    model, opt = resume(cls, tiny_net, hp, ckpt)
    run(model, opt, data[5:6])
    for st in opt.layer_state.values():
        for side in ('L', 'R'):
            stat = st[side]
            want = exact_inverse(
                damp(stat, opt.damping, opt.damping_floor,
                     lanczos_lmax(stat)), FallbackLog('ref'))
            torch.testing.assert_close(st[side + '_inv'], want, rtol=0, atol=0)


def test_adamr_keeps_its_basis():
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    with pytest.raises(ValueError, match='eigenbasis'):
        build_optim_wrapper(tiny_net(), Config(dict(optim_wrapper=dict(
            constructor='PrecondOptimWrapperConstructor',
            optimizer=dict(type='AdamR', checkpoint_inverses=False)))).optim_wrapper)
    model = tiny_net()
    opt = AdamR(model.parameters(), model=model, stat_interval=1, refresh_interval=1)
    run(model, opt, batches(3))
    saved = opt.state_dict()['preconditioner']['layers']
    assert all({'U1', 'U2'} <= set(st) for st in saved.values())


@pytest.mark.parametrize('cls', ROOTS)
def test_roots_missing_after_resume_are_computed_at_once(cls):
    """Resumed between statistics steps, the inverse roots are recomputed at
    the first step, not left missing until the next statistics step."""
    data = batches(8)
    hp = dict(stat_interval=2, refresh_interval=4, lr=1e-3,
              checkpoint_inverses=False)
    ckpt, _ = checkpoint_at(cls, tiny_net, data, hp, stop=5)
    second, opt = resume(cls, tiny_net, hp, ckpt)
    assert opt.steps == 5 and not opt.is_stat_step(5)
    run(second, opt, data[5:6])
    for name, st in opt.layer_state.items():
        for side in ('L', 'R'):
            if side in st:
                assert side + opt.derived_suffix in st, (name, side)
                assert torch.isfinite(st[side + opt.derived_suffix]).all()

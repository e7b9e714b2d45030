# Copyright (c) mmprecond contributors. All rights reserved.
"""Checkpoints a user can afford, with resume still equal to no interruption.

* Exactly symmetric matrices (the factors; exact inverses) are saved as
  their upper triangle and come back bit for bit.
* NKFAC's default ``checkpoint_inverses='auto'`` leaves out the inverses it
  can rebuild exactly when loading, and keeps the Newton ones.
* Checkpoints written before packing still load.
* The size report names what is large.

The end-to-end check on the real Mask R-CNN R50 is
``tests/test_engine/test_checkpoint_size_mmdet.py`` (``slow``, ``zoo``).
"""
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmprecond.engine.checkpoint_size import (
    expected_state_report,
    saved_state_breakdown,
    saved_state_report,
)
from mmprecond.optim import KFAC, NKFAC, AdamR, AdaNKFAC
from mmprecond.optim.base import pack_symmetric, unpack_symmetric


def net(seed=0):
    """Factors of 16, 28, 37 and 577: wide enough for BLAS' symmetric Grams."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 6 * 6, 37))


def data(n=12):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g),
             torch.randint(0, 37, (8, ), generator=g)) for _ in range(n)]


def run(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def save_load(model, opt):
    buf = io.BytesIO()
    torch.save(dict(model=model.state_dict(), optim=opt.state_dict()), buf)
    size = buf.tell()
    buf.seek(0)
    return torch.load(buf, weights_only=True), size


def resumed_equals_uninterrupted(cls, hp, stop, transform=None):
    """Train ``stop`` steps, save, resume in a fresh process image, finish.

    Returns the saved checkpoint and its size; asserts that the loaded
    preconditioner state and the final weights equal the uninterrupted
    run's bit for bit.
    """
    batches = data()
    ref = net()
    run(ref, cls(ref.parameters(), model=ref, **hp), batches)
    first = net()
    opt1 = cls(first.parameters(), model=first, **hp)
    run(first, opt1, batches[:stop])
    ckpt, size = save_load(first, opt1)
    if transform is not None:
        ckpt = transform(ckpt, opt1)
    second = net(seed=5)
    second.load_state_dict(ckpt['model'])
    opt2 = cls(second.parameters(), model=second, **hp)
    opt2.load_state_dict(ckpt['optim'])
    assert set(opt2.layer_state) == set(opt1.layer_state)
    for name, st in opt1.layer_state.items():
        loaded = opt2.layer_state[name]
        if hp.get('checkpoint_inverses') is False:  # inverses at 1st step
            st = {k: v for k, v in st.items() if not k.endswith(('_inv', '_root'))}
        assert set(loaded) == set(st), name
        for key, value in st.items():
            assert torch.equal(loaded[key], value), (name, key)
    run(second, opt2, batches[stop:])
    for pa, pb in zip(ref.parameters(), second.parameters()):
        assert torch.equal(pa, pb)
    return ckpt, size


def test_pack_unpack_is_bit_exact():
    x = torch.randn(300, 97)
    gram = x.T @ x
    assert torch.equal(gram, gram.mT)
    packed = pack_symmetric(gram)
    assert packed.shape == (97 * 98 // 2, )
    assert torch.equal(unpack_symmetric(packed, [97, 97]), gram)
    with pytest.raises(ValueError, match='needs 4753 entries'):
        unpack_symmetric(packed[:-1], [97, 97])


def test_factors_are_saved_packed():
    """The factors' upper triangles only; a resume stays exact."""
    hp = dict(stat_interval=1, refresh_interval=3, checkpoint_inverses=False)
    ckpt, _ = resumed_equals_uninterrupted(NKFAC, hp, stop=6)
    pre = ckpt['optim']['preconditioner']
    assert pre['packed']['3'] == {'L': [37, 37], 'R': [577, 577]}
    assert pre['layers']['3']['R'].shape == (577 * 578 // 2, )
    saved = sum(v.numel() for st in pre['layers'].values() for v in st.values())
    whole = sum(d * d for d in (16, 28, 37, 577))
    assert saved == sum(d * (d + 1) // 2 for d in (16, 28, 37, 577)) < 0.51 * whole


@pytest.mark.parametrize('cls', [NKFAC, KFAC, AdaNKFAC])
def test_auto_leaves_out_the_inverses_it_rebuilds(cls):
    """Checkpoint after an exact refresh whose factors did not move since.

    Resumed at a statistics step that is not a refresh: rebuilding the
    inverses at the first step (after that step's fold) would differ, so
    this needs the rebuild at load, with the very batch of the refresh.
    """
    hp = dict(stat_interval=1, refresh_interval=4)
    if cls is not KFAC:
        hp['exact_inv_period'] = 100
    kw = dict(lr=1e-3) if cls is AdaNKFAC else dict(lr=0.05)
    # steps 0..4 ran; 4 folded then refreshed exactly (<= 2 T_inv)
    ckpt, auto_size = resumed_equals_uninterrupted(cls, dict(hp, **kw), stop=5)
    layers = ckpt['optim']['preconditioner']['layers']
    assert not any(k.endswith(('_inv', '_root')) for st in layers.values() for k in st)
    assert ckpt['optim']['preconditioner']['extras']['rebuilt_inverses']
    _, full_size = resumed_equals_uninterrupted(
        cls, dict(hp, checkpoint_inverses=True, **kw), stop=5)
    assert auto_size < 0.6 * full_size


def test_auto_keeps_newton_inverses():
    """After a Newton refresh the inverse depends on the previous one: kept."""
    hp = dict(lr=0.05, stat_interval=2, refresh_interval=2, exact_inv_period=100)
    ckpt, _ = resumed_equals_uninterrupted(NKFAC, hp, stop=7)  # Newton at 6
    pre = ckpt['optim']['preconditioner']
    for st in pre['layers'].values():
        assert {'L_inv', 'R_inv'} <= set(st)
    assert 'extras' not in pre


def test_auto_keeps_inverses_of_moved_factors():
    """Statistics folded after the exact refresh: the inverses are kept."""
    hp = dict(lr=0.05, stat_interval=1, refresh_interval=3)
    ckpt, _ = resumed_equals_uninterrupted(NKFAC, hp, stop=5)  # folds at 4
    for st in ckpt['optim']['preconditioner']['layers'].values():
        assert {'L_inv', 'R_inv'} <= set(st)


def _old_format(ckpt, opt):
    """What ``state_dict`` wrote before packing: every tensor whole."""
    pre = dict(ckpt['optim']['preconditioner'])
    pre.pop('packed')
    pre.pop('extras', None)
    pre['layers'] = {name: {k: v.clone() for k, v in st.items()}
                     for name, st in opt.layer_state.items()}
    return dict(ckpt, optim=dict(ckpt['optim'], preconditioner=pre))


@pytest.mark.parametrize('cls,hp,stop', [
    (NKFAC, dict(lr=0.05, stat_interval=1, refresh_interval=4), 5),
    (NKFAC, dict(lr=0.05, stat_interval=2, refresh_interval=2,
                 exact_inv_period=100), 7),
    (AdamR, dict(lr=1e-3, stat_interval=1, refresh_interval=3), 7),
])
def test_unpacked_checkpoints_still_load(cls, hp, stop):
    resumed_equals_uninterrupted(cls, hp, stop, transform=_old_format)


def test_adamr_factors_packed_bases_whole():
    """AdamR's factors pack; its orthogonal bases cannot and are kept."""
    hp = dict(lr=1e-3, stat_interval=1, refresh_interval=3)
    ckpt, _ = resumed_equals_uninterrupted(AdamR, hp, stop=7)
    pre = ckpt['optim']['preconditioner']
    assert set(pre['packed']['3']) == {'L', 'R'}
    assert pre['layers']['3']['U2'].shape == (577, 577)


def test_invalid_checkpoint_inverses():
    model = net()
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        NKFAC(model.parameters(), model=model, checkpoint_inverses='yes')


def test_size_reports_name_the_large_parts():
    model = net()
    opt = NKFAC(model.parameters(), model=model, stat_interval=1,
                refresh_interval=1, exact_inv_period=100)
    expected = expected_state_report(opt)
    assert '3.R (577x577) 0.6' in expected, expected  # 577*578/2*4 B
    run(model, opt, data(4))  # Newton at step 3: inverses kept, whole
    sd = opt.state_dict()
    kinds, entries = saved_state_breakdown(sd)
    assert entries[0] == ('3.R_inv', 577 * 577 * 4)
    assert kinds['factors'] == 4 * sum(d * (d + 1) // 2
                                       for d in (16, 28, 37, 577))
    report = saved_state_report(sd)
    assert 'largest: 3.R_inv 1.27 MiB' in report, report


def _ddp_rebuild_worker(rank, world, port, path):
    from ddp_recording import join_gloo, save_from_rank0
    join_gloo(rank, world, port)
    model = net()
    hp = dict(lr=0.05, stat_interval=1, refresh_interval=4, shard_refresh=True)
    opt = NKFAC(model.parameters(), model=model, **hp)
    run(model, opt, data(5))  # same batches on both ranks; exact refresh at 4
    sd = opt.state_dict()
    fresh = NKFAC(model.parameters(), model=model, **hp)
    fresh.load_state_dict(sd)  # the rebuild is sharded: broadcasts on load
    same = all(torch.equal(fresh.layer_state[n][k], v)
               for n, st in opt.layer_state.items() for k, v in st.items())
    omitted = sum(k.endswith(('_inv', '_root')) for st in opt.layer_state.values()
                  for k in st) - sum(k.endswith(('_inv', '_root')) for st in
                                     sd['preconditioner']['layers'].values()
                                     for k in st)
    save_from_rank0(dict(same=same, omitted=omitted), path)


def test_auto_rebuild_under_ddp(tmp_path):
    """Two gloo ranks: the sharded rebuild at load gives the saved inverses."""
    import torch.multiprocessing as mp
    from test_distributed import free_port
    path = str(tmp_path / 'out.pt')
    mp.spawn(_ddp_rebuild_worker, args=(2, free_port(), path), nprocs=2,
             join=True)
    for out in torch.load(path):
        assert out['same'] and out['omitted'] == 4, out  # every inverse

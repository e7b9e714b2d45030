# Copyright (c) mmprecond contributors. All rights reserved.
"""One contract for every optimizer in the registry (issue 18).

The optimizers come from MMEngine's root ``OPTIMIZERS`` (those mmprecond
registers, peers included when installed), so a new one is held to every case
without editing a list.  Cases:

1. degenerate settings (``max_factor_dim=1``: nothing preconditioned) equal
   ``torch.optim.SGD`` / ``AdamW`` bit for bit;
2. DDP (gloo, 2 ranks) equals one process on the concatenated batch, with a
   layer that gets no rows on one rank, and both ranks issue the same
   collectives;
3. AMP x DDP with a real ``GradScaler``: the scale is what the scaler alone
   gives, and an overflow step changes neither weights nor state;
4. resume equals uninterrupted, after a load whose tensors sit elsewhere than
   the optimizer put them (another dtype);
5. no host read on plain and statistics steps (by-design reads: exact count);
6. NaN / Inf in a gradient and in a factor never reach weights or state;
7. a checkpoint written by MMEngine's ``CheckpointHook`` in a real ``Runner``
   opens with ``weights_only=True`` and resumes through MMEngine exactly;
8. at its defaults the loss falls and everything stays finite.

An optimizer that cannot take a case is listed in :data:`EXCEPTIONS` with the
reason; the test then skips or xfails with it.  Nothing is skipped silently:
:func:`test_every_registered_optimizer_is_in_every_case` and
:func:`test_exceptions_table_has_no_stale_entries` keep the table honest.
"""
import io
from typing import Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from contract_spec import (
    BATCH,
    Net,
    base_kind,
    batches,
    build,
    flat_params,
    hyper,
    nonfinite,
    registered,
    signature,
    state_snapshot,
    tensors_of,
    train_step,
)
from mmengine.model import BaseModel
from mmengine.runner import Runner
from test_distributed import free_port
from torch import Tensor
from torch.utils.data import Dataset

from mmprecond.compat import safe_checkpoint_load
from mmprecond.profiling import DispatchCounter, counter_tensors

OPTIMIZERS = registered()
NAMES = list(OPTIMIZERS)
CASES = ('degenerate', 'ddp', 'ddp_collectives', 'amp_scale', 'amp_overflow',
         'resume', 'host_reads', 'nonfinite_grad', 'nonfinite_factor',
         'checkpoint', 'defaults')

_PEER = 'peer optimizer, run as its authors wrote it'

#: ``(optimizer, case) -> (kind, reason)``; kind ``'skip'`` (the case does
#: not apply) or ``'xfail'`` (a known defect: strict, so the fix flips it).
EXCEPTIONS: Dict[Tuple[str, str], Tuple[str, str]] = {
    # 1 degenerate: no setting that turns the preconditioner off
    **{(n, 'degenerate'): ('skip', f'{n} has no max_factor_dim (no setting '
                           'that leaves every layer unpreconditioned)')
       for n in ('AdaFisher', 'AdaFisherW', 'SGD_PH')},
    **{(n, 'degenerate'): ('skip', f'{_PEER}; no degenerate setting')
       for n in ('PeerSINGD', 'PeerSOAP', 'PeerShampoo', 'PeerMuon')},
    **{(n, 'degenerate'): ('skip', 'TNT runs its own momentum step, not '
                           "torch's foreach SGD: with weight_decay > 0 it "
                           'differs (3 % relative after 6 steps, measured); '
                           'without decay it equals SGD to 1e-5 '
                           '(test_tnt.py::test_degenerate_equals_sgd_momentum)')
       for n in ('TNT', 'TNT_EF')},
    **{(n, 'degenerate'): ('skip', 'K-BFGS decays outside the momentum '
                           '(W -= lr (p + wd W), thesis Alg. 9/10), unlike '
                           "torch's SGD: with weight_decay=1e-3 it differs "
                           '(1.7e-4 abs, 3 % relative after 6 steps, '
                           'measured); without decay and damping 1 it equals '
                           'SGD bit for bit with every layer excluded '
                           '(test_kbfgs.py::test_every_layer_excluded_is_sgd_'
                           'past_curvature_steps)')
       for n in ('KBFGS', 'KBFGS_L')},
    # TNT draws its labels at random: one process and two ranks (each its
    # own draw for its own rows) build different sampled Fishers; measured
    # 0.18 abs after 4 steps, ranks equal to each other.  TNT_EF (no
    # sampling) takes the case.
    ('TNT', 'ddp'): ('skip', 'sampled labels are random draws per rank, so '
                     'two ranks do not draw what one process draws on the '
                     'concatenated batch (0.18 abs after 4 steps, measured); '
                     'TNT_EF takes this case'),
    # SMW_NG / SMW_GN recompute their curvature from each batch: the only
    # state is lambda_LM (0-dim), whose non-finite value in a checkpoint is
    # reset at load (test_smw.py::test_nonfinite_lambda_in_checkpoint_...)
    **{(n, 'nonfinite_factor'): ('skip', f'{n} keeps no 2-D factor (the '
                                 'Gram is rebuilt from every batch)')
       for n in ('SMW_NG', 'SMW_GN')},
    # AdaFisher(W) at the suite's lr 5e-2 (diagnosed, issue 18): with the
    # released statistics rule F is about damping = 1e-3, so the step is
    # lr / damping = 50x the momentum, SGD at lr 50.  Measured on this
    # suite's Net, 4 steps: the largest parameter reaches 1.4e4; DDP vs one
    # process differ by 2e-2 abs on such entries (fp32 round-off of the
    # all-reduce, amplified), and the fp16 forward overflows a second time
    # (scales 1024, 1024, 512, 256).  At lr 5e-3 (step lr / damping = 5)
    # the same runs give |param| <= 1.5, DDP within 3.6e-7 of one process
    # and exactly the bare scaler's scales, for both optimizers.  Not a
    # defect of the DDP / AMP paths; the suite's one lr is outside
    # AdaFisher's range.  DDP at its own lr: test_ddp_extra_optimizers.py.
    **{(n, c): ('skip', 'the suite lr 5e-2 is SGD at lr 50 for AdaFisher '
                '(step lr / damping); parameters reach 1.4e4 in 4 steps '
                '(measured); at lr 5e-3 this case passes (see comment)')
       for n in ('AdaFisher', 'AdaFisherW') for c in ('ddp', 'amp_scale')},
    # AdamR vs one process after 4 steps, max abs per parameter (measured):
    # conv 1.7e-3, fc 1.6e-2, head 3.3e-3, aux 1.1e-2 - every layer, not
    # only aux.  Every factor here is rank-deficient (<= 32 rows for fc's 65
    # inputs); in its null space the eigenbasis is whatever round-off makes
    # it and the rotated gradient is rounding noise, which fresh Adam moments
    # turn into steps of about lr (the docstring's "exactly singular"
    # note).  A fix would leave null-space coordinates unstepped.
    ('AdamR', 'ddp'): ('xfail', 'found by this suite: up to 1.6e-2 from one '
                       'process after 4 steps in every layer; Adam steps of '
                       'about lr on round-off noise in the null space of '
                       'rank-deficient factors (diagnosed, not fixed)'),
    ('PeerSOAP', 'ddp'): ('skip', f'{_PEER}: 1.4e-2 from one process (an '
                          'eigenbasis method like AdamR, see there)'),
    # 5 host reads: the peers' own code reads the device
    **{(n, 'host_reads'): ('skip', f'{_PEER} (host reads by design)')
       for n in ('PeerSINGD', )},
    # 6 non-finite input
    **{(n, c): ('skip', f'{_PEER}: no non-finite handling of its own')
       for n in ('PeerSINGD', 'PeerSOAP', 'PeerShampoo', 'PeerMuon')
       for c in ('nonfinite_grad', 'nonfinite_factor')},
    **{(n, 'nonfinite_factor'): ('skip', f'{n} keeps no 2-D factor (its '
                                 'curvature is per-channel / diagonal)')
       for n in ('AdaFisher', 'AdaFisherW', 'SGD_PH')},
    # 4, 7 checkpoints: PeerSINGD's state pickles singd objects
    **{(n, 'resume'): ('skip', f'{_PEER}: its checkpoint pickles singd '
                       'objects that the safe loader refuses (README)')
       for n in ('PeerSINGD', )},
    **{(n, 'checkpoint'): ('skip', f'{_PEER}: its checkpoint pickles singd '
                           'objects that the safe loader refuses (README)')
       for n in ('PeerSINGD', )},
}

#: Exact host reads per counted iteration (plain, statistics, plain) for the
#: optimizers that read the device by design; every other optimizer: 0.
EXPECTED_READS: Dict[str, Tuple[int, ...]] = {
    # the compact L-BFGS update of K-BFGS(L)'s second pass (after step 7)
    'KBFGS_L': (0, 0, 4),
    # every step of SMW_NG / SMW_GN is a curvature step (lm_interval=1: the
    # rho-test's second forward each step); lambda_LM and rho stay on the
    # device, so none of them reads a value.  Their one host-side collective,
    # the row-layout handshake of the first step under DDP, reduces Python
    # ints over the CPU group (no device read).
    'SMW_NG': (0, 0, 0),
    'SMW_GN': (0, 0, 0),
}


def marks(name: str, case: str) -> list:
    """The pytest marks :data:`EXCEPTIONS` gives ``(name, case)``."""
    kind, reason = EXCEPTIONS.get((name, case), (None, ''))
    if kind == 'skip':
        return [pytest.mark.skip(reason=reason)]
    if kind == 'xfail':
        return [pytest.mark.xfail(strict=True, reason=reason)]
    return []


def each(case: str) -> list:
    """One parameter per registered optimizer, marked from the table."""
    return [pytest.param(n, marks=marks(n, case), id=n) for n in NAMES]


def test_every_registered_optimizer_is_in_every_case():
    for case in CASES:
        func = globals()[f'test_{case}']
        ids = [p.id for m in func.pytestmark if m.name == 'parametrize'
               for p in m.args[1]]
        assert ids == NAMES, case
    assert {'NKFAC', 'KBFGS', 'TNT', 'SGD_PH', 'AdaFisher'} <= set(NAMES)


def test_exceptions_table_has_no_stale_entries():
    for (name, case), (kind, reason) in EXCEPTIONS.items():
        assert name in OPTIMIZERS, f'{name} is no longer registered'
        assert case in CASES, f'{case} is not a case'
        assert kind in ('skip', 'xfail') and reason, (name, case)
    for name in EXPECTED_READS:
        assert name in OPTIMIZERS, f'{name} is no longer registered'


# ------------------------------------------------------------ 1 degenerate
@pytest.mark.parametrize('name', each('degenerate'))
def test_degenerate(name):
    cls = OPTIMIZERS[name]
    if 'max_factor_dim' not in signature(cls):
        pytest.fail(f'{name} has no max_factor_dim: list it in EXCEPTIONS')
    a, b = Net(0), Net(0)
    if base_kind(cls) == 'adamw':
        kw = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-7, weight_decay=0.1)
        ref = torch.optim.AdamW(b.parameters(), **kw)
    else:
        kw = dict(lr=5e-2, momentum=0.9, weight_decay=1e-3)
        ref = torch.optim.SGD(b.parameters(), **kw)
    opt = build(cls, a, max_factor_dim=1, **kw)
    for batch in batches(6):
        train_step(a, opt, batch)
        train_step(b, ref, batch)
    torch.testing.assert_close(flat_params(a), flat_params(b), rtol=0, atol=0)


# ---------------------------------------------------------- 2, 3 DDP / AMP
@pytest.fixture(scope='session')
def dist_results(tmp_path_factory) -> Dict[str, Tuple[Dict, Dict]]:
    """Both ranks' results, every optimizer through one shared process group."""
    from contract_dist import run_all

    out = tmp_path_factory.mktemp('contract_dist')
    return run_all(str(out), NAMES, free_port)


def _rank_results(dist_results, name: str, case: str) -> Tuple[Dict, Dict]:
    r0, r1 = (r[case] for r in dist_results[name])
    for r in (r0, r1):
        assert 'error' not in r, r.get('error')
    return r0, r1


@pytest.mark.parametrize('name', each('ddp'))
def test_ddp(name, dist_results):
    from contract_dist import DDP_STEPS

    r0, r1 = _rank_results(dist_results, name, 'ddp')
    assert torch.equal(r0['params'], r1['params']), 'ranks diverged'
    model = Net(0)
    opt = build(OPTIMIZERS[name], model)
    for batch in batches(DDP_STEPS):
        train_step(model, opt, batch, 1 / len(batch[0]))
    torch.testing.assert_close(r0['params'], flat_params(model), rtol=1e-4,
                               atol=2e-5)


@pytest.mark.parametrize('name', each('ddp_collectives'))
def test_ddp_collectives(name, dist_results):
    r0, r1 = _rank_results(dist_results, name, 'ddp')
    assert r0['calls'] == r1['calls']


def _amp_cases(dist_results, name: str):
    cases = [c for c in dist_results[name][0] if c.startswith('amp_')]
    assert cases, 'no autocast dtype ran'
    return cases


@pytest.mark.parametrize('name', each('amp_scale'))
def test_amp_scale(name, dist_results):
    for case in _amp_cases(dist_results, name):
        r0, r1 = _rank_results(dist_results, name, case)
        assert r0['scales'] == r0['expected'], (case, r0['scales'])
        assert r1['scales'] == r1['expected'], (case, r1['scales'])
        assert torch.equal(r0['params'], r1['params']), (case, 'ranks diverged')


@pytest.mark.parametrize('name', each('amp_overflow'))
def test_amp_overflow(name, dist_results):
    for case in _amp_cases(dist_results, name):
        for r in _rank_results(dist_results, name, case):
            assert r['changed'] == [], (case, r['changed'])
            assert torch.isfinite(r['params']).all(), case


# ---------------------------------------------------------------- 4 resume
@pytest.mark.parametrize('name', each('resume'))
def test_resume(name):
    cls, data, split = OPTIMIZERS[name], batches(6), 3
    ref = Net(0)
    opt_ref = build(cls, ref)
    for batch in data:
        train_step(ref, opt_ref, batch)
    first = Net(0)
    opt1 = build(cls, first)
    for batch in data[:split]:
        train_step(first, opt1, batch)
    buf = io.BytesIO()
    torch.save(dict(model=first.state_dict(), optim=opt1.state_dict()), buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True, map_location='cpu')
    second = Net(123)
    second.load_state_dict(ckpt['model'])
    opt2 = build(cls, second)
    opt2.load_state_dict(ckpt['optim'])
    moved = [k for k, t in tensors_of(opt2.state_dict()).items()
             if t.device != second.fc.weight.device]
    assert moved == [], 'state not on the parameters\' device'
    for st in opt2.state.values():
        step = st.get('step') if isinstance(st, dict) else None
        if isinstance(step, torch.Tensor):  # where torch's foreach AdamW wants it
            assert step.device.type == 'cpu' and step.dim() == 0
    for batch in data[split:]:
        train_step(second, opt2, batch)
    torch.testing.assert_close(flat_params(second), flat_params(ref), rtol=0,
                               atol=1e-6)


# ------------------------------------------------------------ 5 host reads
@pytest.mark.parametrize('name', each('host_reads'))
def test_host_reads(name):
    cls = OPTIMIZERS[name]
    model = Net(0)
    intervals = dict(stat_interval=2, refresh_interval=4,
                     curvature_interval=4)
    opt = build(cls, model, **intervals)
    data = batches(8)
    for batch in data[:5]:  # past the refresh at step 4
        train_step(model, opt, batch)
    counts = []
    for batch in data[5:8]:  # steps 5 (plain), 6 (statistics), 7 (plain)
        with DispatchCounter(counter_tensors(opt)) as counter:
            train_step(model, opt, batch)
        counts.append(counter.host_reads)
    assert tuple(counts) == EXPECTED_READS.get(name, (0, 0, 0)), counts


# ------------------------------------------------------------- 6 nonfinite
@pytest.mark.parametrize('name', each('nonfinite_grad'))
def test_nonfinite_grad(name):
    model = Net(0)
    opt = build(OPTIMIZERS[name], model)
    data = batches(6)
    for batch in data[:2]:
        train_step(model, opt, batch)

    def poison(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad.view(-1)[0] = float('nan')
        grad.view(-1)[-1] = float('inf')
        return grad

    handle = model.fc.weight.register_hook(poison)
    train_step(model, opt, data[2])
    handle.remove()
    for batch in data[3:]:
        train_step(model, opt, batch)
    assert nonfinite(model, opt) == []


def _a_factor(state_dict: Dict, model: torch.nn.Module) -> str:
    """Path of a saved curvature tensor (2-D, not shaped like a parameter).

    A symmetric matrix saved packed (``preconditioner.packed``, 1-D upper
    triangle) counts too.
    """
    shapes = {tuple(p.shape) for p in model.parameters()}
    packed = {f'/preconditioner/layers/{layer}/{key}'
              for layer, keys in (state_dict.get('preconditioner') or {}).get(
                  'packed', {}).items() for key in keys}
    for path, t in tensors_of(state_dict).items():
        if (t.is_floating_point() and t.dim() == 2
                and tuple(t.shape) not in shapes) or path in packed:
            return path
    pytest.fail('no factor in the state_dict: list the optimizer in EXCEPTIONS')


@pytest.mark.parametrize('name', each('nonfinite_factor'))
def test_nonfinite_factor(name):
    """A factor that is NaN / Inf in a checkpoint never reaches the weights.

    (In memory, a factor is only checked with ``skip_nonfinite_steps=True``,
    at one host read a step; a checkpoint is checked when loaded.)
    """
    cls = OPTIMIZERS[name]
    model = Net(0)
    opt = build(cls, model)
    data = batches(7)
    for batch in data[:3]:
        train_step(model, opt, batch)
    sd = opt.state_dict()
    factor = tensors_of(sd)[_a_factor(sd, model)]
    factor.view(-1)[0] = float('nan')  # first and last entry, whole or packed
    factor.view(-1)[-1] = float('inf')
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    opt = build(cls, model)
    opt.load_state_dict(torch.load(buf, weights_only=True))
    for batch in data[3:]:  # statistics, a refresh, plain steps
        train_step(model, opt, batch)
    assert nonfinite(model, opt) == []


# ------------------------------------------------------------ 7 checkpoint
class RunnerNet(BaseModel):
    """:class:`Net` as an MMEngine model: ``mode='loss'`` gives the CE loss.

    Its layers keep :class:`Net`'s names (TNT finds its logits at ``head``).
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        net = Net(seed)
        self.conv, self.fc, self.head, self.aux = (net.conv, net.fc, net.head,
                                                   net.aux)

    def forward(self, inputs: Tensor, y: Tensor, mode: str = 'tensor'):
        rows = torch.arange(len(inputs) // 4)  # a host int: no device read
        out = Net.forward(self, inputs, rows)
        if mode == 'loss':
            return dict(loss=F.cross_entropy(out, y))
        return out


class RunnerData(Dataset):
    """The samples of :func:`batches`, one per index, unshuffled."""

    def __init__(self, n: int) -> None:
        self.samples = [(x[i], y[i]) for x, y, _ in batches(n)
                        for i in range(len(x))]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> Dict[str, Tensor]:
        x, y = self.samples[idx]
        return dict(inputs=x, y=y)


def build_runner(name: str, work_dir: str, seed: int, max_iters: int,
                 load_from: Optional[str] = None) -> Runner:
    """A real MMEngine ``Runner`` for ``name``, built as a user config would.

    The optimizer comes from the project's constructor; the optim wrapper
    and hooks are what the optimizer's own protocol asks for (the Hessian
    wrapper for ``prepares_hessian``, :class:`SecondPassHook` for
    ``uses_second_pass``; see :mod:`mmprecond.protocol`), so a new optimizer
    needs no entry here.
    """
    cls = OPTIMIZERS[name]
    wrapper = ('HessianOptimWrapper' if getattr(cls, 'prepares_hessian', False)
               else 'OptimWrapper')
    hooks = ([dict(type='SecondPassHook')]
             if getattr(cls, 'uses_second_pass', False) else [])
    kw = hyper(cls)
    if 'logits_module' in signature(cls):  # the model returns a loss dict
        kw['logits_module'] = 'head'
    return Runner(
        model=RunnerNet(seed),
        work_dir=work_dir,
        experiment_name=f'{name}_{seed}',
        train_dataloader=dict(
            dataset=RunnerData(max_iters),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=BATCH, num_workers=0,
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(
            type=wrapper, constructor='PrecondOptimWrapperConstructor',
            optimizer=dict(type=name, **kw)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(
            checkpoint=dict(type='CheckpointHook', interval=max_iters,
                            by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=hooks,
        log_processor=dict(by_epoch=False),
        randomness=dict(seed=seed),
        load_from=load_from,
        resume=load_from is not None,
        default_scope='mmengine')


@pytest.mark.parametrize('name', each('checkpoint'))
def test_checkpoint(name, tmp_path):
    """``CheckpointHook``'s file resumes through MMEngine, safe loader on.

    A real ``Runner`` trains 3 iterations (statistics, a refresh) and its
    ``CheckpointHook`` writes ``iter_3.pth``; the file must open with
    ``torch.load(weights_only=True)`` and no type outside MMEngine's own
    allow-list (the optimizer state holds tensors and plain types only),
    and a second ``Runner`` (other initial weights) resumed from it through
    MMEngine must end with the same weights and the same optimizer state,
    tensor for tensor.
    """
    first = build_runner(name, str(tmp_path / 'a'), seed=0, max_iters=3)
    first.train()
    path = tmp_path / 'a' / 'iter_3.pth'
    # weights_only=True with only MMEngine's own types allowed (compat)
    raw = safe_checkpoint_load(torch.load, str(path), map_location='cpu')
    assert {'state_dict', 'optimizer', 'meta'} <= raw.keys()
    again = build_runner(name, str(tmp_path / 'b'), seed=5, max_iters=3,
                         load_from=str(path))
    again.train()  # resumes at iteration 3 of 3: loads, trains nothing
    assert again.iter == 3
    opt, opt2 = (r.optim_wrapper.optimizer for r in (first, again))
    torch.testing.assert_close(flat_params(again.model),
                               flat_params(first.model), rtol=0, atol=0)
    before, after = state_snapshot(opt), state_snapshot(opt2)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


# -------------------------------------------------------------- 8 defaults
@pytest.mark.parametrize('name', each('defaults'))
def test_defaults(name):
    cls = OPTIMIZERS[name]
    model = Net(0)
    opt = build(cls, model, short=False)
    assert hyper(cls, short=False) == {}
    batch = batches(1, size=32)[0]
    losses = [float(train_step(model, opt, batch)) for _ in range(30)]
    assert losses[-1] < losses[0], losses[::5]
    assert nonfinite(model, opt) == []


# Copyright (c) mmprecond contributors. All rights reserved.
"""FSGD / FAdam / AFOpt / Ada_AFOpt: closed forms, equivalences, resume."""
import io
import uuid

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.logging import MMLogger
from mmengine.registry import OPTIMIZERS

from mmprecond.optim import FSGD, Ada_AFOpt, AFOpt, FAdam
from mmprecond.optim.afopt import softmax_jacobian_gram


# ----------------------------------------------------------------- fixtures
def tiny_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(6, 4, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 8), nn.GELU(), nn.Linear(8, 5))


def cnn_batches(n, seed=1, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g),
             torch.randint(0, 5, (size, ), generator=g)) for _ in range(n)]


class TinyTransformer(nn.Module):
    """One pre-norm block (torch MHA + MLP) and a classifier on the mean token."""

    def __init__(self, dim=8, heads=2, classes=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(4, dim)
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                 nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.embed(x)
        n = self.norm(h)
        h = h + self.attn(n, n, n, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.head(h.mean(1))


def seq_batches(n, seed=1, size=8, tokens=6):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, tokens, 4, generator=g)
        out.append((x, (x[..., 0].sum(1) > 0).long() + (x[..., 1].mean(1) > 0.3)))
    return out


def run(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def groups(model):
    decay = [p for n, p in model.named_parameters() if not n.endswith('bias')]
    no_decay = [p for n, p in model.named_parameters() if n.endswith('bias')]
    return [dict(params=decay), dict(params=no_decay, weight_decay=0.0, lr=0.03)]


def assert_same_params(a, b, atol=1e-6):
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=atol, msg=na)


# -------------------------------------------------- softmax Jacobian statistic
def test_softmax_jacobian_gram_matches_autograd_jacobians():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 5)
    logits[..., -1] = float('-inf')  # a masked key
    probs, v = logits.softmax(-1), torch.randn(2, 3, 5, 4)
    got = softmax_jacobian_gram(probs, v)
    for b in range(2):
        for h in range(3):
            ref = 0
            for i in range(5):
                row = logits[b, h, i, :-1]
                j = torch.autograd.functional.jacobian(lambda t: t.softmax(-1), row)
                jv = j @ v[b, h, :-1]
                ref = ref + F.pad(jv @ jv.T, (0, 1, 0, 1))
            torch.testing.assert_close(got[b, h], ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------- one-head closed forms
def _damped_inv(s, eta=0.01, floor=1e-4):
    s = s / s.norm()
    lam = torch.linalg.eigvalsh(s.double()).max().float()
    return torch.linalg.inv(s + max(floor, eta * lam) * torch.eye(len(s)))


def _recover(pg, g):
    return pg * g.norm() / pg.norm()


def test_one_head_qkv_directions_equal_the_closed_forms():
    torch.manual_seed(0)
    e, n, b = 4, 5, 3
    attn = nn.MultiheadAttention(e, 1, batch_first=True)
    model = nn.ModuleDict(dict(attn=attn))
    x = torch.randn(b, n, e)
    lr, jitter = 0.1, 1e-4
    opt = AFOpt(model.parameters(), model=model, lr=lr, momentum=0.0,
                weight_decay=0.0, stat_interval=1, refresh_interval=1,
                value_jitter=jitter)
    assert list(opt.attention) == ['attn'] and 'attn.out_proj' in opt.layers
    out = attn(x, x, x)[0]
    out.sin().sum().backward()
    w0, b0 = attn.in_proj_weight.detach().clone(), attn.in_proj_bias.detach().clone()
    gw, gb = attn.in_proj_weight.grad.clone(), attn.in_proj_bias.grad.clone()
    opt.step()

    # --- the closed forms, from autograd's softmax Jacobians
    q, k, v = (x @ w0[i * e:(i + 1) * e].T + b0[i * e:(i + 1) * e]
               for i in range(3))
    scale = e**-0.5
    logits = scale * q @ k.transpose(1, 2)
    probs = logits.softmax(-1)
    lqq, lkk = torch.zeros(e, e), torch.zeros(e, e)
    for bi in range(b):
        for i in range(n):
            j = torch.autograd.functional.jacobian(lambda t: t.softmax(-1),
                                                   logits[bi, i])
            bq = scale * v[bi].T @ j @ k[bi]  # d o_i / d q_i
            bk = scale * v[bi].T @ j @ q[bi]  # the thesis' analogue for W_K
            lqq += bq.T @ bq
            lkk += bk.T @ bk
    xr = torch.cat([x.reshape(-1, e), torch.ones(b * n, 1)], 1)
    rxx = xr.T @ xr
    wv, bv = w0[2 * e:], b0[2 * e:]
    xp = (probs @ v).reshape(-1, e)
    y = torch.linalg.solve(wv.T @ wv + jitter * torch.eye(e), wv.T @ (xp - bv).T).T
    yr = torch.cat([y, torch.ones(b * n, 1)], 1)
    rvv = yr.T @ yr
    g = torch.cat([gw, gb[:, None]], 1)
    gq, gk, gv = g[:e], g[e:2 * e], g[2 * e:]
    dxx = _damped_inv(rxx)
    expect = torch.cat([_recover(_damped_inv(lqq) @ gq @ dxx, gq),
                        _recover(_damped_inv(lkk) @ gk @ dxx, gk),
                        _recover(gv @ _damped_inv(rvv), gv)])
    moved = torch.cat([w0 - attn.in_proj_weight, (b0 - attn.in_proj_bias)[:, None]],
                      1) / lr
    # power iteration vs eigvalsh for lambda_max: small differences
    torch.testing.assert_close(moved, expect, rtol=2e-3, atol=2e-4)
    assert not torch.allclose(moved, g, atol=1e-3)  # it did precondition


def test_value_statistic_is_x_as_for_one_head():
    """Eq. 5.13: without bias and jitter, R_VV is E[(X A_s)(X A_s)^T]."""
    torch.manual_seed(1)
    e, n, b = 4, 6, 2
    attn = nn.MultiheadAttention(e, 1, bias=False, batch_first=True)
    w = attn.in_proj_weight.detach().clone()
    opt = AFOpt(attn.parameters(), model=attn, lr=0.0, stat_interval=1,
                stat_decay=0.0, value_jitter=1e-9)
    x = torch.randn(b, n, e)
    attn(x, x, x)[0].sum().backward()
    opt.step()
    q, k = x @ w[:e].T, x @ w[e:2 * e].T
    probs = (q @ k.transpose(1, 2) * e**-0.5).softmax(-1)
    xa = (probs @ x).reshape(-1, e)  # rows sum_j s_ij x_j
    torch.testing.assert_close(opt.layer_state['']['RV'], xa.T @ xa / (b * n),
                               rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(opt.layer_state['']['R'],
                               x.reshape(-1, e).T @ x.reshape(-1, e) / (b * n))


# ------------------------------------------------------------- equivalences
@pytest.mark.parametrize('nesterov', [False, True])
def test_fsgd_with_identity_statistics_is_sgd(nesterov):
    c = 6
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(c, 3, bias=False))
    b = nn.Sequential(nn.Linear(c, 3, bias=False))
    b.load_state_dict(a.state_dict())
    opt_a = FSGD(a.parameters(), model=a, lr=0.05, momentum=0.9, weight_decay=1e-3,
                 nesterov=nesterov, stat_interval=1, refresh_interval=2)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9,
                            weight_decay=1e-3, nesterov=nesterov)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        # rows: a permutation of sqrt(c) e_i, so E[x x^T] = I at every step
        x = c**0.5 * torch.eye(c)[torch.randperm(c, generator=g)]
        y = torch.randint(0, 3, (c, ), generator=g)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert 'R_inv' in opt_a.layer_state['0']
    assert_same_params(a, b)


def test_fadam_without_preconditioning_is_adamw_and_fsgd_is_sgd():
    data = cnn_batches(6)
    for ours, ref, kw in [
        (FAdam, torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-7,
                                        weight_decay=0.1)),
        (FSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ]:
        a, b = tiny_cnn(), tiny_cnn()
        opt_a = ours(groups(a), model=a, max_factor_dim=1, stat_interval=1, **kw)
        assert not opt_a.layers
        run(a, opt_a, data)
        run(b, ref(groups(b), **kw), data)
        assert_same_params(a, b, atol=0)  # torch's own foreach arithmetic


def test_fsgd_step_matches_hand_computation():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    opt = FSGD(lin.parameters(), model=lin, lr=0.1, momentum=0.0, weight_decay=0.0)
    x = torch.randn(16, 4)
    lin(x).sin().sum().backward()
    w0 = torch.cat([lin.weight, lin.bias[:, None]], 1).detach().clone()
    g = torch.cat([lin.weight.grad, lin.bias.grad[:, None]], 1)
    opt.step()
    xr = torch.cat([x, torch.ones(16, 1)], 1)
    h = _recover(g @ _damped_inv(xr.T @ xr / 16), g)
    w1 = torch.cat([lin.weight, lin.bias[:, None]], 1).detach()
    torch.testing.assert_close(w1, w0 - 0.1 * h, rtol=0, atol=2e-4)
    assert not torch.allclose(w1, w0 - 0.1 * g, atol=1e-3)


def _log_lines(tmp_path, build):
    """Run ``build()`` with a fresh current MMLogger; return its log lines."""
    log_file = tmp_path / f'{uuid.uuid4().hex}.log'
    logger = MMLogger.get_instance(f'afopt-test-{uuid.uuid4().hex}',
                                   log_file=str(log_file))
    result = build()
    for h in logger.handlers:
        h.flush()
    return result, log_file.read_text().splitlines()


@pytest.mark.parametrize('ours,twin,kw', [
    (AFOpt, FSGD, dict(lr=0.05, weight_decay=1e-3)),
    (Ada_AFOpt, FAdam, dict(lr=1e-2, weight_decay=0.05)),
])
def test_without_attention_one_warning_then_exactly_fsgd(tmp_path, ours, twin, kw):
    data = cnn_batches(12, size=16)
    hp = dict(stat_interval=2, refresh_interval=3, **kw)
    a, b = tiny_cnn(), tiny_cnn()

    def train():
        opt = ours(a.parameters(), model=a, **hp)
        run(a, opt, data)
        return opt

    opt_a, lines = _log_lines(tmp_path, train)
    warnings = [ln for ln in lines if 'no supported self-attention' in ln]
    assert len(warnings) == 1 and f"type='{twin.__name__}'" in warnings[0]
    assert opt_a.fallbacks.counts['no_attention'] == 1
    run(b, twin(b.parameters(), model=b, **hp), data)
    assert_same_params(a, b)
    x, y = data[0]
    assert F.cross_entropy(a(x), y) < F.cross_entropy(tiny_cnn()(x), y)


# ------------------------------------------------------------ real training
@pytest.mark.parametrize('cls,kw', [(AFOpt, dict(lr=0.2, weight_decay=1e-4)),
                                    (Ada_AFOpt, dict(lr=1e-2, weight_decay=0.05))])
def test_tiny_transformer_trains_and_preconditions_qkv(cls, kw):
    model = TinyTransformer()
    opt = cls(model.parameters(), model=model, stat_interval=2,
              refresh_interval=4, **kw)
    assert list(opt.attention) == ['attn']
    assert set(opt.layers) == {'embed', 'attn.out_proj', 'mlp.0', 'mlp.2', 'head'}
    data = seq_batches(4, size=32) * 15
    x, y = data[0]
    first = F.cross_entropy(model(x), y).item()
    run(model, opt, data)
    st = opt.layer_state['attn']
    assert st['LQ_inv'].shape == (2, 4, 4) and st['R_inv'].shape == (9, 9)
    # torch applies out_proj functionally; AFOpt feeds its FSGD statistics
    assert opt.layer_state['attn.out_proj']['R'].shape == (9, 9)
    assert not any(k.startswith(('nonfinite', 'attention_call'))
                   for k in opt.fallbacks.counts)
    assert F.cross_entropy(model(x), y).item() < 0.7 * first


@pytest.mark.parametrize('cls,kw', [(AFOpt, dict(lr=0.05)),
                                    (Ada_AFOpt, dict(lr=1e-2, weight_decay=0.1))])
def test_resume_equals_uninterrupted(cls, kw):
    data = seq_batches(16)
    hp = dict(stat_interval=2, refresh_interval=3, **kw)
    ref = TinyTransformer()
    run(ref, cls(ref.parameters(), model=ref, **hp), data)

    first = TinyTransformer()
    opt1 = cls(first.parameters(), model=first, **hp)
    run(first, opt1, data[:7])  # stops between statistics steps
    buf = io.BytesIO()
    torch.save(dict(model=first.state_dict(), optim=opt1.state_dict()), buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert set(ckpt['optim']['preconditioner']['layers']['attn']) == {
        'R', 'LQ', 'LK', 'RV', 'R_inv', 'LQ_inv', 'LK_inv', 'RV_inv'}
    second = TinyTransformer(seed=123)
    second.load_state_dict(ckpt['model'])
    opt2 = cls(second.parameters(), model=second, **hp)
    opt2.load_state_dict(ckpt['optim'])
    assert opt2.steps == 7 and 'attn' in opt2.layer_state
    run(second, opt2, data[7:])
    assert_same_params(ref, second)


def test_skipped_step_statistics_are_dropped():
    model = TinyTransformer()
    opt = AFOpt(model.parameters(), model=model, stat_interval=1)
    x, y = seq_batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    assert opt.attention_sums['attn'].rows == 48
    opt.zero_grad()  # e.g. the AMP scaler skipped the step
    assert opt.attention_sums['attn'].rows == 0 and opt.steps == 0
    model.eval()
    F.cross_entropy(model(x), y).backward()
    assert opt.attention_sums['attn'].rows == 0


def test_conv_option_and_registry():
    model = tiny_cnn()
    assert set(FSGD(model.parameters(), model=model).layers) == {'5', '7'}
    opt = FAdam(model.parameters(), model=model, precondition_convs=True,
                stat_interval=1)
    assert set(opt.layers) == {'0', '2', '5', '7'}
    run(model, opt, cnn_batches(2))
    assert opt.layer_state['0']['R'].shape == (3 * 9 + 1, ) * 2
    for name in ('FSGD', 'FAdam', 'AFOpt', 'Ada_AFOpt'):
        assert OPTIMIZERS.get(name) is not None
    with pytest.raises(ValueError, match='value_jitter'):
        AFOpt(model.parameters(), model=model, value_jitter=0.0)
    with pytest.raises(ValueError, match='stat_decay'):
        FSGD(model.parameters(), model=model, stat_decay=1.0)


def test_mmdet_swin_backbone_steps():
    swin = pytest.importorskip('mmdet.models.backbones.swin')
    torch.manual_seed(0)
    model = swin.SwinTransformer(embed_dims=16, depths=(2, 2), num_heads=(1, 2),
                                 window_size=4, strides=(4, 2), out_indices=(1, ))
    opt = Ada_AFOpt(model.parameters(), model=model, lr=1e-3, stat_interval=1,
                    refresh_interval=2)
    assert len(opt.attention) == 4
    assert not any(n.endswith('qkv') for n in opt.layers)
    assert any(n.endswith('ffn.layers.1') for n in opt.layers)
    model.train()
    img = torch.randn(2, 3, 32, 32)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(img)[0].pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    st = opt.layer_state['stages.1.blocks.0.attn.w_msa']
    assert st['LQ'].shape == (2, 16, 16) and st['RV'].shape == (33, 33)
    assert losses[-1] < losses[0]
    assert not opt.fallbacks.counts.get('nonfinite_statistics')


# ---------------------------------------------------------------------- DDP
def _ddp_worker(rank, world, port, steps, result_path):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = TinyTransformer()
    ddp = DDP(model)
    opt = Ada_AFOpt(model.parameters(), model=model, lr=1e-2, stat_interval=1,
                    refresh_interval=2)
    for x, y in seq_batches(steps, size=8):
        opt.zero_grad()
        F.cross_entropy(ddp(x.chunk(2)[rank]), y.chunk(2)[rank]).backward()
        opt.step()
    if rank == 0:
        torch.save(dict(params=[p.detach() for p in model.parameters()],
                        state=opt.layer_state['attn']), result_path)
    dist.destroy_process_group()


def test_ddp_equals_single_process_on_concatenated_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    steps, path = 4, str(tmp_path / 'result.pt')
    mp.spawn(_ddp_worker, args=(2, port, steps, path), nprocs=2, join=True)
    res = torch.load(path)
    model = TinyTransformer()
    opt = Ada_AFOpt(model.parameters(), model=model, lr=1e-2, stat_interval=1,
                    refresh_interval=2)
    run(model, opt, seq_batches(steps, size=8))
    for key, value in opt.layer_state['attn'].items():  # summed over ranks
        err = (res['state'][key] - value).norm() / value.norm()
        assert err < 1e-4, (key, float(err))
    for got, p in zip(res['params'], model.parameters()):
        torch.testing.assert_close(got, p.detach(), rtol=1e-4, atol=1e-4)

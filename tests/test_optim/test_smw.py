# Copyright (c) mmprecond contributors. All rights reserved.
"""SMW_NG: the SMW direction equals the dense damped empirical-Fisher solve;
the thesis' LM rule; the rho-test; no host reads."""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from ddp_recording import join_gloo
from test_distributed import free_port
from torch.func import functional_call, grad, jacrev, vmap

from mmprecond.optim import SMW_GN, SMW_NG
from mmprecond.optim.smw import (
    GRAM_CHUNK_ELEMENTS,
    jacobian_t_vector,
    jacobian_vector,
    sample_gram,
    softmax_hessian_factor,
)
from mmprecond.profiling import DispatchCounter, counter_tensors


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7),
                         nn.Linear(7, 3)).double()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).double()


def batch(model_name: str, n: int = 10):
    g = torch.Generator().manual_seed(1)
    shape = (n, 5) if model_name == 'mlp' else (n, 2, 5, 5)
    return (torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n, ), generator=g))


def covered(model: nn.Module):
    return [p for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            for p in m.parameters(recurse=False)]


def dense_jacobian(model, x, y, params):
    """Per-sample gradients of the covered params (torch.func), ``N x n``.

    ``params`` are the covered parameters of the model ``model`` copies.
    """
    name_of = {id(p): n for (n, _), p in zip(model.named_parameters(),
                                            model.original_params)}
    current = dict(model.named_parameters())
    wanted = {name_of[id(p)]: current[name_of[id(p)]].detach() for p in params}
    rest = {n: p.detach() for n, p in current.items() if n not in wanted}

    def f(w, xi, yi):
        out = functional_call(model, {**w, **rest}, (xi[None], ))
        return F.cross_entropy(out, yi[None])

    per = vmap(grad(f), in_dims=(None, 0, 0))(wanted, x, y)
    return torch.cat([per[name_of[id(p)]].flatten(1) for p in params], 1)


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize('model_name', ['mlp', 'cnn'])
@pytest.mark.parametrize('n2', [4, None])
def test_direction_equals_dense_damped_fisher_solve(model_name, n2):
    model = mlp() if model_name == 'mlp' else cnn()
    x, y = batch(model_name)
    opt = SMW_NG(model.parameters(), model=model, lr=1.0, damping=0.3,
                 curvature_samples=n2, lm_interval=0)
    params = covered(model)
    others = [p for p in model.parameters()
              if all(p is not q for q in params)]
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    g = flat([p.grad for p in params])
    g_other = [p.grad.clone() for p in others]
    opt.step()
    k = x.shape[0] if n2 is None else n2
    jac = dense_jacobian(model_from(model, before), x[:k], y[:k], params)
    lam = 0.3 + 1e-3
    dense = torch.linalg.solve(
        lam * torch.eye(jac.shape[1], dtype=torch.float64) + jac.T @ jac / k, g)
    moved = dict(zip(map(id, model.parameters()), before))
    step = flat([moved[id(p)] - p.detach() for p in params])
    assert torch.linalg.norm(step - dense) <= 1e-5 * torch.linalg.norm(dense)
    # parameters the layers do not cover take the plain SGD step (lr 1)
    for p, gp in zip(others, g_other):
        assert torch.allclose(moved[id(p)] - p.detach(), gp, rtol=1e-12)
    if model_name == 'mlp':
        assert others, 'the LayerNorm must be outside the layers'


def model_from(model, values):
    """A copy of ``model`` with the parameter ``values`` (before the step)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip(other.parameters(), values):
            p.copy_(v)
    other.original_params = list(model.parameters())
    return other


def test_conv_gram_equals_per_sample_gradient_products():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, 4, generator=g, dtype=torch.float64)
    d = torch.randn(5, 7, 3, generator=g, dtype=torch.float64)
    per = torch.einsum('ntc,ntd->ncd', d, a).flatten(1)
    assert torch.allclose(sample_gram(a, d), per @ per.T, rtol=1e-12)
    # blocks of 3 rows cross the sample boundaries (7 positions each)
    assert torch.allclose(sample_gram(a, d, chunk_elements=3 * 35), per @ per.T,
                          rtol=1e-12)


def test_gram_with_several_output_rows_per_sample():
    """SMW-GN's layout: ``m`` gradient rows per sample share its ``a``."""
    g = torch.Generator().manual_seed(0)
    for t in (1, 7):
        a = torch.randn(5, t, 4, generator=g, dtype=torch.float64)
        d = torch.randn(15, t, 3, generator=g, dtype=torch.float64)
        rep = a.repeat_interleave(3, 0)
        per = torch.einsum('ntc,ntd->ncd', d, rep).flatten(1)
        for chunk in (1, 3 * 35, GRAM_CHUNK_ELEMENTS):
            assert torch.allclose(sample_gram(a, d, chunk), per @ per.T,
                                  rtol=1e-12)
        v = torch.randn(3, 4, generator=g, dtype=torch.float64)
        z = torch.randn(15, generator=g, dtype=torch.float64)
        assert torch.allclose(jacobian_vector(a, d, v), per @ v.flatten())
        assert torch.allclose(jacobian_t_vector(a, d, z).flatten(), per.T @ z)


def test_lm_rule_follows_hand_computed_sequence():
    model = mlp()
    opt = SMW_NG(model.parameters(), model=model)
    rhos = [0.1, 0.5, 0.9, -1.0, 0.8, 0.24, 0.76, 0.25, 0.75, float('-inf')]
    # boost 1.01 below 1/4, drop 0.99 above 3/4, else unchanged
    expected = [1.01, 1.01, 0.9999, 1.009899, 0.99980001, 1.0097980101,
                0.999700030, 0.999700030, 0.999700030, 1.00969703]
    for rho, lam in zip(rhos, expected):
        opt.lm_update(torch.tensor(rho))
        assert math.isclose(float(opt.lm_lambda), lam, rel_tol=1e-8)


def test_rho_test_uses_loss_at_new_point_and_quadratic_model():
    model = mlp()
    x, y = batch('mlp')
    opt = SMW_NG(model.parameters(), model=model, lr=0.5, damping=1.0,
                 curvature_samples=6)
    params = covered(model)
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        return F.cross_entropy(model(x), y)

    loss = closure()
    loss.backward()
    g = flat([p.grad for p in params])
    opt.step()
    assert opt.needs_second_pass
    with pytest.raises(RuntimeError, match='second'):
        opt.step()
    jac = dense_jacobian(model_from(model, before), x[:6], y[:6], params)
    moved = dict(zip(map(id, model.parameters()), before))
    s = flat([p.detach() - moved[id(p)] for p in params])
    pred = -(g @ s + 0.5 * s @ (jac.T @ jac / 6) @ s)
    with torch.no_grad():
        f1 = closure()
    rho = (loss.detach() - f1) / pred
    opt.second_pass(closure, first_loss=loss.detach())
    assert torch.allclose(opt.last_rho, rho.to(opt.last_rho), rtol=1e-9)
    lam = 1.01 if rho < 0.25 else 0.99 if rho > 0.75 else 1.0
    assert math.isclose(float(opt.lm_lambda), lam, rel_tol=1e-12)
    assert not opt.needs_second_pass


def test_step_and_second_pass_read_no_device_value():
    model = cnn().float()
    x, y = batch('cnn')
    x = x.float()
    opt = SMW_NG(model.parameters(), model=model, lr=0.1, curvature_samples=4)

    def closure():
        return F.cross_entropy(model(x), y)

    for _ in range(3):
        opt.zero_grad()
        loss = closure()
        loss.backward()
        with DispatchCounter(counter_tensors(opt)) as counter:
            opt.step()
            opt.second_pass(closure, first_loss=loss.detach())
        assert counter.host_reads == 0, counter.by_name
    assert 0.9 < float(opt.lm_lambda) < 1.1


def test_resume_equals_uninterrupted():
    x, y = batch('cnn')

    def run(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.second_pass(lambda: F.cross_entropy(model(x), y),
                            first_loss=loss.detach())

    ref = cnn()
    ref_opt = SMW_NG(ref.parameters(), model=ref, lr=0.2, curvature_samples=4)
    run(ref, ref_opt, 4)
    first = cnn()
    first_opt = SMW_NG(first.parameters(), model=first, lr=0.2,
                       curvature_samples=4)
    run(first, first_opt, 2)
    sd = first_opt.state_dict()
    second = model_from(first, [p.detach() for p in first.parameters()])
    second_opt = SMW_NG(second.parameters(), model=second, lr=0.2,
                        curvature_samples=4)
    second_opt.load_state_dict(sd)
    run(second, second_opt, 2)
    for p, q in zip(ref.parameters(), second.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(ref_opt.lm_lambda, second_opt.lm_lambda)


def test_invalid_arguments_name_the_field():
    model = mlp()
    for kw, field in [(dict(eps=0.6), 'eps'), (dict(boost=0.9), 'boost'),
                      (dict(curvature_samples=0), 'curvature_samples'),
                      (dict(lm_interval=-1), 'lm_interval')]:
        with pytest.raises(ValueError, match=field):
            SMW_NG(model.parameters(), model=model, **kw)
    with pytest.raises(TypeError, match='PrecondOptimWrapperConstructor'):
        SMW_NG(model.parameters())


def _train_cnn(run_model, model, x, y):
    """3 SMW-NG steps with the rho-test's second pass; the optimizer."""
    opt = SMW_NG(model.parameters(), model=model, lr=0.2,
                 curvature_samples=None)
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(run_model(x), y)
        loss.backward()
        opt.step()
        # under DDP the losses are local: second_pass averages them
        opt.second_pass(lambda: F.cross_entropy(model(x), y),
                        first_loss=loss.detach())
    return opt


def _ddp_worker(rank, world, port, path):
    join_gloo(rank, world, port)
    model = cnn()
    x, y = batch('cnn', 8)
    x, y = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]
    opt = _train_cnn(nn.parallel.DistributedDataParallel(model), model, x, y)
    if rank == 0:
        torch.save(dict(params=[p.detach() for p in model.parameters()],
                        lm=opt.lm_lambda), path)
    dist.destroy_process_group()


def test_ddp_equals_one_process(tmp_path):
    path = str(tmp_path / 'ddp.pt')
    mp.spawn(_ddp_worker, args=(2, free_port(), path), nprocs=2, join=True)
    got = torch.load(path)
    model = cnn()
    opt = _train_cnn(model, model, *batch('cnn', 8))
    for p, q in zip(model.parameters(), got['params']):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12)
    assert torch.allclose(opt.lm_lambda, got['lm'])


# ------------------------------------------------------------------ SMW_GN
def dense_logit_jacobian(model, x, params):
    """Per-sample Jacobians of the logits (torch.func), ``N x m x n``."""
    name_of = {id(p): n for (n, _), p in zip(model.named_parameters(),
                                            model.original_params)}
    current = dict(model.named_parameters())
    wanted = {name_of[id(p)]: current[name_of[id(p)]].detach() for p in params}
    rest = {n: p.detach() for n, p in current.items() if n not in wanted}

    def logits(w, xi):
        return functional_call(model, {**w, **rest}, (xi[None], ))[0]

    per = vmap(jacrev(logits), in_dims=(None, 0))(wanted, x)
    return torch.cat([per[name_of[id(p)]].flatten(2) for p in params], 2)


def dense_gauss_newton(model, x, params, lam):
    """``lambda I + (1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i``."""
    jac = dense_logit_jacobian(model, x, params)
    with torch.no_grad():
        p = model(x).softmax(-1)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    gn = torch.einsum('imn,imk,ikl->nl', jac, hess, jac) / x.shape[0]
    return lam * torch.eye(gn.shape[0], dtype=gn.dtype) + gn


@pytest.mark.parametrize('model_name', ['mlp', 'cnn'])
@pytest.mark.parametrize('n2', [4, None])
def test_gn_direction_equals_dense_gauss_newton_solve(model_name, n2):
    model = mlp() if model_name == 'mlp' else cnn()
    x, y = batch(model_name)
    opt = SMW_GN(model.parameters(), model=model, lr=1.0, damping=0.3,
                 curvature_samples=n2, lm_interval=0)
    params = covered(model)
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    g = flat([p.grad for p in params])
    opt.step()
    k = x.shape[0] if n2 is None else n2
    ref = model_from(model, before)
    dense = torch.linalg.solve(dense_gauss_newton(ref, x[:k], params,
                                                  0.3 + 1e-3), g)
    moved = dict(zip(map(id, model.parameters()), before))
    step = flat([moved[id(p)] - p.detach() for p in params])
    assert torch.linalg.norm(step - dense) <= 1e-5 * torch.linalg.norm(dense)
    # and it is not the natural-gradient direction
    jac = dense_jacobian(ref, x[:k], y[:k], params)
    ng = torch.linalg.solve((0.3 + 1e-3) * torch.eye(jac.shape[1],
                                                     dtype=torch.float64)
                            + jac.T @ jac / k, g)
    assert torch.linalg.norm(ng - dense) > 1e-3 * torch.linalg.norm(dense)


def test_softmax_hessian_factor():
    z = torch.randn(6, 5, dtype=torch.float64)
    p = z.softmax(-1)
    factor = softmax_hessian_factor(z)
    hess = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert torch.allclose(factor @ factor.mT, hess, atol=1e-14)


def test_gn_refuses_too_large_system_and_says_what_to_set():
    model = mlp()
    # at build: the model output is not a Linear, so logits_module names it
    with pytest.raises(ValueError, match='curvature_samples.*max_system_size'):
        SMW_GN(model.parameters(), model=model, logits_module='3',
               curvature_samples=10, max_system_size=29)
    SMW_GN(model.parameters(), model=model, logits_module='3',
           curvature_samples=10, max_system_size=30)
    # at the first forward: the whole batch (10) x 3 classes
    opt = SMW_GN(model.parameters(), model=model, curvature_samples=None,
                 max_system_size=29)
    x, _ = batch('mlp')
    with pytest.raises(ValueError, match=r'10 x 3 = 30 .*max_system_size=29'):
        model(x)
    assert opt.outputs_per_sample is None
    with pytest.raises(ValueError, match='logits_module'):
        SMW_GN(model.parameters(), model=model, logits_module='nope')


class DictOut(nn.Module):
    """Returns a dict, as an mmpretrain classifier in ``'loss'`` mode."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp()

    def forward(self, x):
        return dict(logits=self.body(x))


def test_gn_says_to_set_logits_module_when_the_output_is_not_logits():
    model = DictOut()
    opt = SMW_GN(model.parameters(), model=model, curvature_samples=4)
    x, _ = batch('mlp')
    with pytest.raises(ValueError, match="logits_module.*'head.fc'"):
        model(x)
    del opt
    opt = SMW_GN(model.parameters(), model=model, curvature_samples=4,
                 logits_module='body.3')
    assert opt.logits_module == 'body.3'


def test_gn_step_and_second_pass_read_no_device_value():
    model = cnn().float()
    x, y = batch('cnn')
    x = x.float()
    opt = SMW_GN(model.parameters(), model=model, lr=0.1, curvature_samples=4)

    def closure():
        return F.cross_entropy(model(x), y)

    for _ in range(3):
        opt.zero_grad()
        loss = closure()
        loss.backward()
        with DispatchCounter(counter_tensors(opt)) as counter:
            opt.step()
            opt.second_pass(closure, first_loss=loss.detach())
        assert counter.host_reads == 0, counter.by_name
    assert 0.9 < float(opt.lm_lambda) < 1.1


class SubsetNet(nn.Module):
    """``tok`` sees two rows per sample; ``aux`` only the samples ``rows``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 6)
        self.tok = nn.Linear(3, 4)
        self.head = nn.Linear(6 + 8, 3)
        self.aux = nn.Linear(6, 3)

    def forward(self, x, rows):
        h = torch.tanh(self.fc(x))
        t = torch.tanh(self.tok(h.reshape(-1, 3))).reshape(x.shape[0], -1)
        out = self.head(torch.cat([h, t], 1))
        return out.index_add(0, rows, self.aux(h.index_select(0, rows)))


@pytest.mark.parametrize('cls', [SMW_NG, SMW_GN])
def test_row_subset_layer_takes_base_step_and_others_stay_exact(cls):
    """Rows of ``k N1``: ``k`` per sample; a row subset: out, raw gradient."""
    model = SubsetNet().double()
    x, y = batch('mlp')
    rows = torch.tensor([1, 4])
    opt = cls(model.parameters(), model=model, lr=1.0, damping=0.3,
              curvature_samples=6, lm_interval=0)
    params = [p for n in ('fc', 'tok', 'head')
              for p in getattr(model, n).parameters()]
    before = {id(p): p.detach().clone() for p in model.parameters()}
    F.cross_entropy(model(x, rows), y).backward()
    g = flat([p.grad for p in params])
    g_aux = [p.grad.clone() for p in model.aux.parameters()]
    opt.step()
    # dense reference, one sample at a time (aux runs on the listed samples)
    lam, k = 0.3 + 1e-3, 6
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters()):
            p.copy_(before[id(q)])
    per, gn = [], 0
    for i in range(k):
        sub = torch.tensor([0] if i in rows.tolist() else [],
                           dtype=torch.long)
        out = ref(x[i:i + 1], sub)[0]
        if cls is SMW_NG:
            loss = F.cross_entropy(out[None], y[i:i + 1])
            per.append(flat(torch.autograd.grad(loss, [
                dict(ref.named_parameters())[n] for n, q in
                model.named_parameters() if any(q is r for r in params)])))
        else:
            jac = torch.stack([flat(torch.autograd.grad(out[c], [
                dict(ref.named_parameters())[n] for n, q in
                model.named_parameters() if any(q is r for r in params)],
                retain_graph=True)) for c in range(3)])
            p = out.detach().softmax(-1)
            gn = gn + jac.T @ (torch.diag(p) - p[:, None] * p[None]) @ jac
    if cls is SMW_NG:
        jac = torch.stack(per)
        gn = jac.T @ jac
    dense = torch.linalg.solve(lam * torch.eye(g.numel(), dtype=torch.float64)
                               + gn / k, g)
    step = flat([before[id(p)] - p.detach() for p in params])
    assert torch.linalg.norm(step - dense) <= 1e-5 * torch.linalg.norm(dense)
    for p, gp in zip(model.aux.parameters(), g_aux):
        assert torch.allclose(before[id(p)] - p.detach(), gp, rtol=1e-12)
    assert opt.fallbacks.counts['smw_rows_not_per_sample'] == 1


def test_nonfinite_lambda_in_checkpoint_restarts_from_damping():
    model = mlp()
    opt = SMW_NG(model.parameters(), model=model, damping=0.5)
    sd = opt.state_dict()
    sd['preconditioner']['lm_lambda'] = torch.tensor(float('nan'),
                                                     dtype=torch.float64)
    opt.load_state_dict(sd)
    assert float(opt.lm_lambda) == 0.5
    assert opt.fallbacks.counts['nonfinite_state_reset'] == 1


#: ``aux`` rows per step of the 8-sample batch: all, then a subset on rank
#: 0's half only (rank 1 still sends whole per-sample rows), then all again.
SUBSET_SCHEDULE = [list(range(8)), [1, 2, 4, 5, 6, 7], list(range(8))]


def _train_subset(cls, run_model, model, x, y, lo=0):
    opt = cls(model.parameters(), model=model, lr=0.2, curvature_samples=None)
    for rows in SUBSET_SCHEDULE:
        mine = torch.tensor([r - lo for r in rows if lo <= r < lo + len(x)])
        opt.zero_grad()
        loss = F.cross_entropy(run_model(x, mine), y)
        loss.backward()
        opt.step()
        opt.second_pass(lambda m=mine: F.cross_entropy(model(x, m), y),
                        first_loss=loss.detach())
    return opt


def _subset_worker(rank, world, port, path, name):
    join_gloo(rank, world, port)
    model = SubsetNet().double()
    x, y = batch('mlp', 8)
    lo = rank * 4
    opt = _train_subset(globals()[name],
                        nn.parallel.DistributedDataParallel(model), model,
                        x[lo:lo + 4], y[lo:lo + 4], lo)
    if rank == 0:
        torch.save(dict(params=[p.detach() for p in model.parameters()],
                        lm=opt.lm_lambda,
                        counts=dict(opt.fallbacks.counts)), path)
    dist.destroy_process_group()


@pytest.mark.parametrize('name', ['SMW_NG', 'SMW_GN'])
def test_ddp_row_subset_on_one_rank_equals_one_process(tmp_path, name):
    """A layer whose rows are per-sample on one rank only: masked everywhere."""
    path = str(tmp_path / 'ddp.pt')
    mp.spawn(_subset_worker, args=(2, free_port(), path, name), nprocs=2,
             join=True)
    got = torch.load(path)
    model = SubsetNet().double()
    opt = _train_subset(globals()[name], model, model, *batch('mlp', 8))
    for p, q in zip(model.parameters(), got['params']):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12)
    assert torch.allclose(opt.lm_lambda, got['lm'])
    assert opt.fallbacks.counts['smw_rows_not_per_sample'] == 1
    assert got['counts']['smw_rows_not_per_sample'] == 1
    assert 'smw_layer_excluded' not in got['counts']

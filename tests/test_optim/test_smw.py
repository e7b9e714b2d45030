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
from torch.func import functional_call, grad, vmap

from mmprecond.optim import SMW_NG
from mmprecond.optim.smw import sample_gram
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

# Copyright (c) mmprecond contributors. All rights reserved.
"""The third-party optimizers of ``mmprecond.optim.peers`` (``.[peers]``)."""
import copy
from typing import List, Tuple

import pytest
import torch
import torch.nn as nn
from mmengine.optim import build_optim_wrapper
from mmengine.registry import OPTIMIZERS

import mmprecond  # noqa: F401  (registers the optimizers)
from mmprecond.engine.hooks import optimizer_state_megabytes
from mmprecond.optim import PeerSINGD

singd_optimizer = pytest.importorskip('singd.optim.optimizer')
pytorch_optimizer = pytest.importorskip('pytorch_optimizer')

HYPER = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, T=2, damping=1e-3,
             alpha1=0.5, lr_cov=1e-2, normalize_lr_cov=True)


def mlp(with_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers: List[nn.Module] = [nn.Linear(6, 8), nn.Tanh()]
    if with_norm:
        layers.append(nn.LayerNorm(8))
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers)


def batches(n: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen),
             torch.randint(0, 3, (16, ), generator=gen)) for _ in range(n)]


def train(model: nn.Module, opt, data) -> None:
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_equals_singd_when_every_layer_is_supported():
    """Only Linear layers: PeerSINGD is singd's SINGD, to the last bit."""
    ours, ref = mlp(False), mlp(False)
    data = batches(6)
    train(ours, PeerSINGD(ours.parameters(), model=ours, **HYPER), data)
    train(ref, singd_optimizer.SINGD(ref, **HYPER), data)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(ours[0].weight, mlp(False)[0].weight)


def test_other_parameters_take_the_sgd_step():
    """A LayerNorm, which SINGD leaves alone, gets SGD with momentum and the
    same lr / wd: the composite equals SINGD + torch.optim.SGD by hand."""
    ours, ref = mlp(True), mlp(True)
    data = batches(6)
    train(ours, PeerSINGD(ours.parameters(), model=ours, **HYPER), data)

    norm = list(ref[2].parameters())
    singd = singd_optimizer.SINGD(ref, warn_unsupported=False, **HYPER)
    sgd = torch.optim.SGD(norm, lr=HYPER['lr'], momentum=HYPER['momentum'],
                          weight_decay=HYPER['weight_decay'])
    for x, y in data:
        singd.zero_grad()
        sgd.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        singd.step()
        sgd.step()
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(ours[2].weight, torch.ones(8))  # it did train


def test_scheduled_lr_reaches_both_parts():
    model = mlp(True)
    opt = PeerSINGD(model.parameters(), model=model, **HYPER)
    train(model, opt, batches(2))
    before = [p.detach().clone() for p in model.parameters()]
    for group in opt.param_groups:  # what an MMEngine scheduler does
        group['lr'] = 0.0
    train(model, opt, batches(2))
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_resume_equals_uninterrupted():
    data = batches(7)
    whole = mlp(True)
    train(whole, PeerSINGD(whole.parameters(), model=whole, **HYPER), data)

    first = mlp(True)
    opt = PeerSINGD(first.parameters(), model=first, **HYPER)
    train(first, opt, data[:3])
    state = copy.deepcopy(opt.state_dict())
    second = mlp(True)  # a fresh model: a deep copy would copy the hooks
    second.load_state_dict(first.state_dict())
    opt2 = PeerSINGD(second.parameters(), model=second, **HYPER)
    opt2.load_state_dict(state)
    train(second, opt2, data[3:])
    for p, q in zip(second.parameters(), whole.parameters()):
        assert torch.equal(p, q)


def test_bias_in_another_group_follows_its_weight():
    """``paramwise_cfg`` puts biases in their own group (bias_decay_mult);
    singd alone refuses that, the composite trains them with the weight."""
    model = mlp(True)
    wrapper = build_optim_wrapper(
        model,
        dict(constructor='PrecondOptimWrapperConstructor',
             optimizer=dict(type='PeerSINGD', **HYPER),
             paramwise_cfg=dict(bias_decay_mult=0.0)))
    opt = wrapper.optimizer
    assert isinstance(opt, PeerSINGD)
    assert len(opt.param_groups) > 1
    bias = model[0].bias.detach().clone()
    train(model, opt, batches(2))
    assert not torch.equal(model[0].bias, bias)
    total, factors = optimizer_state_megabytes(opt)
    # K: 7x7 and 9x9 (inputs + bias), C: 8x8 and 3x3, each with momentum
    assert factors == pytest.approx(
        2 * 4 * (7 * 7 + 9 * 9 + 8 * 8 + 3 * 3) / 2**20)
    assert total > factors


@pytest.mark.parametrize('name, cls', [('PeerSOAP', 'SOAP'),
                                       ('PeerShampoo', 'Shampoo')])
def test_pytorch_optimizer_peers_build_from_config(name, cls):
    model = mlp(True)
    wrapper = build_optim_wrapper(
        model, dict(optimizer=dict(type=name, lr=1e-3, weight_decay=0.01)))
    opt = wrapper.optimizer
    assert type(opt) is getattr(pytorch_optimizer, cls)
    assert opt.param_groups[0]['lr'] == 1e-3
    train(model, opt, batches(3))
    # their per-dimension factors live in lists / per-dim keys; all counted
    expected = 0
    for st in opt.state.values():
        for v in st.values():
            vs = v if isinstance(v, (list, tuple)) else [v]
            expected += sum(t.numel() * t.element_size() for t in vs
                            if isinstance(t, torch.Tensor))
    assert expected > 0
    assert optimizer_state_megabytes(opt)[0] == pytest.approx(
        expected / 2**20)


def test_missing_peer_package_is_named(monkeypatch):
    monkeypatch.delitem(OPTIMIZERS._module_dict, 'PeerSOAP')
    with pytest.raises(KeyError, match=r'pip install \.\[peers\]'):
        build_optim_wrapper(
            mlp(False),
            dict(constructor='PrecondOptimWrapperConstructor',
                 optimizer=dict(type='PeerSOAP', lr=1e-3)))

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


# ------------------------------------------------------------------ PeerMuon
def muon_net() -> nn.Module:
    """A conv, a hidden Linear and a classifier ``head.fc``, like mmpretrain."""
    torch.manual_seed(0)
    net = nn.Module()
    net.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1),
                                 nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 16, 12), nn.ReLU())
    net.head = nn.Module()
    net.head.fc = nn.Linear(12, 3)
    net.forward = lambda x: net.head.fc(net.backbone(x))
    return net


def image_batches(n: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 3, 4, 4, generator=gen),
             torch.randint(0, 3, (8, ), generator=gen)) for _ in range(n)]


MUON = dict(lr=2e-3, weight_decay=0.05)


def muon_parts(opt) -> Tuple[set, set]:
    muon = {id(p) for g in opt.param_groups if g['use_muon']
            for p in g['params']}
    adamw = {id(p) for g in opt.param_groups if not g['use_muon']
             for p in g['params']}
    return muon, adamw


def test_muon_split_on_the_demo_detector():
    """Real mmdet Faster R-CNN: every >=2-D weight but the heads' final
    layers is Muon's, unflattened (pytorch-optimizer flattens itself)."""
    pytest.importorskip('mmdet')
    from conftest import DEMO_DET_CONFIG
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from mmprecond.optim.peers import PeerMuon

    init_default_scope('mmdet')
    model = MODELS.build(Config.fromfile(str(DEMO_DET_CONFIG)).model)
    opt = PeerMuon(model.parameters(), model=model, **MUON)
    muon, adamw = muon_parts(opt)
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(muon) + len(adamw) == len(names)
    to_adamw = sorted(names[i] for i in adamw
                      if dict(model.named_parameters())[names[i]].ndim >= 2)
    assert to_adamw == [
        'roi_head.bbox_head.fc_cls.weight', 'roi_head.bbox_head.fc_reg.weight',
        'rpn_head.rpn_cls.weight', 'rpn_head.rpn_reg.weight']
    shapes = {p.ndim for g in opt.param_groups if g['use_muon']
              for p in g['params']}
    assert shapes == {2, 4}  # conv weights stay 4-D
    assert all(p.ndim == 1 for n, p in model.named_parameters()
               if id(p) in adamw and names[id(p)] not in to_adamw)


def test_muon_equals_pytorch_optimizer_muon_with_moonlight_lr():
    """PeerMuon is pytorch-optimizer's Muon on hand-made groups, bit for bit:
    Moonlight's lr adjustment, AdamW (torch's betas / eps) on the rest."""
    from mmprecond.optim.peers import PeerMuon

    ours, ref = muon_net(), muon_net()
    data = image_batches(5)
    train(ours, PeerMuon(ours.parameters(), model=ours, **MUON), data)
    hidden = [ref.backbone[0].weight, ref.backbone[4].weight]
    rest = [p for p in ref.parameters() if all(p is not q for q in hidden)]
    assert len(rest) == 6  # conv / BN / fc biases and gains, head.fc
    train(ref, pytorch_optimizer.Muon(
        [dict(params=hidden, use_muon=True),
         dict(params=rest, use_muon=False)], lr=2e-3, weight_decay=0.05,
        use_adjusted_lr=True, adamw_lr=2e-3, adamw_wd=0.05,
        adamw_betas=(0.9, 0.999), adamw_eps=1e-8), data)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(ours.head.fc.weight, muon_net().head.fc.weight)


def muon_wrapper(model: nn.Module):
    """PeerMuon through mmprecond's constructor, with the demo paramwise_cfg."""
    return build_optim_wrapper(
        model,
        dict(constructor='PrecondOptimWrapperConstructor',
             optimizer=dict(type='PeerMuon', **MUON),
             paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0)))


def test_muon_paramwise_cfg_and_scheduler_reach_both_parts():
    """``paramwise_cfg``'s zero decay lands on biases / norms of both parts,
    and a real MMEngine scheduler scales every group, Muon's and AdamW's:
    MultiStepLR with gamma 0 stops both halves from step 2 on."""
    from mmengine.optim import MultiStepLR

    from mmprecond.optim.peers import PeerMuon

    model = muon_net()
    wrapper = muon_wrapper(model)
    opt = wrapper.optimizer
    assert isinstance(opt, PeerMuon)
    decay = {id(p): g['weight_decay'] for g in opt.param_groups
             for p in g['params']}
    assert decay[id(model.backbone[0].weight)] == 0.05  # Muon
    assert decay[id(model.head.fc.weight)] == 0.05  # AdamW, final layer
    assert decay[id(model.backbone[0].bias)] == 0.0
    assert decay[id(model.backbone[1].weight)] == 0.0  # BN gain
    assert {g['use_muon'] for g in opt.param_groups} == {True, False}
    sched = MultiStepLR(wrapper, milestones=[2], gamma=0.0, by_epoch=False)
    data = image_batches(4)
    before = None
    for i, (x, y) in enumerate(data):
        if i == 2:
            before = [p.detach().clone() for p in model.parameters()]
            assert all(g['lr'] == 0.0 for g in opt.param_groups)
        wrapper.update_params(nn.functional.cross_entropy(model(x), y))
        sched.step()
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    moved = muon_net()
    assert not torch.equal(model.backbone[0].weight, moved.backbone[0].weight)
    assert not torch.equal(model.head.fc.weight, moved.head.fc.weight)


def test_muon_resume_equals_uninterrupted():
    """A real checkpoint round trip (``torch.save`` / safe ``torch.load``)
    of the optimizer wrapper: resumed training equals uninterrupted."""
    import io

    data = image_batches(7)
    whole = muon_net()
    wrapper = muon_wrapper(whole)
    for x, y in data:
        wrapper.update_params(nn.functional.cross_entropy(whole(x), y))

    first = muon_net()
    wrapper = muon_wrapper(first)
    for x, y in data[:3]:
        wrapper.update_params(nn.functional.cross_entropy(first(x), y))
    buf = io.BytesIO()
    torch.save(dict(model=first.state_dict(), optim=wrapper.state_dict()), buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    second = muon_net()
    second.load_state_dict(ckpt['model'])
    wrapper2 = muon_wrapper(second)
    wrapper2.load_state_dict(ckpt['optim'])
    for x, y in data[3:]:
        wrapper2.update_params(nn.functional.cross_entropy(second(x), y))
    for p, q in zip(second.parameters(), whole.parameters()):
        assert torch.equal(p, q)
    steps = {g['step'] for g in wrapper2.optimizer.param_groups}
    assert steps == {7}

# Copyright (c) mmprecond contributors. All rights reserved.
"""``base_constructor``: mmpretrain's layer-wise lr decay + preconditioning.

The parameter groups come from mmpretrain's real
``LearningRateDecayOptimWrapperConstructor`` (on a small mmpretrain
VisionTransformer classifier) and the optimizer from mmprecond.
"""
import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

import mmprecond  # noqa: F401  (registers)
from mmprecond.optim import AdaNKFAC

DECAY = 'LearningRateDecayOptimWrapperConstructor'


def tiny_vit(seed=0):
    from mmpretrain.registry import MODELS
    init_default_scope('mmpretrain')
    torch.manual_seed(seed)
    return MODELS.build(dict(
        type='ImageClassifier',
        backbone=dict(type='VisionTransformer', img_size=32, patch_size=8,
                      arch=dict(embed_dims=32, num_layers=3, num_heads=2,
                                feedforward_channels=64)),
        neck=None,
        head=dict(type='VisionTransformerClsHead', num_classes=5,
                  in_channels=32)))


def build(model, optimizer, **wrapper):
    cfg = Config(dict(optim_wrapper=dict(
        type='OptimWrapper', optimizer=optimizer,
        paramwise_cfg=dict(layer_decay_rate=0.5, norm_decay_mult=0.0),
        **wrapper)))
    return build_optim_wrapper(model, cfg.optim_wrapper)


def lr_wd_by_name(optimizer):
    return {g['param_name']: (g['lr'], g['weight_decay'])
            for g in optimizer.param_groups}


def train(model, optimizer, steps=3):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        inputs = torch.randn(8, 3, 32, 32, generator=gen)
        labels = torch.randint(0, 5, (8, ), generator=gen)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        optimizer.step()


def test_layer_decay_groups_are_kept_and_optimizer_is_preconditioned():
    reference = build(tiny_vit(), dict(type='AdamW', lr=1e-3,
                                       weight_decay=0.05),
                      constructor=DECAY).optimizer
    model = tiny_vit()
    ours = build(model, dict(type='AdaNKFAC', lr=1e-3, weight_decay=0.05,
                             stat_interval=1, refresh_interval=1),
                 constructor='PrecondOptimWrapperConstructor',
                 base_constructor=DECAY).optimizer
    assert isinstance(ours, AdaNKFAC)
    want = lr_wd_by_name(reference)
    assert lr_wd_by_name(ours) == want
    lrs = sorted({lr for lr, _ in want.values()})
    assert len(lrs) == 5 and lrs[-1] == pytest.approx(1e-3)  # decay present
    assert want['backbone.layers.0.attn.qkv.weight'][0] == pytest.approx(
        1e-3 * 0.5**3)
    # the transformer's Linear layers are preconditioned
    assert 'backbone.layers.0.attn.qkv' in ours.layers
    assert 'head.layers.head' in ours.layers
    train(model, ours)
    assert {'L_inv', 'R_inv'} <= set(ours.layer_state['backbone.layers.0.attn.qkv'])


def test_without_preconditioning_equals_adamw_with_the_decay():
    """Every layer excluded: AdaNKFAC on the decayed groups == AdamW on them."""
    a, b = tiny_vit(), tiny_vit()
    adamw = build(a, dict(type='AdamW', lr=1e-3, weight_decay=0.05),
                  constructor=DECAY).optimizer
    ours = build(b, dict(type='AdaNKFAC', lr=1e-3, weight_decay=0.05,
                         max_factor_dim=1),
                 constructor='PrecondOptimWrapperConstructor',
                 base_constructor=DECAY).optimizer
    assert not ours.layers
    train(a, adamw)
    train(b, ours)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)


def test_base_constructor_errors_are_clear():
    with pytest.raises(ValueError, match='cannot be PrecondOptimWrapperConstructor'):
        build(tiny_vit(), dict(type='NKFAC', weight_decay=1e-4),
              constructor='PrecondOptimWrapperConstructor',
              base_constructor='PrecondOptimWrapperConstructor')

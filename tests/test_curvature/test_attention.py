# Copyright (c) mmprecond contributors. All rights reserved.
"""Attention adapters: the records they build reproduce the modules' outputs."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmprecond.curvature.attention import (
    AttentionTap,
    find_adapter,
    find_attention_modules,
    merge_heads,
    split_heads,
)


class Recorder:
    """An :class:`AttentionTap` over ``modules`` that keeps every record."""

    def __init__(self, modules):
        self.records, self.skips = [], []
        self.tap = AttentionTap(modules, self.keep,
                                lambda n, why: self.skips.append((n, why)))
        self.tap.active = True

    def keep(self, name, rec):
        # records may share memory with the module's tensors: copy them now
        for f in ('x', 'q', 'k', 'v', 'probs', 'scale'):
            setattr(rec, f, getattr(rec, f).clone())
        self.records.append((name, rec))


def proj_io(proj):
    """Forward hook storing the input and output of an output projection."""
    seen = []
    handle = proj.register_forward_hook(
        lambda m, i, o: seen.append((i[0].detach().clone(), o.detach().clone())))
    return seen, handle


def check_record(rec, layout, proj, proj_in, proj_out, normalised=False):
    """X_P = A_s V per head, projected, is what the module computed."""
    xp = merge_heads(rec.probs @ rec.v)
    if proj_in is not None:
        torch.testing.assert_close(xp, proj_in.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(proj(xp), proj_out.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(rec.probs.sum(-1), torch.ones_like(rec.probs[..., 0]))
    # Q, K, V are the layout's blocks applied to the recorded input.
    for name in 'qkv':
        block = layout.blocks[name]
        b = block.bias_block()
        ref = split_heads(rec.x @ block.weight_block().T + (0 if b is None else b),
                          layout.num_heads)
        if normalised and name != 'v':  # WindowMSAV2: cosine attention
            ref = F.normalize(ref, dim=-1)
        torch.testing.assert_close(getattr(rec, name), ref, rtol=1e-4, atol=1e-5)


def randomise_position_bias(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if 'relative_position_bias_table' in name or 'logit_scale' in name:
                p.normal_(0, 1.0)


# ----------------------------------------------------------------- mmdet Swin
def test_mmdet_shift_window_msa_with_mask_and_position_bias():
    swin = pytest.importorskip('mmdet.models.backbones.swin')
    torch.manual_seed(0)
    block = swin.ShiftWindowMSA(embed_dims=16, num_heads=2, window_size=4,
                                shift_size=2)
    randomise_position_bias(block.w_msa)
    block.train()
    rec = Recorder({'attn': block.w_msa})
    seen, _ = proj_io(block.w_msa.proj)
    # 10 x 10 map: padded to 12 x 12, 9 windows of 16 tokens, shift mask on
    block(torch.randn(2, 100, 16), (10, 10))
    assert len(rec.records) == 1 and not rec.skips
    _, r = rec.records[0]
    assert r.probs.shape == (18, 2, 16, 16)
    # the shift mask really is in the recorded probabilities
    assert (r.probs < 1e-30).any()
    check_record(r, find_adapter(block.w_msa).layout(block.w_msa),
                 block.w_msa.proj, *seen[0])


def test_mmdet_swin_backbone_has_one_adapter_per_block():
    swin = pytest.importorskip('mmdet.models.backbones.swin')
    model = swin.SwinTransformer(embed_dims=16, depths=(2, 2), num_heads=(1, 2),
                                 window_size=4, strides=(4, 2),
                                 out_indices=(0, 1))
    found = find_attention_modules(model)
    assert sorted(found) == [f'stages.{s}.blocks.{b}.attn.w_msa'
                             for s in range(2) for b in range(2)]
    assert all(reason is None for _, reason in found.values())
    rec = Recorder({n: m for n, (m, _) in found.items()})
    model.train()
    model(torch.randn(1, 3, 32, 32)).__len__()
    assert len(rec.records) == 4


# ---------------------------------------------------------------- mmpretrain
@pytest.mark.parametrize('kind', ['WindowMSA', 'WindowMSAV2'])
def test_mmpretrain_window_msa(kind):
    att = pytest.importorskip('mmpretrain.models.utils.attention')
    torch.manual_seed(1)
    module = getattr(att, kind)(embed_dims=12, window_size=(3, 3), num_heads=3)
    randomise_position_bias(module)
    if kind == 'WindowMSAV2':
        with torch.no_grad():
            module.q_bias.normal_()
            module.v_bias.normal_()
    module.train()
    rec = Recorder({'m': module})
    seen, _ = proj_io(module.proj)
    mask = torch.zeros(2, 9, 9)
    mask[1, :4, 4:] = -100.0
    module(torch.randn(4, 9, 12), mask=mask)
    _, r = rec.records[0]
    layout = find_adapter(module).layout(module)
    if kind == 'WindowMSAV2':
        assert layout.k.bias is None and layout.q.bias is module.q_bias
    check_record(r, layout, module.proj, *seen[0],
                 normalised=kind == 'WindowMSAV2')


@pytest.mark.parametrize('qk_scale', [None, 0.3])
def test_mmpretrain_multihead_attention(qk_scale):
    att = pytest.importorskip('mmpretrain.models.utils.attention')
    torch.manual_seed(2)
    module = att.MultiheadAttention(embed_dims=8, num_heads=2, input_dims=6,
                                    qk_scale=qk_scale)
    module.train()
    rec = Recorder({'m': module})
    seen, _ = proj_io(module.proj)
    module(torch.randn(3, 7, 6))
    _, r = rec.records[0]
    assert r.x.shape == (3, 7, 6) and r.q.shape == (3, 2, 7, 4)
    check_record(r, find_adapter(module).layout(module), module.proj, *seen[0])


# ------------------------------------------------------------------- torch MHA
@pytest.mark.parametrize('batch_first', [False, True])
def test_torch_mha_with_masks(batch_first):
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    rec = Recorder({'mha': mha})
    seen, _ = proj_io(mha.out_proj)
    n, b = 6, 3
    x = torch.randn(b, n, 8) if batch_first else torch.randn(n, b, 8)
    pad = torch.zeros(b, n, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
    out, _ = mha(x, x, x, key_padding_mask=pad, attn_mask=causal)
    _, r = rec.records[0]
    assert torch.all(r.probs[0, :, :, -2:] == 0) and torch.all(r.probs.triu(1) == 0)
    if not batch_first:
        out = out.transpose(0, 1)
    # torch applies out_proj functionally: compare with the module's output
    assert seen == []
    check_record(r, find_adapter(mha).layout(mha), mha.out_proj, None, out)


def test_torch_mha_value_may_differ_but_cross_attention_is_skipped():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(8, 1, batch_first=True)
    rec = Recorder({'mha': mha})
    x, pos = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    out, _ = mha(x + pos, x + pos, x)  # mmcv style: positions on q and k
    assert len(rec.records) == 1
    _, r = rec.records[0]
    torch.testing.assert_close(mha.out_proj(merge_heads(r.probs @ r.v)), out,
                               rtol=1e-4, atol=1e-5)
    mha(x, torch.randn(2, 5, 8), x)
    assert len(rec.records) == 1 and 'cross-attention' in rec.skips[0][1]


def test_unsupported_torch_mha_variants_are_reported():
    model = nn.ModuleDict(dict(a=nn.MultiheadAttention(8, 2, kdim=4, vdim=4),
                               b=nn.MultiheadAttention(8, 2, add_bias_kv=True),
                               c=nn.MultiheadAttention(8, 2)))
    found = find_attention_modules(model)
    assert 'kdim' in found['a'][1] and 'add_bias_kv' in found['b'][1]
    assert found['c'][1] is None


# -------------------------------------------------------------- hook hygiene
def test_no_records_when_inactive_eval_or_no_grad():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    rec = Recorder({'mha': mha})
    x = torch.randn(2, 4, 8)
    rec.tap.active = False
    mha(x, x, x)
    rec.tap.active = True
    with torch.no_grad():
        mha(x, x, x)
    mha.eval()
    mha(x, x, x)
    assert rec.records == []
    mha.train()
    mha(x, x, x)
    assert len(rec.records) == 1


def test_deepcopy_records_nothing_and_tap_does_not_keep_model_alive():
    swin = pytest.importorskip('mmdet.models.backbones.swin')
    block = swin.ShiftWindowMSA(embed_dims=8, num_heads=2, window_size=2)
    rec = Recorder({'attn': block.w_msa})
    twin = copy.deepcopy(block)
    twin(torch.randn(1, 16, 8), (4, 4))
    assert rec.records == []
    block(torch.randn(1, 16, 8), (4, 4))
    assert len(rec.records) == 1
    # hooks hold the tap weakly: dropping the tap leaves inert hooks
    tap = rec.tap
    del rec
    tap.remove()
    block(torch.randn(1, 16, 8), (4, 4))


def test_probabilities_are_read_before_in_place_changes():
    swin = pytest.importorskip('mmdet.models.backbones.swin')
    torch.manual_seed(5)
    msa = swin.WindowMSA(embed_dims=8, num_heads=2, window_size=(2, 2))

    class ZeroInPlace(nn.Module):
        def forward(self, t):
            return t.mul_(0)

    msa.attn_drop = ZeroInPlace()  # wipes A_s in place after the softmax
    rec = Recorder({'m': msa})
    x = torch.randn(3, 4, 8)
    out = msa(x)
    _, r = rec.records[0]
    torch.testing.assert_close(out, msa.proj.bias.expand_as(out))  # wiped
    logits = (r.q * r.scale[:, None, None]) @ r.k.transpose(-2, -1)
    bias = msa.relative_position_bias_table[msa.relative_position_index.view(-1)]
    logits = logits + bias.view(4, 4, 2).permute(2, 0, 1)
    torch.testing.assert_close(r.probs, logits.softmax(-1))  # not wiped


def test_subclass_overriding_forward_gets_no_adapter():

    class Same(nn.MultiheadAttention):
        pass

    class Other(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    assert find_adapter(Same(4, 1)) is find_adapter(nn.MultiheadAttention(4, 1))
    assert find_adapter(Other(4, 1)) is None
    assert find_adapter(nn.Linear(2, 2)) is None

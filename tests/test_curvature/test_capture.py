# Copyright (c) mmprecond contributors. All rights reserved.
import copy
import gc
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmprecond.curvature.capture import LayerCapture, gradient_matrix, supported_reason


def naive_patches(x, conv):
    """Rows of zero-padded, dilated, strided patches by explicit loops."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if conv.padding == 'same':
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    elif conv.padding == 'valid':
        pads = (0, 0, 0, 0)
    else:
        ph, pw = conv.padding
        pads = (pw, pw, ph, ph)
    xp = F.pad(x, pads)
    n, c, h, w = xp.shape
    oh = (h - dh * (kh - 1) - 1) // sh + 1
    ow = (w - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(n):
        for i in range(oh):
            for j in range(ow):
                patch = xp[b, :, i * sh:i * sh + dh * (kh - 1) + 1:dh,
                           j * sw:j * sw + dw * (kw - 1) + 1:dw]
                rows.append(patch.reshape(-1))
    return torch.stack(rows)


def with_ones(rows, bias):
    return torch.cat([rows, torch.ones(len(rows), 1)], 1) if bias else rows


def captured(model, names, inputs, loss_fn=lambda y: (y**2).sum()):
    cap = LayerCapture(dict(model.named_modules()), names)
    cap.active = True
    out = model(inputs)
    loss_fn(out).backward()
    return cap


@pytest.mark.parametrize('kwargs', [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=(1, 0)),
    dict(kernel_size=(3, 2), dilation=2, padding=2, bias=False),
    dict(kernel_size=3, padding='same', dilation=(1, 2)),
    dict(kernel_size=1, stride=2, padding='valid'),
])
def test_conv_factors_match_exact_formula(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, **kwargs)
    x = torch.randn(2, 3, 9, 8)
    cap = LayerCapture({'conv': conv}, ['conv'])
    cap.active = True
    out = conv(x)
    out.retain_grad()
    (out.sin()).sum().backward()
    buf = cap.buffers['conv']
    rows = with_ones(naive_patches(x, conv), conv.bias is not None)
    delta = out.grad.permute(0, 2, 3, 1).reshape(-1, 4)
    assert buf.x_rows == len(rows) == len(delta) == buf.g_rows
    torch.testing.assert_close(buf.xx, rows.T @ rows, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(buf.gg, delta.T @ delta, rtol=1e-5, atol=1e-5)
    # the row layouts match the weight layout: dL/dW = Delta^T X
    torch.testing.assert_close(gradient_matrix(conv), delta.T @ rows,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('bias', [True, False])
def test_linear_factors_tokens_as_rows(bias):
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=bias)
    x = torch.randn(2, 7, 5)  # (batch, tokens, features)
    cap = LayerCapture({'lin': lin}, ['lin'])
    cap.active = True
    out = lin(x)
    out.retain_grad()
    out.tanh().sum().backward()
    rows = with_ones(x.reshape(-1, 5), bias)
    delta = out.grad.reshape(-1, 3)
    buf = cap.buffers['lin']
    torch.testing.assert_close(buf.xx, rows.T @ rows)
    torch.testing.assert_close(buf.gg, delta.T @ delta)
    torch.testing.assert_close(gradient_matrix(lin), delta.T @ rows)


def test_inplace_relu_after_conv_gets_pre_activation_grad():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True),
                        nn.Conv2d(3, 2, 1), nn.ReLU(inplace=True))
    ref = copy.deepcopy(net)
    ref[1].inplace = False
    ref[3].inplace = False
    x = torch.randn(2, 2, 5, 5)
    cap = captured(net, ['0', '2'], x)
    z = ref[0](x)
    z.retain_grad()
    (ref[3](ref[2](ref[1](z)))**2).sum().backward()
    delta = z.grad.permute(0, 2, 3, 1).reshape(-1, 3)
    torch.testing.assert_close(cap.buffers['0'].gg, delta.T @ delta)


def test_module_called_three_times_sums_calls():
    torch.manual_seed(0)
    head = nn.Linear(4, 2)
    xs = [torch.randn(n, 4) for n in (3, 5, 2)]
    cap = LayerCapture({'head': head}, ['head'])
    cap.active = True
    outs = [head(x) for x in xs]
    for o in outs:
        o.retain_grad()
    sum((o**2).sum() for o in outs).backward()
    buf = cap.buffers['head']
    rows = with_ones(torch.cat(xs), True)
    delta = torch.cat([o.grad for o in outs])
    assert buf.calls == 3 and buf.x_rows == 10 and buf.g_rows == 10
    torch.testing.assert_close(buf.xx, rows.T @ rows)
    torch.testing.assert_close(buf.gg, delta.T @ delta)


def test_empty_input_inactive_eval_and_no_grad_contribute_nothing():
    lin = nn.Linear(4, 2)
    cap = LayerCapture({'lin': lin}, ['lin'])
    cap.active = True
    lin(torch.randn(0, 4)).sum().backward()  # zero RoIs
    assert cap.buffers['lin'].xx is None and not cap.has_backward
    with torch.no_grad():
        lin(torch.randn(3, 4))
    lin.eval()
    lin(torch.randn(3, 4)).sum().backward()
    lin.train()
    cap.active = False  # not a statistics step
    lin(torch.randn(3, 4)).sum().backward()
    assert cap.buffers['lin'].xx is None and cap.buffers['lin'].gg is None


def test_sides_not_wanted_are_never_formed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(7, 6)
    full = captured(model, ['0', '2'], x)
    full.remove()
    model.zero_grad()
    cap = LayerCapture(dict(model.named_modules()), ['0', '2'],
                       sides={'0': (False, True), '2': (True, False)})
    cap.active = True
    (model(x)**2).sum().backward()
    assert cap.buffers['0'].xx is None and cap.buffers['2'].gg is None
    assert cap.has_backward  # the backward pass is still seen
    torch.testing.assert_close(cap.buffers['0'].gg, full.buffers['0'].gg)
    torch.testing.assert_close(cap.buffers['2'].xx, full.buffers['2'].xx)


def test_optimizer_collects_only_the_sides_it_uses():
    from mmprecond.optim import FSGD, NKFAC
    model = nn.Sequential(nn.Linear(300, 4), nn.ReLU(), nn.Linear(4, 3))
    opt = NKFAC(model.parameters(), model=model, max_factor_dim=100)
    # Linear(300, 4): the 301-wide input Gram is above max_factor_dim
    assert opt.capture.sides == {'0': (False, True), '2': (True, True)}
    (model(torch.randn(5, 300))**2).sum().backward()
    assert opt.capture.buffers['0'].xx is None
    assert opt.capture.buffers['0'].gg.shape == (4, 4)
    opt.step()
    assert set(opt.layer_state['0']) == {'L', 'L_inv'}
    fsgd = FSGD(model.parameters(), model=model)
    assert set(fsgd.capture.sides.values()) == {(True, False)}


def test_unsupported_layers_are_reported():
    assert supported_reason(nn.Conv2d(4, 4, 3, groups=2)).startswith('grouped')
    assert 'padding_mode' in supported_reason(
        nn.Conv2d(4, 4, 3, padding=1, padding_mode='reflect'))
    assert supported_reason(nn.Conv2d(4, 4, 3, dilation=2)) is None
    assert supported_reason(nn.LayerNorm(3)) is not None


def test_deepcopy_of_hooked_model_is_inert_and_does_not_keep_capture_alive():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    cap = LayerCapture(dict(net.named_modules()), ['0', '2'])
    cap.active = True
    twin = copy.deepcopy(net)  # what EMAHook does
    twin(torch.randn(5, 4)).sum().backward()
    assert cap.buffers['0'].xx is None  # the copy's hooks do nothing
    net(torch.randn(5, 4)).sum().backward()
    assert cap.buffers['0'].x_rows == 5
    ref = weakref.ref(cap)
    del cap
    gc.collect()
    assert ref() is None  # the model's hooks did not keep it alive
    twin(torch.randn(5, 4)).sum().backward()  # stale hooks are harmless
    net(torch.randn(5, 4)).sum().backward()


def test_statistics_are_fp32_inside_autocast():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    cap = LayerCapture({'lin': lin}, ['lin'])
    cap.active = True
    x = torch.randn(16, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = lin(x)
    out.float().sum().backward()
    buf = cap.buffers['lin']
    assert buf.xx.dtype == torch.float32 and buf.gg.dtype == torch.float32
    rows = with_ones(x, True)
    # bf16 matmuls would be off by ~1e-2 relative; fp32 ones are exact here
    torch.testing.assert_close(buf.xx, rows.T @ rows, rtol=1e-5, atol=1e-5)

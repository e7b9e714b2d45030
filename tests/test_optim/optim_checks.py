# Copyright (c) mmprecond contributors. All rights reserved.
"""Checks shared by the optimizer tests (resume, loss decrease)."""
import io
from typing import Callable, List

import torch


def assert_resume_equals_uninterrupted(make_model: Callable, make_opt: Callable,
                                       run: Callable, data: List, split: int,
                                       atol: float = 1e-6):
    """Train ``data`` straight, and ``data[:split]`` + checkpoint + the rest.

    ``make_model(seed)`` builds the model (the resumed one from another seed,
    so only the checkpoint can make it equal), ``make_opt(model)`` the
    optimizer, ``run(model, opt, batches)`` trains.  Returns the resumed
    optimizer.
    """
    ref = make_model(0)
    run(ref, make_opt(ref), data)
    first = make_model(0)
    opt1 = make_opt(first)
    run(first, opt1, data[:split])
    buf = io.BytesIO()
    torch.save(dict(model=first.state_dict(), optim=opt1.state_dict()), buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    second = make_model(123)
    second.load_state_dict(ckpt['model'])
    opt2 = make_opt(second)
    opt2.load_state_dict(ckpt['optim'])
    run(second, opt2, data[split:])
    for pa, pb in zip(ref.parameters(), second.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=atol)
    return opt2


def assert_loss_halves(model, opt, x, y, steps: int = 30, create_graph: bool = False):
    """``steps`` full-batch steps of cross-entropy on ``(x, y)`` halve the loss."""
    import torch.nn.functional as F

    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward(create_graph=create_graph)
        losses.append(float(loss.detach()))
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses[::5]

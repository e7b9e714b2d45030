# Copyright (c) mmprecond contributors. All rights reserved.
"""What the contract suite knows about building and driving an optimizer.

Everything here is derived from the registry and the constructors'
signatures, so an optimizer registered tomorrow is driven without editing a
list: ``model=`` is passed when the constructor takes it, the intervals are
shortened to whatever interval keywords it has, and one training step asks the
optimizer's own protocol for its extra needs (``prepare_hessian`` for SGD_PH's
Hessian-vector product, ``needs_second_pass`` / ``second_pass`` for K-BFGS,
``attach_grad_scaler`` for AMP).  TNT's sampled labels come from the module
named ``head``, the name every model of this suite gives its classifier.
"""
import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import mmprecond  # noqa: F401 (registers the optimizers)

#: Classes, input channels / side, and the batch of one step.
CLASSES, CHANNELS, SIDE, BATCH = 5, 3, 4, 8
#: Shortened intervals: statistics every step, refreshes every second one.
SHORT = dict(stat_interval=1, refresh_interval=2,
             curvature_interval=2)


def registered() -> Dict[str, type]:
    """Every optimizer mmprecond registers in MMEngine's root registry.

    Includes the peer optimizers that :mod:`mmprecond.optim.peers` registers
    (``Peer*``) when their packages are importable.
    """
    from mmengine.registry import OPTIMIZERS

    out = {}
    for name, cls in OPTIMIZERS.module_dict.items():
        if cls.__module__.startswith('mmprecond') or name.startswith('Peer'):
            out[name] = cls
    return dict(sorted(out.items()))


def signature(cls: type) -> Dict[str, inspect.Parameter]:
    """Constructor keywords, following ``*args, **kwargs`` to the parent."""
    for klass in cls.__mro__:
        params = inspect.signature(klass.__init__).parameters
        if not any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                   for p in params.values()):
            return dict(params)
    return dict(inspect.signature(cls.__init__).parameters)


def base_kind(cls: type) -> str:
    """``'adamw'`` if the optimizer takes Adam's betas, else ``'sgd'``."""
    return 'adamw' if 'betas' in signature(cls) else 'sgd'


def hyper(cls: type, short: bool = True, **extra: Any) -> Dict[str, Any]:
    """Keywords for ``cls``: a small lr and, if ``short``, short intervals."""
    sig = signature(cls)
    kw: Dict[str, Any] = {}
    if short:
        kw['lr'] = 1e-2 if base_kind(cls) == 'adamw' else 5e-2
        kw.update({k: v for k, v in SHORT.items() if k in sig})
    kw.update(extra)
    return {k: v for k, v in kw.items() if k in sig}


def build(cls: type, model: nn.Module, short: bool = True,
          **extra: Any) -> torch.optim.Optimizer:
    """``cls`` on ``model``'s parameters, handed the model if it takes one."""
    kw = hyper(cls, short, **extra)
    if 'model' in signature(cls):
        kw['model'] = model
    return cls(model.parameters(), **kw)


class Net(nn.Module):
    """A conv, a hidden Linear, the classifier ``head`` and a sparse ``aux``.

    ``aux`` only sees the rows listed in ``rows``; a rank whose share of the
    batch lists none runs it on zero rows (an empty RoI batch, in detection
    terms).  The rows are computed by the caller, so the forward reads no
    device value.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(CHANNELS, 4, 3, padding=1)
        self.fc = nn.Linear(4 * SIDE * SIDE, 12)
        self.head = nn.Linear(12, CLASSES)
        self.aux = nn.Linear(12, CLASSES)

    def forward(self, x: Tensor, rows: Tensor) -> Tensor:
        h = F.relu(self.fc(F.relu(self.conv(x)).flatten(1)))
        out = self.head(h)
        return out.index_add(0, rows, self.aux(h.index_select(0, rows)))


Batch = Tuple[Tensor, Tensor, Tensor]


def batches(n: int, size: int = BATCH, seed: int = 1) -> List[Batch]:
    """``n`` batches ``(x, y, rows)``; ``aux`` rows in the first quarter.

    So under two ranks (:func:`shard`) the second rank's ``aux`` gets none.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(size, CHANNELS, SIDE, SIDE, generator=g)
        y = torch.randint(0, CLASSES, (size, ), generator=g)
        out.append((x, y, torch.arange(size // 4)))
    return out


def shard(batch: Batch, rank: int, world: int) -> Batch:
    """Rank ``rank``'s contiguous share of ``batch``, ``aux`` rows re-indexed."""
    x, y, rows = batch
    n = len(x) // world
    lo = rank * n
    keep = rows[(rows >= lo) & (rows < lo + n)] - lo
    return x[lo:lo + n], y[lo:lo + n], keep


def train_step(model: nn.Module, opt: Any, batch: Batch, scale: float = 0.0,
               scaler: Any = None, dtype: Optional[torch.dtype] = None,
               overflow: bool = False) -> Tensor:
    """One iteration as the engine runs it; returns the (detached) loss.

    ``scale`` multiplies the summed loss (0: the mean over the batch), so that
    under DDP ``world / global_batch`` makes the averaged gradient that of
    the concatenated batch.  ``overflow`` multiplies the loss by inf.
    """
    x, y, rows = batch

    def closure() -> Tensor:
        with torch.autocast('cpu', dtype=dtype, enabled=dtype is not None):
            out = model(x, rows)
        out = out.float()
        if scale:
            return F.cross_entropy(out, y, reduction='sum') * scale
        return F.cross_entropy(out, y)

    opt.zero_grad()
    loss = closure()
    if overflow:
        loss = loss * float('inf')
    scaled = scaler.scale(loss) if scaler is not None else loss
    if getattr(opt, 'prepares_hessian', False):
        opt.prepare_hessian(scaled)  # DDP rejects backward(create_graph=True)
    scaled.backward()
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    if getattr(opt, 'needs_second_pass', False):
        # as SecondPassHook calls it: the first pass's loss comes along
        # (SMW_NG's rho-test needs f(theta); K-BFGS ignores it)
        opt.second_pass(closure, first_loss=loss.detach())
    return loss.detach()


def tensors_of(obj: Any, prefix: str = '') -> Dict[str, Tensor]:
    """Every tensor inside a nested ``state_dict``, by path."""
    out: Dict[str, Tensor] = {}
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors_of(v, f'{prefix}/{k}'))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors_of(v, f'{prefix}/{i}'))
    return out


def state_snapshot(opt: Any) -> Dict[str, Tensor]:
    """Clones of the optimizer's state tensors (timings left out)."""
    sd = opt.state_dict()
    return {k: v.detach().clone() for k, v in tensors_of(sd).items()
            if 'phase_seconds' not in k}


def nonfinite(model: nn.Module, opt: Any) -> List[str]:
    """Paths of parameters and state tensors that hold NaN / Inf."""
    bad = [n for n, p in model.named_parameters()
           if not torch.isfinite(p).all()]
    bad += [k for k, t in state_snapshot(opt).items()
            if t.is_floating_point() and not torch.isfinite(t).all()]
    return bad


def flat_params(model: nn.Module) -> Tensor:
    """All parameters in one vector."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

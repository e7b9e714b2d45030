# Copyright (c) mmprecond contributors. All rights reserved.
"""Round-robin Hessian diagonal of channel-wise 1-D parameters.

Shared by :class:`~mmprecond.optim.SGD_PH`, which scales its momentum by
it, and :class:`~mmprecond.engine.HessianOptimWrapper`, whose
``partial_hessian=`` companion scales the gradients of any optimizer's
normalisation layers by it.  It lives here, beside the other curvature
captures, so that the engine needs no import from :mod:`mmprecond.optim`.
"""
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..distributed import all_reduce_sum_, world_size
from ..logging import FallbackLog

#: Raised by a product that did not fit; re-raised, never a reason to disable.
_OUT_OF_MEMORY = getattr(torch, 'OutOfMemoryError', torch.cuda.OutOfMemoryError)

def fold_hessian_diag_(diag: Tensor, h: Tensor, decay: float,
                       valid: Optional[Tensor] = None) -> None:
    """``diag <- decay * diag + (1 - decay) * h`` in place.

    ``valid`` (a 0-dim device flag, see :meth:`PartialHessian.hessian_row_sums`)
    keeps ``diag`` as it is where some rank failed to form the product,
    without reading the flag on the host.
    """
    if valid is None:
        diag.mul_(decay).add_(h, alpha=1 - decay)
    else:
        diag.copy_(torch.where(valid, diag.mul(decay).add_(h, alpha=1 - decay),
                               diag))


#: Normalisation layers whose affine weight and bias are channel-wise.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)

MISSING_GRAPH_MSG = (
    '{name} needs the Hessian-vector product of the 1-D parameters, so the '
    'backward pass must keep its graph: loss.backward(create_graph=True).  In '
    'an MMEngine / OpenMMLab config use the mmprecond wrapper:\n'
    "    optim_wrapper = dict(type='HessianOptimWrapper', "
    "constructor='PrecondOptimWrapperConstructor', optimizer=dict(type="
    "'{name}', ...))")


def channel_params(model: nn.Module) -> List[Tensor]:
    """The trainable affine weights and biases of every normalisation layer."""
    out = []
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            for p in (getattr(module, 'weight', None), getattr(module, 'bias', None)):
                if isinstance(p, Tensor) and p.requires_grad:
                    out.append(p)
    return out


class PartialHessian:
    """Round-robin diagonal Hessian of channel-wise 1-D parameters.

    At each step one tensor ``p_k`` (``k = step % M``) gets the
    Hessian-vector product ``h = d(g_k^T 1)/d p_k`` (the row sums of its
    Hessian block, which equal its diagonal when the block is diagonal, as
    for normalisation layers of a channel-separable loss), rectified as
    ``|h|`` and folded into ``diag <- mu diag + (1 - mu) |h|``.

    The gradient with graph comes either from :meth:`prepare` (one
    ``autograd.grad(loss, p_k, create_graph=True)`` before an ordinary
    backward: what :class:`~mmprecond.engine.HessianOptimWrapper` does, and
    the only way under DDP, whose reducer rejects ``create_graph``
    backwards), or from a tensor hook on each parameter when the caller runs
    ``loss.backward(create_graph=True)`` itself.  Either way it is summed
    over gradient-accumulation micro-batches.  The per-rank products are
    averaged across ranks before the ``abs``, so DDP equals one process on
    the concatenated batch.

    A product that cannot be formed (an op on the path is only once
    differentiable and the product has to pass it) leaves that tensor
    first-order for good; counted under ``'hvp_unavailable'``.  Under
    torch.distributed the ranks agree on it without a host read: a failure
    flag rides in the product's all-reduce and sets the tensor's entry of
    the device mask :attr:`failed` on every rank, so every rank keeps
    joining the same collectives and holds the same state.  An
    out-of-memory error is re-raised (it says nothing about the graph, and
    disabling a tensor on one rank alone would make the ranks diverge).

    Args:
        params (list[Tensor]): The channel-wise parameters, in a fixed order.
        log (FallbackLog): Where fallbacks are counted.
    """

    def __init__(self, params: List[Tensor], log: FallbackLog) -> None:
        self.params = list(params)
        self.log = log
        self.steps = 0
        self.disabled: set = set()
        #: per tensor, whether its product failed on some rank (DDP only)
        self.failed: Optional[Tensor] = None
        self._fails_here: set = set()
        self._local_failure = False
        self._graph_grads: List[Tensor] = []
        self._products: List[Tensor] = []
        self._prepared = False
        self._handles = [
            p.register_hook(self._make_hook(i)) for i, p in enumerate(self.params)
        ]

    def _make_hook(self, index: int) -> Callable[[Tensor], None]:

        def hook(grad: Tensor) -> None:
            if index == self.turn() and not self._prepared:
                self._graph_grads.append(grad)

        return hook

    def turn(self) -> int:
        """Index of the tensor whose Hessian is computed this step."""
        return self.steps % len(self.params) if self.params else -1

    def _product(self, k: int, grad: Tensor) -> Optional[Tensor]:
        """``H_kk 1`` from a gradient with graph; ``None`` if impossible."""
        p = self.params[k]
        try:
            with torch.enable_grad():
                (h, ) = torch.autograd.grad(grad, p, torch.ones_like(grad),
                                            retain_graph=True, allow_unused=True)
        except RuntimeError as err:
            if isinstance(err, _OUT_OF_MEMORY):
                raise
            if world_size() > 1:
                # agreed on in the all-reduce of hessian_row_sums
                self._fails_here.add(k)
                self._local_failure = True
            else:
                self.disabled.add(k)
            self.log.record(
                'hvp_unavailable',
                f'Hessian-vector product of a {tuple(p.shape)} parameter failed '
                f'({str(err).splitlines()[0][:120]}); it keeps the first-order '
                'step')
            return None
        return torch.zeros_like(p) if h is None else h.detach()

    def prepare(self, loss: Tensor) -> None:
        """Form this step's Hessian-vector product from ``loss`` now.

        Call before a plain ``loss.backward()``: one extra backward with
        ``create_graph`` to this step's tensor and one through it.
        """
        k = self.turn()
        if k < 0 or k in self.disabled:
            return
        self._prepared = True
        if k in self._fails_here:
            self._local_failure = True
            return
        with torch.enable_grad():
            (grad, ) = torch.autograd.grad(loss, self.params[k], create_graph=True,
                                           retain_graph=True, allow_unused=True)
        if grad is None or grad.grad_fn is None:
            return  # no second-order dependence here: H_kk 1 = 0 from this loss
        h = self._product(k, grad)
        if h is not None:
            self._products.append(h)

    def clear(self) -> None:
        """Drop kept gradients (and with them the double-backward graph)."""
        self._graph_grads = []
        self._products = []
        self._prepared = False
        self._local_failure = False

    def hessian_row_sums(
            self, owner: str) -> Optional[Tuple[Tensor, Optional[Tensor]]]:
        """``|H_kk 1|`` of this step's tensor (averaged over ranks first).

        Returns ``None`` when the tensor got no gradient this step (or is
        disabled), else ``(h, valid)``: ``valid`` is ``None`` with one
        process and otherwise the device flag "no rank failed to form this
        tensor's product" (:attr:`failed`).  Raises ``RuntimeError`` when no
        backward kept its graph.
        """
        k = self.turn()
        if k < 0 or k in self.disabled:
            return None
        p = self.params[k]
        world = world_size()
        if world > 1 and not self._prepared and k in self._fails_here:
            self._local_failure = True
        if world > 1 and self._local_failure:
            h = torch.zeros_like(p)
            return self._agree(k, h)
        if self._prepared:
            if not self._products:
                # every rank must join the all-reduce below
                if p.grad is None and world_size() == 1:
                    return None
                h = torch.zeros_like(p)
            else:
                h = torch.stack(self._products).sum(0)
        else:
            if not self._graph_grads:
                if p.grad is not None:
                    raise RuntimeError(MISSING_GRAPH_MSG.format(name=owner))
                return None
            grad = torch.stack(self._graph_grads).sum(0)
            if grad.grad_fn is None:
                raise RuntimeError(MISSING_GRAPH_MSG.format(name=owner))
            h = self._product(k, grad)
            if h is None:
                if world == 1:
                    return None
                h = torch.zeros_like(p)
        if world > 1:
            return self._agree(k, h)
        return h.abs_(), None

    def _agree(self, k: int, h: Tensor) -> Tuple[Tensor, Tensor]:
        """All-reduce ``h`` with this rank's failure flag in one bucket."""
        p = self.params[k]
        if self.failed is None:
            self.failed = torch.zeros(len(self.params), dtype=torch.bool,
                                      device=p.device)
        flag = torch.full((1, ), float(self._local_failure), dtype=h.dtype,
                          device=h.device)
        all_reduce_sum_([h, flag])
        h.div_(world_size())
        self.failed[k] |= flag[0] > 0
        return h.abs_(), self.failed[k].logical_not()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

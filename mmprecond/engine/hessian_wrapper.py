# Copyright (c) mmprecond contributors. All rights reserved.
"""An optim wrapper that lets the optimizer differentiate the gradient again."""
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from mmengine.optim import OptimWrapper
from mmengine.registry import OPTIM_WRAPPERS
from torch import Tensor

from ..curvature.hessian import PartialHessian, channel_params, fold_hessian_diag_
from ..logging import FallbackLog
from ..protocol import EngineProtocol


def _own_hessian(optimizer) -> bool:
    """Whether ``optimizer`` forms its Hessian products itself (SGD_PH)."""
    return isinstance(optimizer, EngineProtocol) and optimizer.prepares_hessian


@OPTIM_WRAPPERS.register_module()
class HessianOptimWrapper(OptimWrapper):
    """``OptimWrapper`` for Hessian-vector products of 1-D parameters.

    MMEngine's ``OptimWrapper`` (gradient accumulation, ``clip_grad``,
    ``update_params``) with a different :meth:`backward`:

    * if the optimizer has ``prepare_hessian(loss)`` (``SGD_PH``), that is
      called first (it forms this step's Hessian-vector product with its own
      ``create_graph`` pass), then the ordinary ``loss.backward()`` runs.
      This also works under DDP, whose reducer rejects
      ``backward(create_graph=True)``;
    * with ``partial_hessian=dict(...)`` the wrapper itself is SGD-PH's
      companion for any optimizer (e.g. NKFAC / AdaNKFAC, which leave norm
      layers to their base step): it forms the round-robin Hessian diagonal
      of the normalisation layers' weights and biases and, before
      ``optimizer.step()`` (and before gradient clipping), replaces their
      gradients by ``tau (1 - mu^(floor(t/M)+1)) g / (diag + eps)``.  The
      optimizer's base step then runs on that direction (so momentum acts
      on the scaled gradient, whereas ``SGD_PH`` scales the momentum
      buffer).  Needs the model: built through
      :class:`~mmprecond.engine.PrecondOptimWrapperConstructor`;
    * otherwise ``loss.backward(create_graph=True)`` runs, leaving the graph
      in the gradients until ``zero_grad`` (``set_to_none``) drops them,
      which ``update_params`` does every step (torch's warning about that
      reference cycle is silenced here).

    Mixed precision (``AmpOptimWrapper``) is not combined with it: the
    second derivative of the scaled loss would need its own unscaling.

    Args:
        optimizer (Optimizer): The optimizer.
        partial_hessian (dict, optional): ``tau`` (1e-3), ``eps`` (1e-4) and
            ``decay`` (``mu`` of the Hessian EMA, 0.9) of the companion.
        **kwargs: ``OptimWrapper``'s (``accumulative_counts``,
            ``clip_grad``).

    Example:
        >>> optim_wrapper = dict(
        ...     type='HessianOptimWrapper',
        ...     constructor='PrecondOptimWrapperConstructor',
        ...     optimizer=dict(type='SGD_PH', lr=0.01, weight_decay=5e-3))
        >>> companion = dict(
        ...     type='HessianOptimWrapper',
        ...     constructor='PrecondOptimWrapperConstructor',
        ...     partial_hessian=dict(tau=1e-3),
        ...     optimizer=dict(type='NKFAC', lr=0.02, weight_decay=1e-4))
    """

    def __init__(self, optimizer, partial_hessian: Optional[dict] = None,
                 **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.ph_cfg: Optional[Dict[str, float]] = None
        if partial_hessian is not None:
            unknown = set(partial_hessian) - {'tau', 'eps', 'decay'}
            if unknown:
                raise ValueError(f'unknown partial_hessian keys: {sorted(unknown)}')
            if _own_hessian(optimizer):
                raise ValueError(f'{type(optimizer).__name__} already has its '
                                 'partial Hessian; drop partial_hessian=')
            self.ph_cfg = dict(dict(tau=1e-3, eps=1e-4, decay=0.9),
                               **partial_hessian)
        self.partial_hessian: Optional[PartialHessian] = None
        self._diag: List[Tensor] = []

    def attach_model(self, model: nn.Module) -> None:
        """Find the companion's parameters (called by the constructor)."""
        if self.ph_cfg is None:
            return
        owned = {id(p) for g in self.optimizer.param_groups for p in g['params']}
        params = [p for p in channel_params(model) if id(p) in owned]
        ours = self.optimizer if isinstance(self.optimizer, EngineProtocol) \
            else None
        log = (ours.fallbacks if ours is not None else None) or FallbackLog(
            type(self).__name__)
        self.partial_hessian = PartialHessian(params, log)
        self._diag = [torch.zeros_like(p) for p in params]

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """Hessian preparation, then ``loss.backward(**kwargs)``."""
        prepare = (self.optimizer.prepare_hessian
                   if _own_hessian(self.optimizer) else None)
        if prepare is None and self.partial_hessian is not None:
            prepare = self.partial_hessian.prepare
        elif prepare is None and self.ph_cfg is not None:
            raise RuntimeError('HessianOptimWrapper(partial_hessian=...) needs '
                               "the model: build it with constructor="
                               "'PrecondOptimWrapperConstructor'")
        if prepare is not None:
            prepare(loss)
            super().backward(loss, **kwargs)
            return
        kwargs.setdefault('create_graph', True)
        with warnings.catch_warnings():
            warnings.filterwarnings(
                'ignore', message='Using backward.. with create_graph=True')
            super().backward(loss, **kwargs)

    def step(self, **kwargs) -> None:
        """Companion scaling of the 1-D gradients, then ``OptimWrapper.step``."""
        if self.partial_hessian is not None:
            self._scale_channel_grads()
        super().step(**kwargs)

    @torch.no_grad()
    def _scale_channel_grads(self) -> None:
        ph, cfg = self.partial_hessian, self.ph_cfg
        if not ph.params:
            return
        k = ph.turn()
        out = ph.hessian_row_sums(type(self).__name__)
        ph.clear()
        mu = cfg['decay']
        if out is not None:
            h, valid = out
            fold_hessian_diag_(self._diag[k], h, mu, valid)
        bc = 1 - mu**(ph.steps // len(ph.params) + 1)
        pairs = [(p.grad, d) for p, d in zip(ph.params, self._diag)
                 if p.grad is not None]
        if pairs:
            grads, diags = (list(t) for t in zip(*pairs))
            denom = torch._foreach_add(diags, cfg['eps'])
            torch._foreach_div_(grads, denom)
            torch._foreach_mul_(grads, cfg['tau'] * bc)
        ph.steps += 1

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        if self.partial_hessian is not None:
            sd['partial_hessian'] = dict(
                steps=self.partial_hessian.steps,
                disabled=sorted(self.partial_hessian.disabled),
                diag=[d.clone() for d in self._diag])
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop('partial_hessian', None)
        super().load_state_dict(state_dict)
        if extra is not None and self.partial_hessian is not None:
            self.partial_hessian.steps = int(extra['steps'])
            self.partial_hessian.disabled = set(extra['disabled'])
            for d, saved in zip(self._diag, extra['diag']):
                d.copy_(saved)

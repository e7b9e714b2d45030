# Copyright (c) mmprecond contributors. All rights reserved.
"""SGD-PH: SGD with a partial-Hessian Newton step for channel-wise 1-D parameters.

Reference: Y. Sun, H. Yong, L. Zhang, *A Novel Partial Hessian Optimizer for
Deep Neural Networks* (arXiv:2403.02681); Y. Sun, *Designing Effective
Preconditioned Optimizers for Deep Neural Network Training*, PhD thesis,
PolyU 2024, chapter 2 (Algorithm 1).
"""
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.registry import OPTIMIZERS
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as sgd_functional

from ..curvature.hessian import PartialHessian, channel_params, fold_hessian_diag_
from ..logging import FallbackLog
from ..protocol import EngineProtocol
from .base import check_positive, check_unit_interval, finite_flags


@OPTIMIZERS.register_module()
class SGD_PH(Optimizer, EngineProtocol):
    r"""SGD-PH: partial-Hessian Newton step for channel-wise 1-D parameters.

    Algorithm (thesis Algorithm 1 with the authors' code's details)::

        for t = 0, 1, ...:
            g = grad L(W)                      (backward with create_graph)
            k = t mod M                        (one 1-D tensor per step)
            h = |d(g_k^T 1) / d p_k|           (Hessian-vector product)
            diag_k <- mu diag_k + (1 - mu) h
            for every parameter:  buf <- mu buf + g          (buf_0 = g)
            1-D channel-wise:     d = tau (1 - mu^(floor(t/M)+1)) buf / (diag + eps)
                                  d <- d + wd p
            other parameters:     buf <- buf + wd p;  d = buf
            p <- p - lr d

    Every other parameter gets exactly ``torch.optim.SGD`` (momentum, coupled
    L2 decay, no dampening), so without channel-wise parameters SGD_PH is
    ``torch.optim.SGD`` step for step.  The EMA weights 0.9 on the *old*
    curvature and gradient, as the authors' code does (the thesis' eqs.
    2.5/2.6 print it on the new term); the Hessian EMA uses the momentum
    ``mu`` as its decay, also as in the code.

    Which parameters are channel-wise (``scope``):

    * ``'norm'`` (default): affine weights and biases of BatchNorm /
      GroupNorm / LayerNorm / InstanceNorm modules of ``model``. Their
      Hessian block is diagonal when channels are not mixed before the loss;
      otherwise the product returns the block's row sums, which is what the
      method computes.
    * ``'all_1d'``: every 1-D parameter except the last one (the authors'
      code; the last is usually the classifier bias).

    The Hessian-vector product needs the graph of the gradient: either
    ``loss.backward(create_graph=True)`` (single process), or
    ``opt.prepare_hessian(loss)`` followed by a plain ``loss.backward()``
    (also under DDP).  Through MMEngine use ``type='HessianOptimWrapper'``
    (:class:`~mmprecond.engine.HessianOptimWrapper`), which does the latter.
    A step without that graph raises a ``RuntimeError`` saying so.

    Args:
        params (Iterable): Parameters or parameter groups.
        lr (float): Learning rate. Defaults to 0.01 (thesis, CIFAR).
        momentum (float): ``mu``, for gradient and curvature. 0.9.
        weight_decay (float): Coupled L2 decay (not preconditioned). 0.
        tau (float): ``tau_SO``, scale of the Newton step. 1e-3.
        eps (float): Added to ``|H|``. 1e-4.
        model (nn.Module, optional): Needed for ``scope='norm'``.
        scope (str): ``'norm'`` or ``'all_1d'``. Defaults to ``'norm'``.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> opt = SGD_PH(model.parameters(), model=model, lr=0.01)
        >>> model(torch.randn(2, 3, 8, 8)).pow(2).mean().backward(
        ...     create_graph=True)
        >>> opt.step(); opt.zero_grad()
    """

    requires_model = True

    def __init__(self,
                 params: Iterable,
                 lr: float = 0.01,
                 momentum: float = 0.9,
                 weight_decay: float = 0.0,
                 tau: float = 1e-3,
                 eps: float = 1e-4,
                 *,
                 model: Optional[nn.Module] = None,
                 scope: str = 'norm') -> None:
        check_positive('lr', lr, allow_zero=True)
        check_unit_interval('momentum', momentum)
        check_positive('weight_decay', weight_decay, allow_zero=True)
        check_positive('tau', tau)
        check_positive('eps', eps)
        super().__init__(params, dict(lr=lr, momentum=momentum,
                                      weight_decay=weight_decay, tau=tau, eps=eps))
        self.fallbacks = FallbackLog(type(self).__name__)
        owned = [p for g in self.param_groups for p in g['params']]
        if scope == 'norm':
            if model is None:
                raise TypeError(
                    "SGD_PH(scope='norm') finds the normalisation layers in the "
                    'model: pass model=... (PrecondOptimWrapperConstructor '
                    "does), or use scope='all_1d'")
            chosen = {id(p) for p in channel_params(model)}
            ph = [p for p in owned if id(p) in chosen]
        elif scope == 'all_1d':
            ph = [p for p in owned if p.dim() == 1 and p.requires_grad][:-1]
        else:
            raise ValueError(f"Invalid scope: {scope!r} ('norm' or 'all_1d')")
        self._ph_ids = {id(p) for p in ph}
        self.partial_hessian = PartialHessian(ph, self.fallbacks)

    def prepare_hessian(self, loss: Tensor) -> None:
        """Record what the Hessian-vector product needs, before ``backward``.

        ``opt.prepare_hessian(loss); loss.backward()`` replaces
        ``loss.backward(create_graph=True)`` and works under DDP; see
        :meth:`PartialHessian.prepare`.
        """
        self.partial_hessian.prepare(loss)

    @property
    def steps(self) -> int:
        return self.partial_hessian.steps

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.partial_hessian.clear()
        super().zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Perform one optimization step (see the class docstring)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        ph = self.partial_hessian
        k = ph.turn()
        out = ph.hessian_row_sums(type(self).__name__)
        ph.clear()
        h, valid = (None, None) if out is None else out
        with torch.no_grad():
            ok = self._gradients_finite()
            if h is not None:
                # a non-finite Hessian row sum is not folded either
                finite = torch.isfinite(h).all()
                self.fallbacks.record_flags(
                    'nonfinite_hessian', finite.logical_not().reshape(1),
                    ['hessian_diag'], 'non-finite Hessian row sums were not '
                    'folded')
                good = finite if ok is None else finite & ok
                valid = good if valid is None else valid & good
            before = self._snapshot() if ok is not None else None
            for group in self.param_groups:
                self._group_step(group, h, ph.params[k] if h is not None else None,
                                 len(ph.params), valid)
            if before is not None:
                self._keep_where(ok, before)
        ph.steps += 1
        return loss

    def _gradients_finite(self) -> Optional[Tensor]:
        """Device flag: every gradient is finite (``None``: no gradients).

        A step with a NaN / Inf gradient entry leaves the parameters, the
        momentum buffers and the Hessian diagonals as they were (chosen
        with ``torch.where`` after the step, no host read) and is counted
        under ``'nonfinite_gradient_skipped'``; only the round-robin step
        counter (a host int) advances.
        """
        grads = [p.grad for g in self.param_groups for p in g['params']
                 if p.grad is not None and not p.grad.is_sparse]
        if not grads:
            return None
        ok = finite_flags(grads).all()
        self.fallbacks.record_flags(
            'nonfinite_gradient_skipped', ok.logical_not().reshape(1), ['step'],
            'non-finite gradient: the step was skipped (weights, momentum and '
            'Hessian diagonals unchanged)')
        return ok

    def _snapshot(self) -> List[Tuple[Tensor, Tensor, Dict[str, Tensor]]]:
        """Copies of every stepped parameter and its state tensors."""
        return [(p, p.detach().clone(),
                 {k: v.clone() for k, v in self.state[p].items()
                  if isinstance(v, Tensor)} if p in self.state else {})
                for g in self.param_groups for p in g['params']
                if p.grad is not None]

    def _keep_where(self, ok: Tensor,
                    before: List[Tuple[Tensor, Tensor, Dict[str, Tensor]]]
                    ) -> None:
        """Undo this step where ``ok`` is false (a state tensor the step
        created becomes zeros, which every update here starts from)."""
        for p, old_p, old_st in before:
            p.copy_(torch.where(ok, p, old_p))
            st = self.state.get(p, {})
            for key, v in st.items():
                if not isinstance(v, Tensor):
                    continue
                old = old_st.get(key)
                st[key] = torch.where(ok, v,
                                      torch.zeros_like(v) if old is None else old)

    def _group_step(self, group: Dict[str, Any], h: Optional[Tensor],
                    hp: Optional[Tensor], num_ph: int,
                    valid: Optional[Tensor] = None) -> None:
        lr, mu, wd = group['lr'], group['momentum'], group['weight_decay']
        plain, plain_grads, plain_bufs = [], [], []
        curv, curv_grads, curv_bufs, curv_diags = [], [], [], []
        for p in group['params']:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError('SGD_PH does not support sparse gradients')
            st = self.state[p]
            if id(p) in self._ph_ids:
                if 'hessian_diag' not in st:
                    st['hessian_diag'] = torch.zeros_like(p)
                    st['momentum_buffer'] = torch.zeros_like(p)
                if p is hp:
                    fold_hessian_diag_(st['hessian_diag'], h, mu, valid)
                curv.append(p)
                curv_grads.append(p.grad.detach())
                curv_bufs.append(st['momentum_buffer'])
                curv_diags.append(st['hessian_diag'])
            else:
                plain.append(p)
                plain_grads.append(p.grad.detach())
                plain_bufs.append(st.get('momentum_buffer'))
        if plain:
            sgd_functional(plain, plain_grads, plain_bufs, weight_decay=wd,
                           momentum=mu, lr=lr, dampening=0.0, nesterov=False,
                           maximize=False, foreach=None)
            if mu != 0:
                for p, buf in zip(plain, plain_bufs):
                    self.state[p]['momentum_buffer'] = buf
        if curv:
            torch._foreach_mul_(curv_bufs, mu)
            torch._foreach_add_(curv_bufs, curv_grads)
            bc = 1 - mu**(self.steps // max(num_ph, 1) + 1)
            denom = torch._foreach_add(curv_diags, group['eps'])
            upd = torch._foreach_div(curv_bufs, denom)
            torch._foreach_mul_(upd, group['tau'] * bc)
            if wd != 0:
                torch._foreach_add_(upd, curv, alpha=wd)
            torch._foreach_add_(curv, upd, alpha=-lr)

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        ph = self.partial_hessian
        sd['partial_hessian'] = dict(steps=ph.steps, disabled=sorted(ph.disabled))
        if ph.failed is not None:
            sd['partial_hessian']['failed'] = ph.failed.clone()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop('partial_hessian', None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.partial_hessian.steps = int(extra['steps'])
            self.partial_hessian.disabled = set(extra['disabled'])
            failed = extra.get('failed')
            ph = self.partial_hessian
            ph.failed = (None if failed is None or not ph.params else
                         failed.to(ph.params[0].device, torch.bool))
        else:
            self.fallbacks.record(
                'missing_preconditioner_state',
                'checkpoint has no SGD_PH step counter; the round robin restarts')

    # ---------------------------------------------------- engine protocol
    #: :class:`~mmprecond.engine.HessianOptimWrapper` calls
    #: :meth:`prepare_hessian` before each backward.
    prepares_hessian = True

# Copyright (c) mmprecond contributors. All rights reserved.
"""Shampoo baseline on the batched inverse-root machinery.

Reference: V. Gupta, T. Koren, Y. Singer, *Shampoo: Preconditioned
Stochastic Tensor Optimization*, ICML 2018 (Algorithm 1, order-2 case);
grafting: R. Anil et al., *Scalable Second Order Optimization for Deep
Learning*, 2020.
"""
from typing import Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.registry import OPTIMIZERS

from ..curvature.capture import factor_dims, gradient_matrix
from ..curvature.factors import BatchStatistics, ema_update
from .adabk import KroneckerRoot
from .nkfac import DEFAULT_MAX_FACTOR_DIM


@OPTIMIZERS.register_module()
class Shampoo(KroneckerRoot):
    r"""Shampoo: ``L^{-1/4} G R^{-1/4}`` from gradient statistics, on SGDM.

    Algorithm (order 2: each Linear / Conv2d gradient as the
    ``d_out x d_in`` matrix ``G``, bias as its last column)::

        for t = 0, 1, ...:
            if t % T_s == 0:  L <- b L + (1-b) G G^T;   R <- b R + (1-b) G^T G
            if t % T_ir == 0:
                L^ = (L + eps_L I)^{-1/4};  R^ = (R + eps_R I)^{-1/4}
                     (coupled Newton-Schulz, from scratch, batched per size:
                      A^{-1/4} = (A^{1/2})^{-1/2})
            G^ = L^ G R^
            grafting 'sgd':  G^ <- G^ ||G||_F / ||G^||_F   (per layer)
            d = G^ + wd W;  buf = mu buf + d;  W <- W - lr buf

    Statistics are an EMA of the (already rank-averaged) gradient's Gram
    matrices rather than the paper's running sum, so the step size does not
    shrink over time; no hooks are needed.  Damping is
    ``eps = damping * lambda_max`` by default (bounded condition number, so
    the fixed Newton–Schulz budget converges; see
    :mod:`mmprecond.inverse_root`); ``abs_damping`` gives the paper's
    absolute ``eps I``.  With ``grafting='sgd'`` each layer's step
    has the norm of its SGD step (layer-wise grafting), which keeps SGD's
    learning rate; ``'none'`` is the raw Shampoo direction.  Other
    parameters (norms, embeddings, ...) get the SGDM step on their raw
    gradient; with every layer excluded Shampoo is ``torch.optim.SGD``.

    Args:
        params (Iterable): Parameters or parameter groups.
        lr (float): Learning rate. Defaults to 0.02.
        momentum (float): Momentum. Defaults to 0.9.
        weight_decay (float): Coupled L2 decay (not preconditioned). 0.
        nesterov (bool): Nesterov momentum. Defaults to False.
        model (nn.Module): Model whose Linear / Conv2d layers are
            preconditioned.
        stat_interval (int): ``T_s``. Defaults to 1.
        refresh_interval (int): ``T_ir``: roots every this many steps.
            Defaults to 100.
        damping (float): ``eps``, relative to ``lambda_max``. Defaults to
            1e-4.
        abs_damping (float, optional): The paper's absolute ``eps`` instead
            of ``damping`` (which it replaces). Defaults to None.
        ns_iters (int): Newton–Schulz iterations per square root (two
            nested runs per factor). Defaults to 25.
        stat_decay (float): ``b``. Defaults to 0.99.
        grafting (str): ``'sgd'`` or ``'none'``. Defaults to ``'sgd'``.
        max_factor_dim (int): Larger factors are not formed (identity).
        skip_nonfinite_steps, factor_memory_budget_mb,
        checkpoint_inverses: See :class:`~mmprecond.optim.PrecondOptimizer`.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> opt = Shampoo(model.parameters(), model=model, lr=0.1)
        >>> model(torch.randn(16, 8)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    root = 4
    frobenius_statistics = False

    def __init__(self,
                 params: Iterable,
                 *,
                 model: Optional[nn.Module] = None,
                 lr: float = 0.02,
                 momentum: float = 0.9,
                 weight_decay: float = 0.0,
                 nesterov: bool = False,
                 stat_interval: int = 1,
                 refresh_interval: int = 100,
                 damping: float = 1e-4,
                 abs_damping: Optional[float] = None,
                 ns_iters: int = 25,
                 stat_decay: float = 0.99,
                 grafting: str = 'sgd',
                 max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
                 skip_nonfinite_steps: bool = False,
                 factor_memory_budget_mb: Optional[float] = None,
                 checkpoint_inverses: bool = True) -> None:
        if grafting not in ('sgd', 'none'):
            raise ValueError(f"Invalid grafting: {grafting!r} ('sgd' or 'none')")
        super().__init__(params, base='sgdm', model=model, lr=lr,
                         momentum=momentum, weight_decay=weight_decay,
                         nesterov=nesterov, stat_interval=stat_interval,
                         refresh_interval=refresh_interval, damping=damping,
                         abs_damping=abs_damping, ns_iters=ns_iters,
                         stat_decay=stat_decay,
                         grad_norm_recovery=grafting == 'sgd',
                         max_factor_dim=max_factor_dim,
                         skip_nonfinite_steps=skip_nonfinite_steps,
                         factor_memory_budget_mb=factor_memory_budget_mb,
                         checkpoint_inverses=checkpoint_inverses)
        self._skipped: Optional[torch.Tensor] = None

    def capture_sides(self, module: nn.Module) -> Tuple[bool, bool]:
        """Shampoo's statistics come from the gradient: nothing is captured."""
        return False, False

    def factor_bytes(self, module: nn.Module) -> int:
        """``L`` and ``R`` (from the gradient, not captured) and their roots,
        fp32, for the sides within ``max_factor_dim``."""
        d_out, d_in = factor_dims(module)
        return 2 * 4 * sum(d * d for d in (d_out, d_in) if self.side_enabled(d))

    def update_statistics(self, stats: Dict[str, BatchStatistics], step: int) -> None:
        """Fold ``G G^T`` and ``G^T G`` into the EMAs without reading the device.

        A non-finite gradient leaves the factors unchanged (``torch.where``);
        such skips are counted on the device and reported under
        ``'nonfinite_statistics'`` at the next refresh.
        """
        for name, module in self.layers.items():
            g = gradient_matrix(module)
            if g is None:
                continue
            g = g.float()
            st = self.layer_state.setdefault(name, {})
            finite = torch.isfinite(g).all()
            self._skipped = (~finite).int() + (0 if self._skipped is None else
                                               self._skipped)
            for side, _ in self._sides(module):
                new = g @ g.T if side == 'L' else g.T @ g
                old = st.get(side)
                prev = torch.zeros_like(new) if old is None else old
                st[side] = torch.where(finite, ema_update(prev.clone(), new,
                                                          self.stat_decay), prev)

    def update_preconditioners(self, step: int) -> None:
        if self._skipped is not None and step % self.refresh_interval == 0:
            skipped = int(self._skipped)
            self._skipped = None
            if skipped:
                self.fallbacks.record(
                    'nonfinite_statistics', 'non-finite gradient; statistics '
                    'not folded', n=skipped)
        super().update_preconditioners(step)

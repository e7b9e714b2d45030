# Copyright (c) mmprecond contributors. All rights reserved.
"""AdaBK (SGDM_BK, AdamW_BK): Kronecker factors with an inverse square root.

Reference: H. Yong, Y. Sun, L. Zhang, *A General Regret Bound of
Preconditioned Gradient Method for DNN Training*, CVPR 2023 (Algorithm 2,
eqs. 16-19).
"""
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch.nn as nn
from mmengine.registry import OPTIMIZERS

from ..inverse_root import inverse_roots
from .base import check_positive
from .defaults import adamw_defaults, sgdm_defaults
from .diagnostics import root_diagnostics
from .nkfac import DEFAULT_MAX_FACTOR_DIM, _KroneckerInverse


class _KroneckerRoot(_KroneckerInverse):
    """Kronecker preconditioner with ``L^{-1/p} G R^{-1/p}``, ``p`` in {2, 4}.

    The statistics, layer handling, bias column, norm recovery, state and
    base updates are those of :class:`~mmprecond.optim.nkfac._KroneckerInverse`;
    only the refresh differs.  Every ``inv_interval`` steps (and for a
    factor seen for the first time) all due factors are damped,
    ``A = S + eps lambda_max(S) I`` (or ``+ eps I`` with
    ``relative_damping=False``), and their inverse ``p``-th roots are
    computed *from scratch* by ``ns_iters`` coupled Newton–Schulz iterations
    with trace normalisation, batched over factors of equal size
    (:func:`~mmprecond.inverse_root.inverse_roots`).  A root that comes out
    non-finite is not stored, and is counted under ``'root_fallback'``: that
    side stays unpreconditioned and is retried after the next statistics
    update.  This happens for all-zero factors, e.g. the output side of
    every conv in a residual branch behind a zero-initialised norm
    (mmdet's ResNet, ``zero_init_residual``) at step 0, where the authors'
    code would divide by a zero trace.  Every rank computes every root (the
    factors are identical across ranks), so no broadcast is needed.
    """

    #: Root order ``p``; subclasses set 2 (AdaBK) or 4 (Shampoo).
    root = 2

    def __init__(self, params: Iterable, defaults: dict, model: Optional[nn.Module],
                 base: str, stat_interval: int, inv_interval: int, damping: float,
                 relative_damping: bool, ns_iters: int, stat_decay: float,
                 grad_norm_recovery: bool, max_factor_dim: int,
                 skip_nonfinite_steps: bool = False,
                 factor_memory_budget_mb: Optional[float] = None,
                 checkpoint_inverses: bool = True) -> None:
        check_positive('damping', damping)
        self.set_reliability_options(skip_nonfinite_steps,
                                     factor_memory_budget_mb,
                                     checkpoint_inverses)
        if int(ns_iters) < 1:
            raise ValueError(f'Invalid ns_iters: {ns_iters} (>= 1)')
        super().__init__(params, defaults, model, base, stat_interval,
                         inv_interval, exact_inv_period=1, newton_steps=1,
                         damping=damping, damping_floor=1e-30,
                         stat_decay=stat_decay,
                         grad_norm_recovery=grad_norm_recovery,
                         max_factor_dim=max_factor_dim, exact_only=False,
                         shard_inverses=False)
        self.relative_damping = bool(relative_damping)
        self.ns_iters = int(ns_iters)
        #: set by :meth:`load_state_dict`: compute missing roots at once
        self._roots_after_load = False

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a checkpoint; roots it lacks (``checkpoint_inverses=False``)
        are computed at the next step, whatever its phase."""
        super().load_state_dict(state_dict)
        self._roots_after_load = True

    def update_preconditioners(self, step: int) -> None:
        periodic = step % self.inv_interval == 0
        # a missing root (never computed, or its computation failed) is
        # retried when new statistics arrive; right after loading, at once
        retry = self.is_stat_step(step) or self._roots_after_load
        self._roots_after_load = False
        due: List[Tuple[dict, str]] = []
        for name, module in self.layers.items():
            st = self.layer_state.get(name)
            if not st:
                continue
            for side, _ in self._sides(module):
                missing = side + '_inv' not in st
                if side in st and (periodic or missing and retry):
                    due.append((st, side))
        if not due:
            return
        roots, ok = inverse_roots([st[side] for st, side in due], self.root,
                                  self.damping, self.ns_iters,
                                  self.relative_damping)
        failed = ok.count(False)
        if failed:
            self.fallbacks.record(
                'root_fallback', 'an inverse root was not finite (an all-zero '
                'factor, e.g. behind a zero-initialised norm); that side is left '
                'unpreconditioned until its statistics change', n=failed)
        for (st, side), r, good in zip(due, roots, ok):
            if good:
                st[side + '_inv'] = r
            else:
                st.pop(side + '_inv', None)

    def diagnostics(self) -> Dict[str, Any]:
        """``lambda_max``, ``damping``, ``root_error`` of the inverse roots
        (see :mod:`mmprecond.optim.diagnostics`); no Newton residual."""
        return root_diagnostics(self.layer_state, self.root, self.damping,
                                self.relative_damping)


@OPTIMIZERS.register_module()
class SGDM_BK(_KroneckerRoot):
    r"""SGDM_BK: AdaBK's block-diagonal Kronecker preconditioner on SGDM.

    Algorithm (Yong et al., CVPR 2023, Algorithm 2, with the authors'
    code's statistics)::

        for t = 0, 1, ...:
            if t % T_s == 0:     (statistics of this iteration's forward/backward)
                L <- a L + (1-a) Delta^T Delta;   R <- a R + (1-a) X^T X / rows
            if t % T_ir == 0:
                L^ = (L + eps lmax(L) I)^{-1/2};  R^ = (R + eps lmax(R) I)^{-1/2}
                     (10 power iterations; K coupled Newton-Schulz iterations
                      from scratch on the trace-normalised matrix)
            G^ = L^ G R^;   G~ = G^ ||G||_F / ||G^||_F      (bias = last column)
            d = G~ + wd W;  buf = mu buf + d;  W <- W - lr buf

    The regret analysis gives ``H = L^{1/2} (x) R^{1/2}`` (exponent -1/2,
    unlike KFAC's -1).  ``L, R`` start at zero and fold the raw statistics
    (the code; the paper's Algorithm 1 starts them at ``eps I``), so the
    first ``T_ir`` steps use the statistics of step 0 alone.  K = 10 with
    trace normalisation is kept as in the paper: it does not converge for
    eigenvalues below about ``1e-3 tr(A)``, which acts as extra damping
    (see :mod:`mmprecond.inverse_root`).  The statistics are averaged over
    ranks every statistics step (the code only before an inversion), so DDP
    equals one process on the concatenated batch.  ``lambda_max`` starts
    from a fixed pseudo-random vector rather than the code's all-ones one.

    Parameters outside preconditioned ``Linear`` / ``Conv2d`` layers (norms,
    embeddings, grouped convs, ...) get the same SGDM step on their raw
    gradient; with every layer excluded SGDM_BK is ``torch.optim.SGD``.

    Args:
        params (Iterable): Parameters or parameter groups.
        lr (float): Learning rate. Defaults to 0.02 (COCO, paper).
        momentum (float): Momentum. Defaults to 0.9.
        weight_decay (float): Coupled L2 decay, added after
            preconditioning. Defaults to 0.
        nesterov (bool): Nesterov momentum. Defaults to False.
        model (nn.Module): Model whose layers are hooked.
        stat_interval (int): ``T_s``. Defaults to 200.
        inv_interval (int): ``T_ir``. Defaults to 2000.
        damping (float): ``eps``, relative to ``lambda_max``. 1e-5.
        relative_damping (bool): ``False`` adds ``eps I``. Defaults to True.
        ns_iters (int): Newton–Schulz iterations ``K``. Defaults to 10.
        stat_decay (float): ``alpha``. Defaults to 0.9.
        grad_norm_recovery (bool): Rescale to the raw gradient's norm (eq.
            19). Defaults to True.
        max_factor_dim (int): Larger factors are not formed (that side is
            identity). See :data:`~mmprecond.optim.nkfac.DEFAULT_MAX_FACTOR_DIM`.
        skip_nonfinite_steps, factor_memory_budget_mb,
        checkpoint_inverses: As in :class:`~mmprecond.optim.NKFAC` (the
            saved-without-inverses resume recomputes each root from scratch
            at the first step after loading).

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> opt = SGDM_BK(model.parameters(), model=model, lr=0.1,
        ...               stat_interval=1, inv_interval=5)
        >>> model(torch.randn(16, 8)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
    """

    frobenius_statistics = False

    def __init__(self,
                 params: Iterable,
                 lr: float = 0.02,
                 momentum: float = 0.9,
                 weight_decay: float = 0.0,
                 nesterov: bool = False,
                 *,
                 model: Optional[nn.Module] = None,
                 stat_interval: int = 200,
                 inv_interval: int = 2000,
                 damping: float = 1e-5,
                 relative_damping: bool = True,
                 ns_iters: int = 10,
                 stat_decay: float = 0.9,
                 grad_norm_recovery: bool = True,
                 max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
                 skip_nonfinite_steps: bool = False,
                 factor_memory_budget_mb: Optional[float] = None,
                 checkpoint_inverses: bool = True) -> None:
        defaults = sgdm_defaults(lr, momentum, weight_decay, nesterov)
        super().__init__(params, defaults, model, 'sgdm', stat_interval,
                         inv_interval, damping, relative_damping, ns_iters,
                         stat_decay, grad_norm_recovery, max_factor_dim,
                         skip_nonfinite_steps, factor_memory_budget_mb,
                         checkpoint_inverses)


@OPTIMIZERS.register_module()
class AdamW_BK(_KroneckerRoot):
    r"""AdamW_BK: AdaBK's Kronecker preconditioner on an AdamW base.

    Algorithm::

        G~ = AdaBK-preconditioned, norm-recovered gradient (see SGDM_BK)
        W <- W (1 - lr wd)                               (decoupled decay)
        m <- b1 m + (1-b1) G~;   v <- b2 v + (1-b2) G~^2
        W <- W - lr/(1-b1^k) m / (sqrt(v)/sqrt(1-b2^k) + eps)

    The base step is exactly ``torch.optim.AdamW``, so with every layer
    excluded AdamW_BK reproduces it step for step.  (The authors' code
    multiplies the decoupled decay by ``lr / (1 - b1^k)``, which decays more
    in early iterations; we keep torch's AdamW, as AdaNKFAC does, so ``lr``
    and ``weight_decay`` carry over from AdamW configs.)

    Args:
        params (Iterable): Parameters or parameter groups.
        lr (float): Learning rate. Defaults to 1e-4 (COCO, paper).
        betas (tuple[float, float]): Adam betas. Defaults to (0.9, 0.999).
        eps (float): Adam epsilon. Defaults to 1e-8.
        weight_decay (float): Decoupled weight decay. Defaults to 0.02 (the
            paper's Swin Mask R-CNN value).
        model, stat_interval, inv_interval, damping, relative_damping,
        ns_iters, stat_decay, grad_norm_recovery, max_factor_dim,
        skip_nonfinite_steps, factor_memory_budget_mb,
        checkpoint_inverses: As in :class:`SGDM_BK`.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
        >>> opt = AdamW_BK(model.parameters(), model=model, lr=1e-3)
        >>> model(torch.randn(2, 3, 8, 8)).mean().backward()
        >>> opt.step()
    """

    frobenius_statistics = False

    def __init__(self,
                 params: Iterable,
                 lr: float = 1e-4,
                 betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8,
                 weight_decay: float = 0.02,
                 *,
                 model: Optional[nn.Module] = None,
                 stat_interval: int = 200,
                 inv_interval: int = 2000,
                 damping: float = 1e-5,
                 relative_damping: bool = True,
                 ns_iters: int = 10,
                 stat_decay: float = 0.9,
                 grad_norm_recovery: bool = True,
                 max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
                 skip_nonfinite_steps: bool = False,
                 factor_memory_budget_mb: Optional[float] = None,
                 checkpoint_inverses: bool = True) -> None:
        defaults = adamw_defaults(lr, betas, eps, weight_decay)
        super().__init__(params, defaults, model, 'adamw', stat_interval,
                         inv_interval, damping, relative_damping, ns_iters,
                         stat_decay, grad_norm_recovery, max_factor_dim,
                         skip_nonfinite_steps, factor_memory_budget_mb,
                         checkpoint_inverses)

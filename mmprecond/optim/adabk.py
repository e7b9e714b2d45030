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
from .checks import check_integer
from .defaults import base_defaults, variant
from .diagnostics import root_diagnostics
from .nkfac import DEFAULT_MAX_FACTOR_DIM, KroneckerFactors


def _renamed_root_keys(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """``state_dict`` with the previous layout's root keys renamed.

    Up to this layout the root family derived from the inverse one and kept
    each root under ``'L_inv'`` / ``'R_inv'`` (also in ``'packed'``); they
    become ``'L_root'`` / ``'R_root'``.  Other entries are left alone.
    """
    pre = state_dict.get('preconditioner')
    if not pre:
        return state_dict

    def rename(layer: Dict[str, Any]) -> Dict[str, Any]:
        return {(k[:-len('_inv')] + '_root' if k in ('L_inv', 'R_inv') else k): v
                for k, v in layer.items()}

    pre = dict(pre)
    pre['layers'] = {n: rename(st) for n, st in pre.get('layers', {}).items()}
    if 'packed' in pre:
        pre['packed'] = {n: rename(st) for n, st in pre['packed'].items()}
    return dict(state_dict, preconditioner=pre)


class KroneckerRoot(KroneckerFactors):
    """The AdaBK family: Kronecker factors with inverse roots ``L^{-1/p} G R^{-1/p}``.

    The statistics, layer handling, bias column, norm recovery, state and
    base updates are those of :class:`~mmprecond.optim.nkfac.KroneckerFactors`
    (shared with the inverse family, not inherited from it); the derived
    matrices are inverse ``p``-th roots, ``p`` in {2, 4}, stored under
    ``'L_root'`` / ``'R_root'``.  Every ``refresh_interval`` steps (and for a
    factor seen for the first time) all due factors are damped,
    ``A = S + eps lambda_max(S) I`` (``damping``; or ``+ eps I`` with
    ``abs_damping``), and their inverse roots are computed *from scratch*
    by ``ns_iters`` coupled Newton–Schulz iterations with trace
    normalisation, batched over factors of equal size
    (:func:`~mmprecond.inverse_root.inverse_roots`).  A root that comes out
    non-finite is not stored, and is counted under ``'root_fallback'``: that
    side stays unpreconditioned and is retried after the next statistics
    update.  This happens for all-zero factors, e.g. the output side of
    every conv in a residual branch behind a zero-initialised norm
    (mmdet's ResNet, ``zero_init_residual``) at step 0, where the authors'
    code would divide by a zero trace.  Every rank computes every root (the
    factors are identical across ranks), so no broadcast is needed.

    The registered names are its variants: :class:`SGDM_BK` (SGDM base) and
    :class:`AdamW_BK` (AdamW base); :class:`~mmprecond.optim.Shampoo` is a
    member with ``p = 4`` and gradient statistics.

    Args:
        params (Iterable): Parameters or parameter groups.
        base (str): ``'sgdm'`` or ``'adamw'``; fixed by each variant.
        model (nn.Module): Model whose layers are hooked.
        lr, momentum, nesterov, betas, eps, weight_decay: The base update's
            keywords, as in :class:`~mmprecond.optim.nkfac.KroneckerInverse`.
        stat_interval (int): ``T_s`` of the paper. Defaults to 200.
        refresh_interval (int): ``T_ir`` of the paper: roots every this many
            steps. Defaults to 2000.
        damping (float): ``eps`` of the paper, relative to ``lambda_max``.
            Defaults to 1e-5.
        abs_damping (float, optional): An absolute ``eps`` (``A = S + eps
            I``) instead of the relative ``damping``; give one of the two.
            Defaults to None.
        ns_iters (int): Newton–Schulz iterations ``K``. Defaults to 10.
        stat_decay (float): ``alpha``. Defaults to 0.9.
        grad_norm_recovery (bool): Rescale to the raw gradient's norm (eq.
            19). Defaults to True.
        max_factor_dim (int): Larger factors are not formed (that side is
            identity). See :data:`~mmprecond.optim.nkfac.DEFAULT_MAX_FACTOR_DIM`.
        skip_nonfinite_steps, factor_memory_budget_mb,
        checkpoint_inverses: See :class:`~mmprecond.optim.PrecondOptimizer`
            (the saved-without-roots resume recomputes each root from
            scratch at the first step after loading). ``checkpoint_inverses``
            defaults to True.
    """

    #: Root order ``p``: 2 (AdaBK) or 4 (Shampoo).
    root = 2
    derived_suffix = '_root'
    #: AdaBK and Shampoo fold the raw statistic.
    frobenius_statistics = False
    #: ``abs_damping`` replaces the ``damping`` term (see :func:`variant`).
    exclusive_keywords = (('damping', 'abs_damping'), )

    def __init__(self,
                 params: Iterable,
                 *,
                 base: str = 'sgdm',
                 model: Optional[nn.Module] = None,
                 lr: float = 0.02,
                 momentum: Optional[float] = None,
                 nesterov: Optional[bool] = None,
                 betas: Optional[Tuple[float, float]] = None,
                 eps: Optional[float] = None,
                 weight_decay: Optional[float] = None,
                 stat_interval: int = 200,
                 refresh_interval: int = 2000,
                 damping: float = 1e-5,
                 abs_damping: Optional[float] = None,
                 ns_iters: int = 10,
                 stat_decay: float = 0.9,
                 grad_norm_recovery: bool = True,
                 max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
                 skip_nonfinite_steps: bool = False,
                 factor_memory_budget_mb: Optional[float] = None,
                 checkpoint_inverses: bool = True) -> None:
        if abs_damping is None:
            check_positive('damping', damping)
        else:
            check_positive('abs_damping', abs_damping)
        check_integer('ns_iters', ns_iters, minimum=1)
        defaults = base_defaults(base, lr, momentum=momentum, nesterov=nesterov,
                                 betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, model, base,
                         stat_interval=stat_interval,
                         refresh_interval=refresh_interval,
                         stat_decay=stat_decay,
                         grad_norm_recovery=grad_norm_recovery,
                         max_factor_dim=max_factor_dim,
                         skip_nonfinite_steps=skip_nonfinite_steps,
                         factor_memory_budget_mb=factor_memory_budget_mb,
                         checkpoint_inverses=checkpoint_inverses)
        self.relative_damping = abs_damping is None
        self.damping = float(damping if abs_damping is None else abs_damping)
        self.abs_damping = None if abs_damping is None else float(abs_damping)
        self.ns_iters = int(ns_iters)
        #: set by :meth:`load_state_dict`: compute missing roots at once
        self._roots_after_load = False

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a checkpoint; roots it lacks (``checkpoint_inverses=False``)
        are computed at the next step, whatever its phase.

        Checkpoints written before the root family had its own keys store
        the roots as ``'L_inv'`` / ``'R_inv'``; they are read as
        ``'L_root'`` / ``'R_root'``.
        """
        super().load_state_dict(_renamed_root_keys(state_dict))
        self._roots_after_load = True

    def update_preconditioners(self, step: int) -> None:
        periodic = step % self.refresh_interval == 0
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
                missing = side + '_root' not in st
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
                st[side + '_root'] = r
            else:
                st.pop(side + '_root', None)

    def diagnostics(self) -> Dict[str, Any]:
        """``lambda_max``, ``damping``, ``root_error`` of the inverse roots
        (see :mod:`mmprecond.optim.diagnostics`); no Newton residual."""
        return root_diagnostics(self.layer_state, self.root, self.damping,
                                self.relative_damping)


@OPTIMIZERS.register_module()
@variant('sgdm', lr=0.02, momentum=0.9, weight_decay=0.0, nesterov=False)
class SGDM_BK(KroneckerRoot):
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
        See :class:`KroneckerRoot` (``base='sgdm'``).  Defaults (the
        paper's COCO settings): ``lr`` 0.02, ``momentum`` 0.9,
        ``weight_decay`` 0, ``nesterov`` False, ``T_s`` 200, ``T_ir`` 2000,
        ``eps`` 1e-5 (relative), ``K`` 10, ``alpha`` 0.9.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> opt = SGDM_BK(model.parameters(), model=model, lr=0.1,
        ...               stat_interval=1, refresh_interval=5)
        >>> model(torch.randn(16, 8)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
    """


@OPTIMIZERS.register_module()
@variant('adamw', lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.02)
class AdamW_BK(KroneckerRoot):
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
        Everything else: as in :class:`KroneckerRoot` (``base='adamw'``),
        with SGDM_BK's defaults.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
        >>> opt = AdamW_BK(model.parameters(), model=model, lr=1e-3)
        >>> model(torch.randn(2, 3, 8, 8)).mean().backward()
        >>> opt.step()
    """

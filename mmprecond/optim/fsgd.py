# Copyright (c) mmprecond contributors. All rights reserved.
"""FSGD and FAdam: feature gradient descent for ``Linear`` layers.

References: H. Yong, *Towards Efficient and Effective Deep Neural Network
Optimization*, PhD thesis, PolyU 2022 (stochastic feature gradient descent);
Y. Sun, *Designing Effective Preconditioned Optimizers for Deep Neural
Network Training*, PhD thesis, PolyU 2024, section 5.2.2 (eqs. 5.1-5.2) and
the FSGD / FAdam baselines of Tables 5.1-5.2.
"""
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.registry import OPTIMIZERS
from torch import Tensor

from ..curvature.capture import factor_dims
from ..curvature.factors import BatchStatistics
from ..distributed import Chunk, run_batched
from ..linalg import (
    INVERSE_FAILED,
    batch_limit,
    lanczos_lmax,
    record_flags,
    refresh_inverse,
)
from .base import PrecondOptimizer, check_positive, check_unit_interval
from .checks import check_damping, check_interval, warn_unaligned_interval
from .defaults import base_defaults, variant
from .diagnostics import newton_diagnostics

#: Default ``max_factor_dim``: a layer whose input factor (``C_in`` plus the
#: bias column, ``C_in k^2`` for a conv) is wider gets the plain base update.
#: Of the detectors the thesis trains, only Mask R-CNN's
#: ``roi_head.bbox_head.shared_fcs.0`` (12545 wide) is above it.
DEFAULT_MAX_FACTOR_DIM = 8192


def damped_inverse_batch(blocks: Tensor, owner: Tensor, count: int,
                         damping: float, floor: float) -> Tuple[Tensor, Tensor]:
    """Eq. 5.17 for ``count`` statistics at once, as ``(B, d, d)`` blocks.

    ``owner[b]`` is the statistic block ``b`` belongs to: a stack of ``H``
    heads stands for the block-diagonal matrix of its blocks, normalised as
    a whole, and every block of it gets the same shift, ``damping`` times
    the largest eigenvalue over its blocks, so the heads keep their
    relative scales.  ``lambda_max`` is the Lanczos estimate of
    :func:`~mmprecond.linalg.lanczos_lmax` (at least as accurate as the 20
    power-iteration mat-vecs of the NKFAC code).

    Returns:
        tuple[Tensor, Tensor]: The ``(B, d, d)`` inverses and their status
        bits (see :mod:`mmprecond.linalg`).
    """
    sq = torch.zeros(count, dtype=blocks.dtype, device=blocks.device)
    sq.index_add_(0, owner, blocks.square().sum((1, 2)))
    blocks = blocks / (sq.sqrt() + 1e-12)[owner, None, None]
    lmax = torch.zeros_like(sq).scatter_reduce_(0, owner, lanczos_lmax(blocks),
                                                'amax', include_self=False)
    return refresh_inverse(blocks, damping, floor, lmax=lmax[owner])


class FeatureDescent(PrecondOptimizer):
    """Shared machinery of FSGD / FAdam (and AFOpt's non-attention layers).

    For each preconditioned layer (``z = W x + b``, bias as an extra input
    column, convs via im2col) it keeps ``R``, an EMA of ``E[x x^T]``, and
    ``D = (R / ||R||_F + max(floor, eta lambda_max) I)^-1``; the layer's
    direction is ``G D`` with its norm recovered.  Only the input-side
    statistic is used: the output-gradient sums that the shared capture
    also forms on statistics steps are ignored.

    Step numbering is 0-based, as in the rest of the package: statistics at
    ``t = 0, T_s, 2 T_s, ...``; inverses at ``t = 0, T_u, 2 T_u, ...``, and
    at once for a layer whose first statistic arrives later (e.g. a RoI head
    that saw no RoIs at ``t = 0``).  Algorithm 7's 1-based ``t % T_s == 0``
    would leave the first ``T_u`` steps unpreconditioned.

    The registered names are its variants: :class:`FSGD` (SGDM base) and
    :class:`FAdam` (AdamW base); AFOpt's family
    (:class:`~mmprecond.optim.afopt.AttentionFeatureDescent`) derives from it.

    Args:
        params (Iterable): Parameters or parameter groups.
        base (str): ``'sgdm'`` or ``'adamw'``; fixed by each variant.
        model (nn.Module): The model whose layers are hooked (passed by
            :class:`~mmprecond.engine.PrecondOptimWrapperConstructor`).
        lr, momentum, nesterov, betas, eps, weight_decay: The base update's
            keywords, as in :class:`~mmprecond.optim.nkfac.KroneckerInverse`
            (``weight_decay`` is added after preconditioning under SGDM).
        stat_interval (int): ``T_s`` of the thesis. Defaults to 50.
        refresh_interval (int): ``T_u`` of the thesis: inverses every this
            many steps. Defaults to 500.
        damping (float): ``eta`` of the adaptive damping, relative to
            ``lambda_max`` of the normalised statistic. Defaults to 0.01.
        damping_floor (float): Lower bound of the relative damping. 1e-4.
        stat_decay (float): ``alpha``. Defaults to 0.95.
        grad_norm_recovery (bool): Rescale each direction to the raw
            gradient's norm. Defaults to True.
        max_factor_dim (int): See :data:`DEFAULT_MAX_FACTOR_DIM`.
        precondition_convs (bool): Also precondition ``Conv2d`` layers
            (im2col inputs). Defaults to False.
        skip_nonfinite_steps, factor_memory_budget_mb,
        checkpoint_inverses: See :class:`~mmprecond.optim.PrecondOptimizer`
            (``checkpoint_inverses`` defaults to True).
    """

    checks_statistics_on_device = True

    def __init__(self,
                 params: Iterable,
                 *,
                 base: str = 'sgdm',
                 model: Optional[nn.Module] = None,
                 lr: float = 0.01,
                 momentum: Optional[float] = None,
                 nesterov: Optional[bool] = None,
                 betas: Optional[Tuple[float, float]] = None,
                 eps: Optional[float] = None,
                 weight_decay: Optional[float] = None,
                 stat_interval: int = 50,
                 refresh_interval: int = 500,
                 damping: float = 0.01,
                 damping_floor: float = 1e-4,
                 stat_decay: float = 0.95,
                 grad_norm_recovery: bool = True,
                 max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
                 precondition_convs: bool = False,
                 skip_nonfinite_steps: bool = False,
                 factor_memory_budget_mb: Optional[float] = None,
                 checkpoint_inverses: bool = True) -> None:
        defaults = base_defaults(base, lr, momentum=momentum, nesterov=nesterov,
                                 betas=betas, eps=eps, weight_decay=weight_decay)
        check_interval('refresh_interval', refresh_interval)
        check_damping(damping)
        check_positive('damping_floor', damping_floor)
        check_unit_interval('stat_decay', stat_decay)
        layer_types = (nn.Linear, nn.Conv2d) if precondition_convs else (nn.Linear, )
        self.refresh_interval = int(refresh_interval)
        self.damping = float(damping)
        self.damping_floor = float(damping_floor)
        self.stat_decay = float(stat_decay)
        self.grad_norm_recovery = bool(grad_norm_recovery)
        super().__init__(params, defaults, model, base, stat_interval,
                         max_factor_dim, layer_types=layer_types,
                         skip_nonfinite_steps=skip_nonfinite_steps,
                         factor_memory_budget_mb=factor_memory_budget_mb,
                         checkpoint_inverses=checkpoint_inverses)
        warn_unaligned_interval(type(self).__name__, 'refresh_interval',
                                self.refresh_interval, self.stat_interval)

    def _select_layers(self, model: nn.Module,
                       layer_types: tuple) -> Dict[str, nn.Module]:
        chosen = super()._select_layers(model, layer_types)
        too_wide = {n: factor_dims(m)[1] for n, m in chosen.items()
                    if not self.side_enabled(factor_dims(m)[1])}
        if too_wide:
            self.fallbacks.info(
                'wide_input_layers',
                f'{len(too_wide)} layer(s) have an input factor wider than '
                f'max_factor_dim={self.max_factor_dim} and get the plain '
                f'{self.base} update: ' + ', '.join(
                    f'{n} ({d})' for n, d in too_wide.items()))
            self.fallbacks.counts['excluded_layers'] += len(too_wide)
        return {n: m for n, m in chosen.items() if n not in too_wide}

    def capture_sides(self, module: nn.Module) -> Tuple[bool, bool]:
        """Input statistics only: FSGD never uses ``Delta^T Delta``."""
        return True, False

    # ------------------------------------------------------------ statistics
    def update_statistics(self, stats: Dict[str, BatchStatistics], step: int) -> None:
        self.fold_statistics(
            [(self.layer_state.setdefault(name, {}), 'R', name, stats[name].xx)
             for name in self.layers if stats[name].xx is not None],
            1 - self.stat_decay)

    def refresh_due(self, step: int) -> bool:
        """Whether inverses are recomputed at (0-based) ``step``."""
        return step % self.refresh_interval == 0

    @staticmethod
    def _due_slots(st: Dict[str, Tensor], keys: Tuple[str, ...],
                   due: bool) -> List[Tuple[Dict[str, Tensor], str]]:
        """``(st, key)`` of the statistics in ``st`` that need an inverse now."""
        return [(st, k) for k in keys if k in st and (due or k + '_inv' not in st)]

    def _refresh_slots(self, step: int) -> List[Tuple[Dict[str, Tensor], str]]:
        """``(state, key)`` of every statistic whose inverse is due."""
        due = self.refresh_due(step)
        return [slot for name in self.layers
                for slot in self._due_slots(self.layer_state.get(name, {}),
                                            ('R', ), due)]

    def update_preconditioners(self, step: int) -> None:
        """Recompute the due inverses, one batched call per statistic shape.

        A statistic whose inverse failed entirely (non-finite) keeps its
        previous inverse; every retry and failure is counted per matrix.
        """
        slots = self._refresh_slots(step)
        stats = [st[key] for st, key in slots]
        # (block size, blocks per statistic, dtype, device)
        keys = [(s.shape[-1], s.numel() // s.shape[-1]**2, s.dtype, s.device)
                for s in stats]

        def work(chunk: Chunk) -> List[Tensor]:
            n, heads, _, device = chunk.key
            blocks = torch.cat([stats[i].reshape(-1, n, n) for i in chunk.items])
            owner = torch.arange(len(chunk.items), device=device)
            inv, flags = damped_inverse_batch(blocks, owner.repeat_interleave(heads),
                                              len(chunk.items), self.damping,
                                              self.damping_floor)
            return [inv.view(len(chunk.items), heads, n, n),
                    flags.view(len(chunk.items), heads)]

        results = run_batched(
            keys, work, lambda key: float(key[0])**3 * key[1], shard=False,
            max_items=lambda key: max(1, batch_limit(key[0], *key[2:]) // key[1]))
        for chunk, (inv, flags) in results:
            codes = record_flags(self.fallbacks, flags)
            h = chunk.key[1]
            for j, i in enumerate(chunk.items):
                if not any(c & INVERSE_FAILED for c in codes[j * h:(j + 1) * h]):
                    st, key = slots[i]
                    st[key + '_inv'] = inv[j].reshape(stats[i].shape)

    # --------------------------------------------------------- preconditioner
    def precondition(self, name: str, module: nn.Module,
                     grad: Tensor) -> Optional[Tensor]:
        """``G D`` (norm recovery is applied by the base class)."""
        st = self.layer_state.get(name)
        if not st or 'R_inv' not in st:
            return None
        return grad.float() @ st['R_inv']

    def diagnostics(self) -> Dict[str, Tensor]:
        """``lambda_max``, ``damping``, ``newton_residual`` of the inverses
        of the Frobenius-normalised statistics."""
        return newton_diagnostics(self.layer_state, self.damping,
                                  self.damping_floor, normalise=True)


_FSGD_BOX = r"""
    Algorithm (thesis eqs. 5.1-5.2 with the tricks of section 5.3.4)::

        for t = 0, 1, 2, ...:
            forward / backward; on t % T_s == 0 collect, per Linear layer,
                XX = mean over rows of [x; 1][x; 1]^T     (tokens are rows)
            if t % T_s == 0:   R <- a R + (1 - a) XX          (R_0 = 0, a = 0.95)
            if t % T_u == 0:   D = (R/||R||_F + max(1e-4, eta lmax) I)^-1
            G^ = G D                          (G = [dL/dW, dL/db], d_out x d_in+1)
            G~ = G^ ||G|| / ||G^||                        (norm recovery)
"""

_FSGD_READINGS = """
    Readings chosen where the thesis (section 5.3) is silent:

    * Statistics momentum: ``0.95`` weights the *old* statistic (eq. 5.18
      printed literally weights the new one; NKFAC's eq. 3.9 and "alpha
      close to 1 means slow change" say otherwise).
    * Biases are preconditioned jointly with their weight as an extra input
      column of ones (the NKFAC code's convention), and norm recovery runs
      per layer over ``[dW, db]``.
    * Which layers: every ``nn.Linear`` (and subclass) whose weight is
      optimised and requires grad.  ``Conv2d`` layers get the plain base
      update, as in Algorithm 7's ``else G^ = G`` (they are preconditioned
      by im2col, ``groups == 1`` only, with ``precondition_convs=True``).
      Norms, embeddings, position-bias tables and parameters used
      functionally (a projection applied with ``F.linear``) are always plain.
    * ``D`` inverts the Frobenius-normalised statistic, so the damping floor
      is relative; with norm recovery the normalisation changes nothing
      else.  Inverses are exact (Cholesky, fp64 retry).
"""


@OPTIMIZERS.register_module()
@variant('sgdm', lr=0.01, momentum=0.9, weight_decay=1e-4, nesterov=False)
class FSGD(FeatureDescent):
    __doc__ = r"""FSGD: stochastic feature gradient descent on an SGDM base.

    Feature descent asks the layer output ``F = W X`` to move by
    ``-eta dL/dF``; the weight change that realises it best in the least
    squares sense is ``-eta dL/dW (X X^T)^-1``.  FSGD applies this
    input-side factor only (no output-gradient factor), damped and
    refreshed periodically, then takes a ``torch.optim.SGD`` step:
    ``d = G~ + wd W``, ``buf = mu buf + d``, ``W <- W - lr buf``.

    References: H. Yong, *Towards Efficient and Effective Deep Neural
    Network Optimization*, PhD thesis, PolyU 2022; Y. Sun, PhD thesis,
    PolyU 2024, section 5.2.2 and Table 5.1.
    """ + _FSGD_BOX + _FSGD_READINGS + r"""
    With nothing preconditioned (``max_factor_dim=1``), or with inputs whose
    second moment is the identity, FSGD is exactly ``torch.optim.SGD``.

    Args:
        See :class:`FeatureDescent` (``base='sgdm'``).  Defaults: ``lr``
        0.01 (mmdet's RetinaNet Swin-T SGD setting of thesis Table 5.1),
        ``momentum`` 0.9, ``weight_decay`` 1e-4, ``nesterov`` False, and the
        thesis' ``T_s`` 50, ``T_u`` 500, ``eta`` 0.01, ``alpha`` 0.95.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))
        >>> opt = FSGD(model.parameters(), model=model, lr=0.05,
        ...            stat_interval=1, refresh_interval=10)
        >>> model(torch.randn(32, 8)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
        >>> sorted(opt.layer_state['0'])
        ['R', 'R_inv']
    """


@OPTIMIZERS.register_module()
@variant('adamw', lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
class FAdam(FeatureDescent):
    __doc__ = r"""FAdam: the FSGD direction fed to AdamW (Yong 2022; thesis Table 5.2).

    The preconditioned, norm-recovered gradient ``G~`` of :class:`FSGD`
    replaces the gradient in a ``torch.optim.AdamW`` step (decoupled decay
    ``W <- W (1 - lr wd)``, bias-corrected moments of ``G~``).
    """ + _FSGD_BOX + _FSGD_READINGS + r"""
    With nothing preconditioned FAdam is exactly ``torch.optim.AdamW``.

    Args:
        params (Iterable): Parameters or parameter groups.
        lr (float): Learning rate. Defaults to 1e-4 (mmdet's Mask R-CNN
            Swin-T AdamW setting used in thesis Table 5.2).
        betas (tuple[float, float]): Adam betas. Defaults to (0.9, 0.999).
        eps (float): Adam epsilon, outside the square root. 1e-8.
        weight_decay (float): Decoupled weight decay. Defaults to 0.05.
        Everything else: as in :class:`FeatureDescent` (``base='adamw'``),
        with FSGD's defaults.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(),
        ...                       nn.Linear(4 * 6 * 6, 2))
        >>> opt = FAdam(model.parameters(), model=model, lr=1e-3)
        >>> model(torch.randn(2, 3, 8, 8)).sum().backward()
        >>> opt.step()
        >>> list(opt.layers)  # the conv keeps plain AdamW
        ['2']
    """

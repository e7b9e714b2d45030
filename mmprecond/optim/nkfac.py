# Copyright (c) mmprecond contributors. All rights reserved.
"""The Kronecker-inverse family: NKFAC, AdaNKFAC and a plain KFAC baseline.

Reference: Y. Sun, H. Yong, L. Zhang, *NKFAC: A Fast and Stable KFAC
Optimizer for Deep Neural Networks*, ECML-PKDD 2023; Y. Sun, *Designing
Effective Preconditioned Optimizers for Deep Neural Network Training*, PhD
thesis, PolyU 2024, chapter 3 (Algorithms 2-5).
"""
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from mmengine.registry import OPTIMIZERS
from torch import Tensor

from ..curvature.capture import factor_dims
from ..curvature.factors import BatchStatistics
from ..distributed import Chunk, run_batched, world_size
from ..linalg import INVERSE_FAILED, batch_limit, record_flags, refresh_inverse
from .base import PrecondOptimizer, check_positive, check_unit_interval
from .checks import (
    check_damping,
    check_integer,
    check_interval,
    warn_unaligned_interval,
)
from .defaults import base_defaults, variant
from .diagnostics import newton_diagnostics

#: Default ``max_factor_dim``, chosen from ``benchmarks/factor_budget.py`` on
#: mmdet's Faster R-CNN R50-FPN (57 trainable Linear/Conv2d layers).  It forms
#: every factor (largest 4608, the stage-4 3x3 convs) except the 12545-wide
#: input side of ``roi_head.bbox_head.shared_fcs.0``, which is then
#: preconditioned on its 1024-wide output side only.  Measured effect:
#:
#: ====================  ===========  ==================  ===============
#: max_factor_dim        factors GB   precond GFLOP/step  refresh TFLOP
#: ====================  ===========  ==================  ===============
#: unbounded             2.74         515.9               9.97
#: 8192 (default)        1.48         193.6               2.08
#: 4096                  0.97         128.4               0.90
#: ====================  ===========  ==================  ===============
#:
#: On 2 CPU threads that layer's per-step product takes 18.1 s with both
#: sides and 1.4 s with the output side only.
DEFAULT_MAX_FACTOR_DIM = 8192


#: A Newton result whose residual ``||I - A B||_F`` is below this is accepted
#: even if it did not improve on the warm start: at fp32 precision an
#: already-converged warm start cannot improve by rounding alone.
NEWTON_RESIDUAL_TOL = 1e-3

#: Random probes of the residual estimate behind the Newton guard.
RESIDUAL_PROBES = 4


class KroneckerFactors(PrecondOptimizer):
    """The Kronecker part shared by the inverse and the root families.

    Per preconditioned layer two running factors, ``L`` (output side, from
    ``sum delta delta^T``) and ``R`` (input side, ``E[x x^T]``), folded every
    ``stat_interval`` steps with ``stat_decay``; a side wider than
    ``max_factor_dim`` is not formed.  Every ``refresh_interval`` steps (and
    at once for a factor without a derived matrix yet) a subclass replaces
    each factor's derived matrix, stored under ``side + derived_suffix``
    (``'L_inv'`` for inverses, ``'L_root'`` for inverse roots), and the
    direction is ``D_L G D_R`` (bias as the last column of ``G``).

    Args:
        params, defaults, model, base, max_factor_dim: As in
            :class:`~mmprecond.optim.PrecondOptimizer`.
        stat_interval (int): Statistics every this many steps.
        refresh_interval (int): Derived matrices every this many steps.
        stat_decay (float): EMA weight of the old factor.
        grad_norm_recovery (bool): Rescale each direction to the raw
            gradient's norm.
        **shared: The options of every family (``reduce_statistics``,
            ``skip_nonfinite_steps``, ``factor_memory_budget_mb``,
            ``checkpoint_inverses``), see
            :class:`~mmprecond.optim.PrecondOptimizer`.
    """

    statistic_keys = ('L', 'R')
    checks_statistics_on_device = True
    #: Key suffix of a factor's derived matrix in ``layer_state``.
    derived_suffix = '_inv'

    def __init__(self, params: Iterable, defaults: dict, model: Optional[nn.Module],
                 base: str, *, stat_interval: int, refresh_interval: int,
                 stat_decay: float, grad_norm_recovery: bool,
                 max_factor_dim: int, **shared: Any) -> None:
        check_interval('refresh_interval', refresh_interval)
        check_unit_interval('stat_decay', stat_decay)
        super().__init__(params, defaults, model, base, stat_interval,
                         max_factor_dim, **shared)
        self.refresh_interval = int(refresh_interval)
        self.stat_decay = float(stat_decay)
        self.grad_norm_recovery = bool(grad_norm_recovery)
        warn_unaligned_interval(type(self).__name__, 'refresh_interval',
                                self.refresh_interval, self.stat_interval)

    # --------------------------------------------------------------- factors
    #: Whether each batch statistic is divided by its Frobenius norm before
    #: the EMA (the NKFAC code); AdaBK and Shampoo fold the raw statistic.
    frobenius_statistics = True

    def _sides(self, module: nn.Module) -> Tuple[Tuple[str, int], ...]:
        d_out, d_in = factor_dims(module)
        return tuple((s, d) for s, d in (('L', d_out), ('R', d_in))
                     if self.side_enabled(d))

    def update_statistics(self, stats: Dict[str, BatchStatistics], step: int) -> None:
        items = []
        for name, module in self.layers.items():
            st = self.layer_state.setdefault(name, {})
            batch = stats[name]
            for side, _ in self._sides(module):
                new = batch.gg if side == 'L' else batch.xx
                if new is not None:
                    items.append((st, side, f'{name}.{side}', new))
                    self._factor_moved(name, side)
        self.fold_statistics(items, 1 - self.stat_decay,
                             normalize=self.frobenius_statistics)

    def _factor_moved(self, name: str, side: str) -> None:
        """Note that factor ``(name, side)`` takes new statistics (no-op)."""

    def refresh_due(self, step: int) -> bool:
        """Whether :meth:`update_preconditioners` refreshes anything at ``step``.

        Periodic refreshes, and factors without a derived matrix yet (formed
        after step 0), which are refreshed at once.
        """
        if step % self.refresh_interval == 0:
            return True
        return any(side in st and side + self.derived_suffix not in st
                   for st in self.layer_state.values() for side in ('L', 'R'))

    def precondition(self, name: str, module: nn.Module,
                     grad: Tensor) -> Optional[Tensor]:
        """``D_L G D_R`` (norm recovery is applied by the base class)."""
        st = self.layer_state.get(name)
        left, right = 'L' + self.derived_suffix, 'R' + self.derived_suffix
        if not st or (left not in st and right not in st):
            return None
        pg = grad.float()
        if left in st:
            pg = st[left] @ pg
        if right in st:
            pg = pg @ st[right]
        return pg


class KroneckerInverse(KroneckerFactors):
    """The NKFAC family: Kronecker factors with periodic (Newton) inverses.

    Statistics follow the authors' public NKFAC code: every
    ``stat_interval`` steps the iteration's ``E[x x^T]`` (right factor ``R``)
    and ``sum delta delta^T`` (left factor ``L``) are each divided by their
    Frobenius norm and folded into an EMA with ``stat_decay``, starting from
    zero.  Calls of one module within an iteration (shared heads) and
    gradient-accumulation micro-batches are summed first, then folded once
    (our reading: the thesis does not say; the authors' code folds once
    per call).

    Every ``refresh_interval`` steps each factor is damped,
    ``A = S + max(1e-4, damping * lambda_max(S)) I``, and inverted: exactly
    at steps ``0, T, 2T`` and every ``exact_inv_period * T`` (the code's
    schedule, not the literal ``t < 2 T_inv`` of Algorithm 3), otherwise by
    ``newton_steps`` warm-started Newton-Schulz steps.  ``lambda_max`` comes
    from 10 Lanczos steps (:func:`~mmprecond.linalg.lanczos_lmax`): the
    code's 20 power-iteration mat-vecs read it about 4 % low on a
    385-wide Gram factor, so the code damps less than its formula says, and
    its all-ones start vector lies in the null space of a softmax
    classifier's ``L``; 10 Lanczos steps from a fixed pseudo-random vector
    read it about 1 % low there, are at least as accurate on every spectrum
    tested, and never exceed the true value.  A guard compares the
    residual ``||I - A B||_F`` (estimated with random probes) after the
    Newton step with the warm start's; if the step made it worse (and it
    is above :data:`NEWTON_RESIDUAL_TOL`), or produced non-finite values,
    the exact inverse is used instead and counted under
    ``'newton_fallback'``.

    A refresh stacks the factors of each size and runs every kernel once
    per size (:mod:`mmprecond.linalg` works on batches), so it launches
    ``O(distinct sizes)`` kernels however many layers there are; failures
    are still retried and counted per factor.  Under torch.distributed the
    batches are split over the ranks by ``n^3`` cost and the results
    broadcast (``shard_refresh``).

    The registered names are its variants (:func:`~.defaults.variant`):
    :class:`NKFAC` (SGDM base), :class:`AdaNKFAC` (AdamW base) and
    :class:`KFAC` (NKFAC with exact inverses only).

    Args:
        params (Iterable): Parameters or parameter groups.
        base (str): The base update, ``'sgdm'`` (``torch.optim.SGD``) or
            ``'adamw'`` (``torch.optim.AdamW``); fixed by each variant.
        model (nn.Module): Model whose layers are hooked (passed by
            :class:`~mmprecond.engine.PrecondOptimWrapperConstructor`).
        lr (float): Learning rate.
        momentum (float): SGDM momentum ``mu`` (SGDM base only).
        nesterov (bool): Nesterov momentum (SGDM base only).
        betas (tuple[float, float]): Adam's ``(beta_1, beta_2)`` (AdamW base
            only).
        eps (float): Adam's epsilon, outside the square root (AdamW only).
        weight_decay (float): Coupled L2 decay added after preconditioning
            (SGDM) or decoupled decay (AdamW).
        stat_interval (int): ``T_stat`` of the thesis. Defaults to 100.
        refresh_interval (int): ``T_inv`` of the thesis: inverses every
            this many steps. Defaults to 1000.
        exact_inv_period (int): ``C``: an exact inverse every
            ``C * T_inv`` steps. Defaults to 500.
        newton_steps (int): ``K``: Newton-Schulz steps per refresh.
            Defaults to 1.
        damping (float): ``eta``: Tikhonov term relative to ``lambda_max``.
            Defaults to 0.01.
        damping_floor (float): Lower bound of the added damping (the
            code's ``1e-4``). Defaults to 1e-4.
        stat_decay (float): ``alpha``: EMA weight of the old factor.
            Defaults to 0.95.
        grad_norm_recovery (bool): Rescale to the raw gradient's norm.
            Defaults to True.
        max_factor_dim (int): See :data:`DEFAULT_MAX_FACTOR_DIM`.
        shard_refresh (bool): Under torch.distributed, split each batch
            of equal-sized factors over the ranks (balanced by ``d^3``) and
            broadcast the results, so the inverse phase's wall time falls
            with the number of ranks; ``False`` makes every rank compute
            everything. Defaults to True.
        reduce_statistics (str): ``'every_step'`` (default; DDP equals one
            process) or ``'before_refresh'`` (average the running factors
            over ranks before each refresh, as the authors' code: about
            ``T_inv / T_stat`` times less traffic, close to but not equal to
            one process).  See :class:`~mmprecond.optim.base.PrecondOptimizer`.
        skip_nonfinite_steps (bool): See
            :class:`~mmprecond.optim.base.PrecondOptimizer`.
        factor_memory_budget_mb (float, optional): Bound, in MiB, on the
            estimated fp32 factor memory (statistic + inverse per formed
            factor). Defaults to None.
        checkpoint_inverses (bool | str): Which inverses :meth:`state_dict`
            saves.  ``'auto'`` (default): only those that loading cannot
            rebuild bit for bit; an inverse computed exactly (the first
            ``2 T_inv`` steps, every ``C T_inv``) whose factor has not been
            folded since is left out and recomputed, by the same batched
            refresh, when the checkpoint is loaded, so a resumed run equals
            the uninterrupted one; Newton inverses are kept.  ``True``:
            all.  ``False``: none (the smallest checkpoint; the first step
            after loading recomputes each inverse exactly, see
            :meth:`~mmprecond.optim.PrecondOptimizer.is_derived_key` for
            when that is bit-identical).  Factors, and exact inverses, are
            stored packed (upper triangle) either way.  See
            ``docs/checkpoints.md``.
    """

    rebuilds_inverses_exactly = True
    #: Exact inverses at every refresh (KFAC).
    _exact_only = False

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
                 stat_interval: int = 100,
                 refresh_interval: int = 1000,
                 exact_inv_period: int = 500,
                 newton_steps: int = 1,
                 damping: float = 0.01,
                 damping_floor: float = 1e-4,
                 stat_decay: float = 0.95,
                 grad_norm_recovery: bool = True,
                 max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
                 shard_refresh: bool = True,
                 reduce_statistics: str = 'every_step',
                 skip_nonfinite_steps: bool = False,
                 factor_memory_budget_mb: Optional[float] = None,
                 checkpoint_inverses: Union[bool, str] = 'auto') -> None:
        check_interval('exact_inv_period', exact_inv_period)
        check_integer('newton_steps', newton_steps, minimum=1)
        check_damping(damping)
        check_positive('damping_floor', damping_floor)
        defaults = base_defaults(base, lr, momentum=momentum, nesterov=nesterov,
                                 betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults, model, base,
                         stat_interval=stat_interval,
                         refresh_interval=refresh_interval,
                         stat_decay=stat_decay,
                         grad_norm_recovery=grad_norm_recovery,
                         max_factor_dim=max_factor_dim,
                         reduce_statistics=reduce_statistics,
                         skip_nonfinite_steps=skip_nonfinite_steps,
                         factor_memory_budget_mb=factor_memory_budget_mb,
                         checkpoint_inverses=checkpoint_inverses)
        self.exact_inv_period = int(exact_inv_period)
        self.newton_steps = int(newton_steps)
        self.damping = float(damping)
        self.damping_floor = float(damping_floor)
        self.exact_only = self._exact_only
        self.shard_refresh = bool(shard_refresh)
        # Host-side bookkeeping of the inverses that are still the exact
        # damped inverse of their current factor (see checkpoint_omissions):
        # slot (layer, side) -> id of the refresh batch that computed it, and
        # batch id -> (step, every slot of that batch, in refresh order).
        self._exact_slots: Dict[Tuple[str, str], int] = {}
        self._exact_groups: Dict[int, Tuple[int, List[Tuple[str, str]]]] = {}
        self._next_group = 0

    def _factor_moved(self, name: str, side: str) -> None:
        """The factor moves: its inverse is no longer rebuildable."""
        self._exact_slots.pop((name, side), None)

    def _use_exact(self, step: int) -> bool:
        period = self.exact_inv_period * self.refresh_interval
        return (self.exact_only or step <= 2 * self.refresh_interval
                or step % period == 0)

    @staticmethod
    def _probes(step: int, n: int, count: int, dtype: torch.dtype,
                device: torch.device) -> Tensor:
        """Newton-guard probes ``(count, n, p)`` of the ``n``-wide batch at ``step``.

        Seeded by ``(step, n)`` alone, so a factor's probes depend neither on
        the other factors refreshed nor on the rank that refreshes it (and
        the global RNG is left alone).
        """
        gen = torch.Generator(device=device)
        gen.manual_seed(step * 1_000_003 + n)
        return torch.randn(count, n, RESIDUAL_PROBES, dtype=dtype, device=device,
                           generator=gen)

    def _refresh_batch(self, stats: Tensor, prevs: Optional[Tensor],
                       probes: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Damped inverses of a ``(B, n, n)`` batch, exact if ``prevs`` is None.

        Returns the inverses and the ``(B,)`` status bits of
        :mod:`mmprecond.linalg` (recorded by the caller, on every rank).
        """
        return refresh_inverse(stats, self.damping, self.damping_floor, prevs,
                               newton_steps=self.newton_steps, probes=probes,
                               tol=NEWTON_RESIDUAL_TOL)

    def update_preconditioners(self, step: int) -> None:
        """Refresh the due inverses, batched by size, sharded over ranks.

        Factors of equal size (and dtype, device, warm start or not) are
        stacked and refreshed by one call of each batched kernel; a factor
        whose inverse failed entirely keeps its previous one.
        """
        periodic = step % self.refresh_interval == 0
        exact = self._use_exact(step)
        labels, stats, prevs = [], [], []
        for name, module in self.layers.items():
            st = self.layer_state.get(name)
            if not st:
                continue
            for side, _ in self._sides(module):
                if side not in st:
                    continue
                prev = st.get(side + '_inv')
                # Layers first seen after step 0 get an exact inverse at once.
                if periodic or prev is None:
                    labels.append((name, side))
                    stats.append(st[side])
                    prevs.append(prev)
        if labels:
            self._refresh_slots(step, labels, stats, prevs, exact)

    def _refresh_slots(self, step: int, labels: List[Tuple[str, str]],
                       stats: List[Tensor], prevs: List[Optional[Tensor]],
                       exact: bool) -> None:
        """Refresh the inverses of ``labels`` (``(layer, side)``), batched.

        Also notes, on the host, which batches of exact inverses came out
        without any fallback: those inverses can be rebuilt bit for bit
        from their factor while it does not change.
        """
        keys = [(s.shape[-1], s.dtype, s.device, exact or p is None)
                for s, p in zip(stats, prevs)]

        def outputs(key, count):
            n, dtype, device, _ = key
            return [((count, n, n), dtype, device), ((count, ), dtype, device)]

        results = run_batched(keys, self._refresh_task(step, stats, prevs),
                              lambda key: float(key[0])**3, outputs,
                              shard=self.shard_refresh,
                              max_items=lambda key: batch_limit(*key[:3]))
        clean: Dict[tuple, bool] = {}
        for chunk, (inv, flags) in results:
            codes = record_flags(self.fallbacks, flags)
            for j, i in enumerate(chunk.items):
                clean[chunk.key] = clean.get(chunk.key, True) and not codes[j]
                if not codes[j] & INVERSE_FAILED:
                    name, side = labels[i]
                    self.layer_state[name][side + '_inv'] = inv[j]
        for label in labels:
            self._exact_slots.pop(label, None)
        for key, ok in clean.items():
            if key[3] and ok:  # an exact batch without any fallback
                members = [lab for lab, k in zip(labels, keys) if k == key]
                gid = self._next_group
                self._next_group += 1
                self._exact_groups[gid] = (step, members)
                for lab in members:
                    self._exact_slots[lab] = gid
        live = set(self._exact_slots.values())
        for gid in [g for g in self._exact_groups if g not in live]:
            del self._exact_groups[gid]

    # ------------------------------------------------------------ checkpoint
    def _rebuildable_groups(self) -> List[Tuple[int, List[Tuple[str, str]]]]:
        """The refresh batches whose inverses a checkpoint can leave out.

        A batch qualifies when it was an exact refresh without fallbacks and
        none of its factors has been folded or refreshed since: loading then
        repeats that very batch (same factors, same order, same chunks), so
        the rebuilt inverses are the saved ones bit for bit.
        """
        if self.reduce_statistics == 'before_refresh' and world_size() > 1:
            return []  # the running factors are averaged outside the fold
        out = []
        for gid, (step, members) in self._exact_groups.items():
            if all(self._exact_slots.get(m) == gid
                   and m[1] in self.layer_state.get(m[0], {}) for m in members):
                out.append((step, members))
        return out

    def checkpoint_omissions(self) -> Set[Tuple[str, str]]:
        """``(layer, key)`` left out of :meth:`state_dict`.

        ``checkpoint_inverses='auto'`` (NKFAC's default) leaves out exactly
        the inverses :meth:`load_state_dict` rebuilds bit for bit (see
        :meth:`_rebuildable_groups`); ``False`` every inverse; ``True`` none.
        """
        omit = super().checkpoint_omissions()
        if self.checkpoint_inverses == 'auto':
            for _, members in self._rebuildable_groups():
                omit.update((name, side + '_inv') for name, side in members)
        return omit

    def checkpoint_extras(self) -> Dict[str, Any]:
        """The batches of inverses left out, for the load to rebuild."""
        if self.checkpoint_inverses != 'auto':
            return {}
        groups = [[step, [[n, s] for n, s in members]]
                  for step, members in self._rebuildable_groups()]
        return dict(rebuilt_inverses=groups) if groups else {}

    def load_checkpoint_extras(self, extras: Dict[str, Any]) -> None:
        """Rebuild the inverses an ``'auto'`` checkpoint left out.

        Each saved batch is refreshed again exactly, with the same factors
        in the same order, as when it was first computed.  Runs under
        torch.distributed on every rank (the load does), sharded like a
        refresh.
        """
        self._exact_slots, self._exact_groups = {}, {}
        for step, members in extras.get('rebuilt_inverses', []):
            labels = [(str(n), str(s)) for n, s in members]
            labels = [lab for lab in labels
                      if lab[1] in self.layer_state.get(lab[0], {})]
            if not labels:
                continue
            self._refresh_slots(int(step), labels,
                                [self.layer_state[n][s] for n, s in labels],
                                [None] * len(labels), exact=True)

    def _refresh_task(self, step: int, stats: List[Tensor],
                      prevs: List[Optional[Tensor]]):
        """``work`` of :func:`~mmprecond.distributed.run_batched`."""

        def work(chunk: Chunk) -> List[Tensor]:
            n, dtype, device, exact = chunk.key
            s = torch.stack([stats[i] for i in chunk.items])
            p = None if exact else torch.stack([prevs[i] for i in chunk.items])
            probes = None
            if not exact:  # the whole batch's probes: chunking-independent
                probes = self._probes(step, n, chunk.batch_size, dtype, device)
                probes = probes[chunk.offset:chunk.offset + len(chunk.items)]
            inv, flags = self._refresh_batch(s, p, probes)
            return [inv, flags.to(dtype)]

        return work

    def diagnostics(self) -> Dict[str, Any]:
        """``lambda_max``, ``damping``, ``newton_residual`` (see
        :mod:`mmprecond.optim.diagnostics`)."""
        return newton_diagnostics(self.layer_state, self.damping,
                                  self.damping_floor)


@OPTIMIZERS.register_module()
@variant('sgdm', lr=0.02, momentum=0.9, weight_decay=0.0, nesterov=False)
class NKFAC(KroneckerInverse):
    r"""NKFAC: KFAC with warm-started Newton inverses, on an SGDM base.

    Algorithm (thesis Alg. 3-4 with the authors' code's details)::

        for t = 0, 1, ...:
            forward/backward; on t % T_stat == 0 collect X X^T, Delta Delta^T
            if t % T_stat == 0:
                R <- a R + (1-a) XX^T/||XX^T||_F;   L <- a L + (1-a) DD^T/||DD^T||_F
            if t % T_inv == 0:
                A_L = L + max(1e-4, eta lmax(L)) I;  A_R likewise
                if t <= 2 T_inv or t % (C T_inv) == 0:  L^ = A_L^-1; R^ = A_R^-1
                else:  L^ = Newton(A_L, L^, K); R^ = Newton(A_R, R^, K)
            G^ = L^ G R^;  G~ = G^ ||G|| / ||G^||        (bias = last column of G)
            d = G~ + wd W;  buf = mu buf + d;  W <- W - lr buf

    Parameters outside preconditioned ``Linear`` / ``Conv2d`` layers (norms,
    embeddings, grouped convs, ...) get the same SGDM step on their raw
    gradient.  With every layer excluded, NKFAC is exactly
    ``torch.optim.SGD``.  See :class:`KroneckerInverse` for the readings
    chosen where thesis and code differ.

    Args:
        See :class:`KroneckerInverse` (``base='sgdm'``).  Defaults: ``lr``
        0.02 (mmdet's SGD), ``momentum`` 0.9, ``weight_decay`` 0,
        ``nesterov`` False, and the thesis' ``T_stat`` 100, ``T_inv`` 1000,
        ``C`` 500, ``K`` 1, ``eta`` 0.01, ``alpha`` 0.95.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> opt = NKFAC(model.parameters(), model=model, lr=0.1,
        ...             stat_interval=1, refresh_interval=5)
        >>> model(torch.randn(16, 8)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
    """


@OPTIMIZERS.register_module()
@variant('sgdm')
class KFAC(NKFAC):
    """Plain KFAC baseline: :class:`NKFAC` with an exact inverse every ``T_inv``.

    Same statistics, damping, norm recovery and SGDM base as NKFAC; only the
    inverse differs (Cholesky inverse of the damped factor at every
    refresh), which isolates what the Newton warm start buys.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Linear(4, 2)
        >>> opt = KFAC(model.parameters(), model=model, lr=0.01)
    """

    _exact_only = True

    #: NKFAC keywords that have no effect in KFAC (see :mod:`.checks`).
    rejected_keywords = {
        kw: ('KFAC inverts every factor exactly at each refresh and has no '
             "Newton iterations; drop it, or use type='NKFAC' for Newton "
             'inverses.')
        for kw in ('newton_steps', 'exact_inv_period')
    }


@OPTIMIZERS.register_module()
@variant('adamw', lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.2)
class AdaNKFAC(KroneckerInverse):
    r"""AdaNKFAC: the NKFAC preconditioner on an AdamW base (thesis Alg. 5).

    Algorithm::

        G~ = NKFAC-preconditioned, norm-recovered gradient (see NKFAC)
        W <- W (1 - lr wd)                               (decoupled decay)
        m <- b1 m + (1-b1) G~;   v <- b2 v + (1-b2) G~^2
        W <- W - lr/(1-b1^k) m / (sqrt(v)/sqrt(1-b2^k) + eps)

    The base step is exactly ``torch.optim.AdamW``: with every layer
    excluded AdaNKFAC reproduces it step for step.  (The authors' code
    scales the decay by ``lr / (1 - b1^k)``; the thesis promises decoupled
    decay without a formula.  We keep torch's AdamW so that ``lr`` / ``wd``
    carry over from AdamW configs, and record it here.)

    Args:
        params (Iterable): Parameters or parameter groups.
        lr (float): Learning rate. Defaults to 1e-4.
        betas (tuple[float, float]): Adam betas. Defaults to (0.9, 0.999).
        eps (float): Adam epsilon, outside the square root. 1e-8.
        weight_decay (float): Decoupled weight decay. Defaults to 0.2 (the
            thesis' COCO value).
        Everything else: as in :class:`KroneckerInverse` (``base='adamw'``),
        with NKFAC's defaults.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True))
        >>> opt = AdaNKFAC(model.parameters(), model=model, lr=1e-3)
        >>> model(torch.randn(2, 3, 8, 8)).mean().backward()
        >>> opt.step()
    """

# Copyright (c) mmprecond contributors. All rights reserved.
"""AdamR: Adam run in the Kronecker eigenbasis of each layer.

Reference: Y. Sun, *Designing Effective Preconditioned Optimizers for Deep
Neural Network Training*, PhD thesis, The Hong Kong Polytechnic University,
2024, chapter 4 (Algorithm 6, "Adam with a rotation transformation").  It
builds on AdaBK (H. Yong, Y. Sun, L. Zhang, *A General Regret Bound of
Preconditioned Gradient Method for DNN Training*, CVPR 2023).
"""
import math
from typing import Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.registry import OPTIMIZERS
from torch import Tensor

from ..curvature.capture import factor_dims, gradient_matrix, split_gradient_matrix
from ..curvature.factors import BatchStatistics
from ..distributed import Chunk, run_batched
from ..linalg import EIGH_FAILED, batch_limit, eigh_batch, record_flags
from ..protocol import CheckpointLayout
from .base import PrecondOptimizer, adamw_update, check_positive
from .checks import check_interval, warn_unaligned_interval
from .defaults import adamw_defaults
from .diagnostics import basis_drift, kronecker_layout

#: Default ``max_factor_dim``, the same bound as NKFAC's: every factor of a
#: ResNet-50 FPN Faster R-CNN is decomposed except the 12545-wide input side
#: of ``roi_head.bbox_head.shared_fcs.0`` (an fp64 ``eigh`` of it needs
#: 1.3 GB and tens of seconds); that layer is rotated on its output side only.
DEFAULT_MAX_FACTOR_DIM = 8192

#: Ways to treat the Adam moments when the eigenbasis is refreshed (see
#: :func:`change_moments`); ``'algorithm6'`` is the thesis box exactly.
MOMENT_PROJECTIONS = ('rotate', 'project', 'keep', 'reset', 'algorithm6')

#: When a layer receives its first basis (see ``first_basis``).
FIRST_BASIS = ('stat_interval', 'refresh_interval')

#: Per-layer scalars kept on the CPU (read with ``.item()`` every step).
_CPU_KEYS = ('step', 'L_count', 'R_count')

#: Which factor each rotation diagonalises.
_BASIS_OF = (('L', 'U1'), ('R', 'U2'))


def align_signs(new: Tensor, old: Optional[Tensor]) -> Tensor:
    """Flip eigenvectors so that each points the way of its predecessor.

    An eigenvector is only defined up to its sign, so this changes nothing
    in the basis itself; it only keeps ``eigh`` from arbitrarily reversing
    coordinates that the kept moments refer to.  ``old=None`` stands for
    the identity basis.

    Args:
        new (Tensor): New eigenvectors, one per column, ``(..., n, n)``.
        old (Tensor, optional): Previous eigenvectors, same shape.

    Returns:
        Tensor: ``new`` with columns negated where ``<old_i, new_i> < 0``.
    """
    overlap = (new.diagonal(dim1=-2, dim2=-1) if old is None else
               (old * new).sum(-2))
    return new * torch.where(overlap < 0, -1.0, 1.0).to(new.dtype).unsqueeze(-2)


def project_moments(exp_avg: Tensor, exp_avg_sq: Tensor, left: Optional[Tensor],
                    right: Optional[Tensor]) -> None:
    """Re-express Adam moments after a change of basis, in place.

    With ``P1 = U1_new^T U1_old`` (``left``) and ``P2 = U2_new^T U2_old``
    (``right``), a matrix ``A`` in the old rotated coordinates is
    ``P1 A P2^T`` in the new ones.  The first moment is mapped exactly that
    way.  The second moment is an average of squares and has no exact
    image; it is mapped as the diagonal of the rotated covariance of
    independent coordinates, ``V <- (P1 o P1) V (P2 o P2)^T`` (``o``: the
    elementwise product).  That keeps ``V`` non-negative, keeps its total
    (rows of ``P o P`` sum to one), and is an exact permutation when the
    new basis only reorders the old one.

    Args:
        exp_avg (Tensor): First moment ``M`` (``d_out x d_in``).
        exp_avg_sq (Tensor): Second moment ``V`` (``d_out x d_in``).
        left (Tensor, optional): ``P1``; ``None`` when that side is unchanged.
        right (Tensor, optional): ``P2``; ``None`` when unchanged.
    """
    m, v = exp_avg, exp_avg_sq
    if left is not None:
        left = left.to(m.dtype)
        m = left @ m
        v = (left * left) @ v
    if right is not None:
        right = right.to(m.dtype)
        m = m @ right.T
        v = v @ (right * right).T
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v.clamp_(min=0))


def rotate_moments(exp_avg: Tensor, left: Optional[Tensor],
                   right: Optional[Tensor]) -> None:
    """Re-express the first moment in a new basis, exactly, in place.

    ``M <- P1 M P2^T`` with ``P1 = U1_new^T U1_old`` (``left``) and
    ``P2 = U2_new^T U2_old`` (``right``); ``None`` leaves that side.  The
    second moment is not touched by this: the ``'rotate'`` policy carries
    it over matched by eigenvalue order (both bases list their
    eigenvectors in ascending eigenvalue order, so entry ``(i, j)`` of
    ``V`` keeps describing the ``i``-th / ``j``-th eigen-direction).
    """
    m = exp_avg
    if left is not None:
        m = left.to(m.dtype) @ m
    if right is not None:
        m = m @ right.to(m.dtype).T
    exp_avg.copy_(m)


def power_step_basis(factor: Tensor, basis: Tensor) -> Tuple[Tensor, Tensor]:
    """One warm-started orthogonal power step, ``qr(F U)``, batched.

    ``factor`` and ``basis`` are ``(..., n, n)``; the columns of ``basis``
    are in ascending eigenvalue order (as ``eigh`` returns them).  The QR
    factorisation runs on the columns in *descending* order: orthogonal
    iteration pulls its first ``k`` columns towards the top-``k``
    eigenspace, so in ascending order it would drag the smallest
    eigenvector onto the largest and scramble the order that the second
    moment is matched by.  Each column of the result then tracks the same
    column of ``basis`` (its sign is chosen so that they point the same
    way).  Where the step is not finite (a non-finite factor or basis) the
    old basis is returned for that matrix.

    Returns:
        tuple[Tensor, Tensor]: The new bases and, per matrix, whether its
        step was finite (a bool tensor of the batch shape).
    """
    q = torch.linalg.qr(factor @ basis.flip(-1)).Q.flip(-1)
    q = q * torch.where((q * basis).sum(-2) < 0, -1.0, 1.0).unsqueeze(-2)
    ok = torch.isfinite(q).flatten(-2).all(-1)
    return torch.where(ok[..., None, None], q, basis), ok


@OPTIMIZERS.register_module()
class AdamR(PrecondOptimizer):
    r"""AdamR: AdamW in the eigenbasis of each layer's Kronecker factors.

    For a ``Linear`` / ``Conv2d`` layer with gradient matrix ``G``
    (``d_out x d_in``, the bias as the last column, convs via im2col), the
    regret-optimal Kronecker preconditioner of AdaBK has the eigenvectors
    ``U1`` of ``L = E[Delta Delta^T]`` and ``U2`` of ``R = E[X X^T]``.
    AdamR rotates the gradient into that basis, runs Adam there, and
    rotates the step back (thesis Algorithm 6)::

        for t = 0, 1, 2, ...:
            forward / backward;  on t % T_s == 0 collect
                S_L = sum_rows Delta^T Delta,  S_R = mean_rows X^T X
            if t % T_s == 0:                     (n-th statistics step)
                L <- L + (S_L - L) / n;   R <- R + (S_R - R) / n
            if t > 0 and t % T_u == 0:           (fp64 eigh)
                U1 D_L U1^T = L + eps_b I;   U2 D_R U2^T = R + eps_b I
                first basis of the layer: M, V <- 0, k <- 0
                later:  M <- P1 M P2^T  (P = U_new^T U_old),  V kept
            G~ = U1^T G U2;   k <- k + 1
            M <- b1 M + (1 - b1) G~;   V <- b2 V + (1 - b2) G~ o G~
            N  = M / (1 - b1^k) / (sqrt(V / (1 - b2^k)) + eps)
            W  <- W (1 - lr wd) - lr U1 N U2^T

    The rotation is orthogonal, so AdamR needs no gradient-norm recovery
    and takes AdamW's ``lr`` / ``weight_decay`` unchanged.  The two moment
    lines are this implementation's; Algorithm 6 itself carries ``M``, ``V``
    and ``k`` over unchanged (``moment_projection='algorithm6'``).

    Readings chosen where the thesis is silent:

    * Steps are 0-based: statistics at ``t = 0, T_s, 2 T_s, ...``; the first
      basis at ``t = T_u`` (from ``T_u / T_s + 1`` statistics).  Until then
      ``U1 = U2 = I`` and every step is exactly ``torch.optim.AdamW``'s.
      ``L``, ``R`` are plain running means of the sampled statistics,
      unnormalised (``L`` sums the output-gradient rows, as Lemma 4.1
      does); only their eigenvectors are used.
    * ``eps_b`` (``eps_basis``) is added in fp64 before a batched ``eigh``
      (:func:`~mmprecond.linalg.eigh_batch`, one call per factor size),
      whose retries are counted per factor under ``'eigh_retry'``.  A factor that is
      not finite, or an ``eigh`` that still fails, keeps the previous basis
      of that side (``'eigh_failure'``).  New eigenvectors are sign-aligned
      with the previous ones (:func:`align_signs`) and, as ``eigh`` returns
      them, in ascending eigenvalue order.
    * Moments at a basis change.  At a layer's **first** basis its moments
      were built in the parameter coordinates, where an ill-conditioned
      layer's second moment is nearly uniform; carried over, that ``V``
      dominates for about ``1 / (1 - b2)`` steps (1000 at the default
      ``b2``), divides every rotated coordinate by almost the same number,
      and the rotation buys nothing.  So ``M``, ``V`` and the bias-correction
      counter restart there (``reset_first_basis=True``).  At **later**
      refreshes (``moment_projection``): ``'keep'`` (default) carries both
      over unchanged, as the thesis box does and the spec recommends (it
      calls re-projection an ablation); ``'rotate'`` maps ``M`` exactly
      into the new basis (:func:`rotate_moments`) and keeps ``V``, matched
      to the eigen-directions only by eigenvalue order; ``'project'`` also
      maps ``V`` by the squared rotation (:func:`project_moments`);
      ``'reset'`` restarts them.  ``'algorithm6'`` is the thesis box
      exactly: ``'keep'`` at every change, the first included.  Why
      ``'keep'`` is the default (``'rotate'`` was, until it broke the
      demo detector) is measured in ``docs/benchmarks.md``, section
      "AdamR design measurements".
    * With fresh moments, an eigen-direction in which a factor is exactly
      singular (e.g. the logit shift of a softmax-CE head: its ``L`` has
      the all-ones null vector) holds only rounding noise, and Adam's first
      steps after the reset scale that noise by ``1 / (|noise| + eps)``;
      such steps move the weights along directions that do not change the
      loss.  Raise ``eps`` if they matter (e.g. bit-level comparisons).
    * ``first_basis='stat_interval'`` forms the first basis right after the
      second statistics (``t = T_s``) instead of at ``t = T_u``.  It was
      measured and lost (``docs/benchmarks.md``), so it is not the default.
    * ``power_interval`` (off by default) adds a cheaper refresh between
      the eigendecompositions: every ``power_interval`` steps each basis
      takes one warm-started orthogonal power step, ``U <- qr(F U)``
      (:func:`power_step_basis`; batched over equal-shaped factors, fp32,
      no value read back to the host), then the moments follow
      ``moment_projection``.  NKFAC's warm-started Newton step plays the
      same role for inverses; SOAP (Vyas et al., 2024) refreshes its
      eigenbasis this way.
    * A layer whose rotated gradient is not finite (a corrupted basis, an
      overflowing gradient; before its first basis, its raw gradient)
      **skips that step**: its ``M`` and ``V`` stay as they were, its
      weight and bias only take the decoupled weight decay, and the
      bias-correction counter still advances.  The test runs on the device
      (``torch.where``), so no step reads a value back; the count
      (``'nonfinite_rotated_gradient'``, like ``'power_step_failure'``) is
      kept on the device and read by :attr:`fallbacks` ``.counts``.  A
      basis that is still not finite at the next eigh refresh is dropped
      and that layer's moments restart (``'nonfinite_basis'``).
    * The step of all layers of a parameter group is batched: moments,
      bias corrections and the weight update use foreach kernels; the
      rotations are two matmuls per side and layer.
    * Adam moments and the bias-correction counter live per layer, in
      ``layer_state[name]`` (``exp_avg``, ``exp_avg_sq``, ``step``), so
      they are checkpointed by module name.  ``betas`` and ``eps`` come from
      the weight's parameter group; ``lr`` and ``weight_decay`` are applied
      per parameter, so ``paramwise_cfg`` (e.g. ``bias_decay_mult=0``)
      works as with AdamW.
    * Parameters outside preconditioned layers (norms, embeddings, grouped
      convs, layers with both sides above ``max_factor_dim``) get plain
      AdamW.  A side above ``max_factor_dim`` keeps the identity rotation.

    The measurements behind these choices (moment policy, first-basis
    time, power steps, the demos) are in ``docs/benchmarks.md``, section
    "AdamR design measurements".

    Reference: Y. Sun, PhD thesis (PolyU), Algorithm 6; see the module
    docstring.

    Args:
        params (Iterable): Parameters or parameter groups.
        lr (float): Learning rate. Defaults to 1e-3 (``torch.optim.AdamW``).
        betas (tuple[float, float]): Adam betas. Defaults to (0.9, 0.999).
        eps (float): Adam epsilon, outside the square root. Defaults to 1e-8.
        weight_decay (float): Decoupled weight decay, ``p *= 1 - lr * wd``.
            Defaults to 1e-2 (``torch.optim.AdamW``).
        model (nn.Module): Model whose layers are hooked (passed by
            :class:`~mmprecond.engine.PrecondOptimWrapperConstructor`).
        stat_interval (int): ``T_s``. Defaults to 100.
        refresh_interval (int): ``T_u``. Defaults to 1000.
        eps_basis (float): ``eps_b`` added to ``L`` and ``R`` before the
            eigendecomposition. Defaults to 0.01.
        moment_projection (str): The moments at later basis changes:
            ``'keep'`` (default), ``'rotate'``, ``'project'``, ``'reset'``,
            or ``'algorithm6'`` (``'keep'`` at every change, no reset at the
            first basis: the thesis box).
        reset_first_basis (bool, optional): Restart a layer's moments and
            bias correction at its first basis. Defaults to ``None``:
            ``True``, except ``False`` for ``'algorithm6'``.
        first_basis (str): ``'refresh_interval'`` (default: ``t = T_u``) or
            ``'stat_interval'`` (``t = T_s``).
        power_interval (int, optional): Steps between power-step refreshes
            of the bases (``U <- qr(F U)``) in between the eigh refreshes.
            Defaults to None (none).
        max_factor_dim (int): See :data:`DEFAULT_MAX_FACTOR_DIM`.
        shard_refresh (bool): Under ``torch.distributed``, split each batch of
            equal-sized factors over the ranks (balanced by ``n^3`` cost)
            and broadcast the eigenvectors, so the basis refresh time falls
            with the number of ranks.  ``False``: every rank computes every
            basis.  Ranks end up bit-identical either way, and count the
            same fallbacks.  Defaults to True.
        skip_nonfinite_steps (bool): Skip a non-finite step exactly (one
            host read per step) instead of zeroing non-finite gradient
            entries on the device; see :class:`~mmprecond.optim.NKFAC`.
        factor_memory_budget_mb (float, optional): Bound, in MiB, on the
            estimated factor memory; see :class:`~mmprecond.optim.NKFAC`.
            Defaults to None.

    Example:
        >>> import torch, torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(),
        ...                       nn.Linear(4 * 6 * 6, 2))
        >>> opt = AdamR(model.parameters(), model=model, lr=1e-3,
        ...             stat_interval=1, refresh_interval=2)
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     model(torch.randn(8, 3, 8, 8)).pow(2).mean().backward()
        ...     opt.step()
        >>> sorted(opt.layer_state['3'])
        ['L', 'L_count', 'R', 'R_count', 'U1', 'U2', 'exp_avg', 'exp_avg_sq', 'step']
    """

    checks_statistics_on_device = True

    def __init__(self,
                 params: Iterable,
                 *,
                 model: Optional[nn.Module] = None,
                 lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8,
                 weight_decay: float = 1e-2,
                 stat_interval: int = 100,
                 refresh_interval: int = 1000,
                 eps_basis: float = 0.01,
                 moment_projection: str = 'keep',
                 reset_first_basis: Optional[bool] = None,
                 first_basis: str = 'refresh_interval',
                 power_interval: Optional[int] = None,
                 max_factor_dim: int = DEFAULT_MAX_FACTOR_DIM,
                 shard_refresh: bool = True,
                 skip_nonfinite_steps: bool = False,
                 factor_memory_budget_mb: Optional[float] = None) -> None:
        defaults = adamw_defaults(lr, betas, eps, weight_decay)
        check_positive('eps_basis', eps_basis, allow_zero=True)
        check_interval('refresh_interval', refresh_interval)
        if moment_projection not in MOMENT_PROJECTIONS:
            raise ValueError(f'Invalid moment_projection: {moment_projection!r} '
                             f'(one of {MOMENT_PROJECTIONS})')
        thesis = moment_projection == 'algorithm6'
        if reset_first_basis is None:
            reset_first_basis = not thesis
        if thesis and (reset_first_basis or first_basis != 'refresh_interval'):
            raise ValueError("moment_projection='algorithm6' is Algorithm 6 "
                             'exactly: it takes no reset_first_basis=True and '
                             "no first_basis other than 'refresh_interval'")
        if first_basis not in FIRST_BASIS:
            raise ValueError(f'Invalid first_basis: {first_basis!r} '
                             f'(one of {FIRST_BASIS})')
        if power_interval is not None:
            check_interval('power_interval', power_interval)
        super().__init__(params, defaults, model, 'adamw', stat_interval,
                         max_factor_dim, skip_nonfinite_steps=skip_nonfinite_steps,
                         factor_memory_budget_mb=factor_memory_budget_mb)
        self.refresh_interval = int(refresh_interval)
        self.eps_basis = float(eps_basis)
        self.moment_projection = 'keep' if thesis else moment_projection
        self.reset_first_basis = bool(reset_first_basis)
        self.first_basis = first_basis
        self.power_interval = (None if power_interval is None else
                               int(power_interval))
        self.shard_refresh = bool(shard_refresh)
        # transposed views of the current bases (see _transpose)
        self._transposes: Dict[int, Tuple[Tensor, Tensor]] = {}
        warn_unaligned_interval('AdamR', 'refresh_interval', self.refresh_interval,
                                self.stat_interval)

    # ------------------------------------------------------------ statistics
    def _sides(self, module: nn.Module) -> Tuple[str, ...]:
        d_out, d_in = factor_dims(module)
        return tuple(side for side, dim in (('L', d_out), ('R', d_in))
                     if self.side_enabled(dim))

    def update_statistics(self, stats: Dict[str, BatchStatistics], step: int) -> None:
        """Running means of the statistics, folded with batched kernels.

        The counts are CPU tensors (read without a device sync); a non-finite
        statistic is not folded (substituted on the device and counted), but
        its count still advances, since the host does not look.
        """
        items, counts = [], []
        for name, module in self.layers.items():
            st = self.layer_state.setdefault(name, {})
            batch = stats[name]
            for side in self._sides(module):
                new = batch.gg if side == 'L' else batch.xx
                if new is None:
                    continue
                if side + '_count' not in st:
                    st[side + '_count'] = torch.zeros((), dtype=torch.int64)
                counts.append(st[side + '_count'])
                items.append((st, side, f'{name}.{side}', new))
        if not items:
            return
        torch._foreach_add_(counts, 1)
        self.fold_statistics(items, [1.0 / k for k in torch.stack(counts).tolist()])

    # ----------------------------------------------------------------- bases
    def is_basis_step(self, step: int) -> bool:
        """Whether the (0-based) ``step`` computes fresh eigenbases."""
        if step > 0 and step % self.refresh_interval == 0:
            return True
        return (self.first_basis == 'stat_interval'
                and step == self.stat_interval < self.refresh_interval)

    def update_preconditioners(self, step: int) -> None:
        if self.is_basis_step(step):
            self._transposes.clear()
            self._eigh_refresh()
        elif (self.power_interval is not None and step > 0
              and step % self.power_interval == 0):
            self._transposes.clear()
            self._power_refresh()

    def _eigh_refresh(self) -> None:
        """Fresh fp64 eigenbases of every factor, batched by size.

        Factors of one size (dtype, device, first basis or not) are
        decomposed by one batched ``eigh`` (:func:`~mmprecond.linalg.eigh_batch`;
        cache-sized batches on the CPU); under torch.distributed the
        batches are split over the ranks by ``n^3`` and the sign-aligned
        eigenvectors broadcast (``shard_refresh``).  Retries and failures are
        counted per factor on every rank; a failed factor keeps its basis.
        """
        self.sync_fallbacks()
        self._drop_nonfinite_bases()
        slots, factors, olds = [], [], []
        for name in self.layers:
            st = self.layer_state.get(name)
            if not st:
                continue
            for side, key in _BASIS_OF:
                if side in st:
                    slots.append((name, key))
                    factors.append(st[side])
                    olds.append(st.get(key))
        if not slots:
            return
        keys = [(f.shape[-1], f.dtype, f.device, old is None)
                for f, old in zip(factors, olds)]

        def work(chunk: Chunk) -> List[Tensor]:
            _, dtype, _, first = chunk.key
            damped = torch.stack([factors[i] for i in chunk.items]).double()
            damped.diagonal(dim1=-2, dim2=-1).add_(self.eps_basis)
            _, vecs, flags = eigh_batch(damped)
            old = None if first else torch.stack([olds[i] for i in chunk.items])
            return [align_signs(vecs.to(dtype), old), flags.to(dtype)]

        def outputs(key: tuple, count: int) -> list:
            n, dtype, device, _ = key
            return [((count, n, n), dtype, device), ((count, ), dtype, device)]

        results = run_batched(
            keys, work, lambda key: float(key[0])**3, outputs,
            shard=self.shard_refresh,
            max_items=lambda key: batch_limit(key[0], torch.float64, key[2]))
        changes: Dict[str, Dict[str, Tensor]] = {}
        for chunk, (vecs, flags) in results:
            codes = record_flags(self.fallbacks, flags)
            for j, i in enumerate(chunk.items):
                if not codes[j] & EIGH_FAILED:  # else: the old basis stays
                    name, key = slots[i]
                    changes.setdefault(name, {})[key] = vecs[j]
        for name, new_bases in changes.items():
            st = self.layer_state[name]
            first = 'U1' not in st and 'U2' not in st
            if 'exp_avg' in st:
                if first and self.reset_first_basis:
                    _reset_moments(st)
                else:
                    rel = {}
                    for key, new in new_bases.items():
                        old = st.get(key)
                        rel[key] = new.T if old is None else new.T @ old
                    self._change_moments(st, rel.get('U1'), rel.get('U2'))
            st.update(new_bases)

    def _drop_nonfinite_bases(self) -> None:
        """Forget non-finite bases; restart that layer's moments."""
        for name, st in self.layer_state.items():
            bad = [key for _, key in _BASIS_OF
                   if key in st and not bool(torch.isfinite(st[key]).all())]
            if not bad:
                continue
            self.fallbacks.record(
                'nonfinite_basis', f'the basis of {name} is not finite; it '
                'is recomputed and the layer\'s Adam moments restart')
            for key in bad:
                del st[key]
            if 'exp_avg' in st:
                _reset_moments(st)

    def _power_refresh(self) -> None:
        """``U <- qr(F U)`` for every basis, batched over equal shapes.

        No value is read back to the host: a step that is not finite keeps
        the previous basis and is counted on the device.
        """
        groups: Dict[tuple, list] = {}
        for name, st in self.layer_state.items():
            for side, key in _BASIS_OF:
                if side in st and key in st:
                    f = st[side]
                    groups.setdefault((f.shape, f.dtype, f.device),
                                      []).append((name, side, key))
        rel: Dict[str, Dict[str, Tensor]] = {}
        for members in groups.values():
            factors = torch.stack([self.layer_state[n][s] for n, s, _ in members])
            old = torch.stack([self.layer_state[n][k]
                               for n, _, k in members]).to(factors.dtype)
            new, ok = power_step_basis(factors, old)
            self.fallbacks.record_flags(
                'power_step_failure', ~ok,
                [f'{n}.{k}' for n, _, k in members],
                _DEVICE_FALLBACKS['power_step_failure'])
            eye = torch.eye(new.shape[-1], dtype=new.dtype, device=new.device)
            moved = torch.where(ok[:, None, None], new.mT @ old, eye)
            for i, (name, _, key) in enumerate(members):
                self.layer_state[name][key] = new[i]
                rel.setdefault(name, {})[key] = moved[i]
        for name, sides in rel.items():
            st = self.layer_state[name]
            if 'exp_avg' in st:
                self._change_moments(st, sides.get('U1'), sides.get('U2'))

    def _change_moments(self, st: Dict[str, Tensor], left: Optional[Tensor],
                        right: Optional[Tensor]) -> None:
        """Apply ``moment_projection`` for relative rotations ``P1``, ``P2``."""
        policy = self.moment_projection
        if policy == 'project':
            project_moments(st['exp_avg'], st['exp_avg_sq'], left, right)
        elif policy == 'rotate':
            rotate_moments(st['exp_avg'], left, right)
        elif policy == 'reset':
            _reset_moments(st)
        # 'keep': Algorithm 6 carries M and V over unchanged

    # ---------------------------------------------------------- fallbacks
    def sync_fallbacks(self) -> None:
        """Read the fallbacks counted on the device into ``fallbacks``.

        Kept for compatibility: ``fallbacks.counts`` now reads them itself
        whenever it is accessed.  It reads device values, so :meth:`step`
        never calls it on plain or statistics steps.
        """
        self.fallbacks.counts  # noqa: B018 (the property reads them)

    def state_dict(self) -> dict:
        self.sync_fallbacks()
        return super().state_dict()

    # -------------------------------------------------------------- rotation
    def precondition(self, name: str, module: nn.Module,
                     grad: Tensor) -> Optional[Tensor]:
        """The gradient in the layer's eigenbasis, ``U1^T G U2``.

        ``None`` while the layer has no basis yet (identity rotation).  The
        Adam step on it happens in :meth:`base_step`.
        """
        st = self.layer_state.get(name)
        if not st or ('U1' not in st and 'U2' not in st):
            return None
        return self._rotate(st, grad.to(_work_dtype(grad)), back=False)

    def preconditioned_gradients(self, directions: Dict[Tensor, Tensor]):
        """None: AdamR's layers take their rotated Adam step in :meth:`base_step`."""
        return iter(())

    def _rotate(self, st: Dict[str, Tensor], a: Tensor, back: bool) -> Tensor:
        """``U1^T a U2`` (into the basis) or ``U1 a U2^T`` (``back``)."""
        u1, u2 = st.get('U1'), st.get('U2')
        if u1 is not None:
            u1 = u1.to(a.dtype)
            a = (u1 if back else self._transpose(u1)) @ a
        if u2 is not None:
            u2 = u2.to(a.dtype)
            a = a @ (self._transpose(u2) if back else u2)
        return a

    def _transpose(self, u: Tensor) -> Tensor:
        """``u.T``, the view made once per basis rather than twice a step.

        Cached by identity for the bases in ``layer_state`` (cleared at every
        refresh, so no old basis is kept alive).
        """
        hit = self._transposes.get(id(u))
        if hit is None or hit[0] is not u:
            hit = (u, u.T)
            if any(u is st.get(k) for st in self.layer_state.values()
                   for k in ('U1', 'U2')):
                self._transposes[id(u)] = hit
        return hit[1]

    def _rotated_adam(self, group: dict, names: List[str],
                      grads: List[Tensor]) -> Tuple[List[Tensor], List[float]]:
        """Adam in each layer's basis, batched over the layers of ``group``.

        ``grads`` are the layers' gradients in their bases.  Returns the
        un-rotated steps ``U1 N U2^T`` with ``N = M / (sqrt(V / bc2) +
        eps)`` and each layer's ``bc1``; the caller scales by ``lr / bc1``,
        as ``torch.optim.AdamW`` does.  A layer whose gradient is not finite
        skips the step (``M``, ``V`` unchanged, zero step), decided on the
        device and counted under ``'nonfinite_rotated_gradient'``.
        """
        beta1, beta2 = group['betas']
        states = []
        for name, g in zip(names, grads):
            st = self.layer_state.setdefault(name, {})
            if 'exp_avg' not in st:
                st['step'] = torch.zeros((), dtype=torch.float32)
                st['exp_avg'] = torch.zeros_like(g, dtype=_work_dtype(g))
                st['exp_avg_sq'] = torch.zeros_like(st['exp_avg'])
            states.append(st)
        steps = [st['step'] for st in states]
        torch._foreach_add_(steps, 1.0)
        # CPU tensors: read without a device sync, all at once
        ks = [int(k) for k in torch.stack(steps).tolist()]
        ms = [st['exp_avg'] for st in states]
        vs = [st['exp_avg_sq'] for st in states]
        ok = torch.isfinite(torch.stack(torch._foreach_norm(grads)))
        self.fallbacks.record_flags('nonfinite_rotated_gradient', ~ok, names,
                                    _DEVICE_FALLBACKS['nonfinite_rotated_gradient'])
        flags = ok.unbind()
        zero = ms[0].new_zeros(())  # one scalar for every where below
        grads = [torch.where(f, g.to(m.dtype), zero)
                 for f, g, m in zip(flags, grads, ms)]
        okf = ok.to(ms[0].dtype)
        # a skipped layer: no change of M (weight 0) nor of V (decay 1)
        torch._foreach_lerp_(ms, grads, (okf * (1 - beta1)).unbind())
        torch._foreach_mul_(vs, torch.where(ok, beta2, 1.0).to(okf).unbind())
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(vs)
        torch._foreach_div_(denoms, [math.sqrt(1 - beta2**k) for k in ks])
        torch._foreach_add_(denoms, group['eps'])
        normalized = torch._foreach_div(ms, denoms)
        # zero step when skipped (after the rotation: a NaN basis gives NaN)
        return ([torch.where(f, self._rotate(st, n, back=True), zero)
                 for f, st, n in zip(flags, states, normalized)],
                [1 - beta1**k for k in ks])

    # ------------------------------------------------------------ base step
    def base_step(self, directions: Dict[Tensor, Tensor]) -> None:
        """Rotated Adam for preconditioned layers, AdamW for the rest.

        Every layer's ``[weight | bias]`` gradient is rotated into its basis
        (identity until the first), the Adam moments of all layers of a
        parameter group are updated with foreach kernels, and the weights
        take ``p *= 1 - lr wd;  p -= lr / bc1 * U1 N U2^T`` with their own
        group's ``lr`` / ``weight_decay`` (the bias with its group's).
        """
        group_of = {id(p): g for g in self.param_groups for p in g['params']}
        batches: Dict[int, Tuple[dict, list]] = {}
        for name, module in self.layers.items():
            g = gradient_matrix(module)
            if g is None:
                continue
            rotated = self.precondition(name, module, g)
            group = group_of[id(module.weight)]
            batches.setdefault(id(group), (group, []))[1].append(
                (name, module, g.to(_work_dtype(g)) if rotated is None else rotated))
        params, updates, decays, scales = [], [], [], []
        done = set()
        for group, layers in batches.values():
            names, modules, grads = zip(*layers)
            steps, bc1s = self._rotated_adam(group, list(names), list(grads))
            for module, step, bc1 in zip(modules, steps, bc1s):
                weight, bias = module.weight, module.bias
                dw, db = split_gradient_matrix(module, step)
                pairs = [(weight, dw)]
                if bias is not None and id(bias) in group_of:
                    done.add(id(bias))
                    if bias.grad is not None:
                        pairs.append((bias, db))
                done.add(id(weight))
                for p, d in pairs:
                    g_p = group_of[id(p)]
                    params.append(p)
                    updates.append(d.to(p.dtype))
                    decays.append(1 - g_p['lr'] * g_p['weight_decay'])
                    scales.append(-g_p['lr'] / bc1)
        if params:
            decayed = [(p, f) for p, f in zip(params, decays) if f != 1]
            if decayed:
                torch._foreach_mul_([p for p, _ in decayed],
                                    [f for _, f in decayed])
            # ``p.add_(d, alpha=-lr / bc1)``: one foreach add per distinct
            # step size (layers of a group share lr and, mostly, the count)
            by_scale: Dict[float, List[int]] = {}
            for i, a in enumerate(scales):
                by_scale.setdefault(a, []).append(i)
            for a, idx in by_scale.items():
                torch._foreach_add_([params[i] for i in idx],
                                    [updates[i] for i in idx], alpha=a)
        rest = {p: d for p, d in directions.items() if id(p) not in done}
        for group in self.param_groups:
            adamw_update(group, self.state, rest)

    # ------------------------------------------------------------------ state
    #: Explained at build time (see :mod:`.checks`).
    rejected_keywords = dict(checkpoint_inverses=(
        "AdamR's Adam moments are kept in its eigenbasis, so a checkpoint "
        'must keep the basis (it is not a function of the current factors); '
        'drop checkpoint_inverses.'))

    def is_derived_key(self, key: str) -> bool:
        """Nothing: the bases ``U1``/``U2`` carry the moments' coordinates."""
        return False

    def load_state_dict(self, state_dict: dict) -> None:
        """Load as the base class does; per-layer counters stay on the CPU."""
        self._transposes.clear()
        super().load_state_dict(state_dict)
        for st in self.layer_state.values():
            for key in _CPU_KEYS:
                if key in st:
                    st[key] = st[key].cpu()

    def diagnostics(self) -> Dict[str, Tensor]:
        """``basis_drift``: how far ``U^T L U`` / ``U^T R U`` are from
        diagonal (see :mod:`mmprecond.optim.diagnostics`)."""
        return basis_drift(self.layer_state, _BASIS_OF)

    def checkpoint_layout(self) -> CheckpointLayout:
        return kronecker_layout(self, derived_kind='bases')


#: Messages of the fallbacks counted on the device (:meth:`AdamR.sync_fallbacks`).
_DEVICE_FALLBACKS = dict(
    nonfinite_rotated_gradient='a (rotated) layer gradient was not finite; '
    'that layer skipped the step (moments unchanged, weight decay applied)',
    power_step_failure='a power-step basis refresh was not finite; the '
    'previous basis was kept')


def _reset_moments(st: Dict[str, Tensor]) -> None:
    """Zero a layer's Adam moments and its bias-correction counter."""
    st['exp_avg'].zero_()
    st['exp_avg_sq'].zero_()
    st['step'].zero_()


def _work_dtype(t: Tensor) -> torch.dtype:
    """fp32, or the tensor's dtype if it is wider (fp64)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32

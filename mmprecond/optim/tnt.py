# Copyright (c) mmprecond contributors. All rights reserved.
"""TNT and TNT-EF: tensor-normal training.

Yi Ren, "Efficient Second-Order Methods for Training Neural Networks", PhD
thesis, Columbia University, 2022, Chapter 4 (Algorithm 15); Ren and
Goldfarb, "Tensor Normal Training for Deep Learning Models", NeurIPS 2021.
"""
import math
import time
import weakref
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import OPTIMIZERS
from torch import Tensor
from torch.optim import Optimizer

from ..distributed import all_reduce_sum_, world_size
from ..logging import FallbackLog
from ..protocol import EngineProtocol
from .base import check_positive, check_unit_interval, finite_flags
from .checks import check_refresh_interval


def tensor_modes(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The tensor shape TNT factorises a parameter as.

    A conv weight ``(C_out, C_in, k1, k2)`` is the 3-way tensor
    ``(C_out, C_in, k1 k2)``; a weight of more dimensions keeps its first
    two and merges the rest; a matrix or a vector (bias, BatchNorm) is
    itself.

    Example:
        >>> tensor_modes((64, 32, 3, 3))
        (64, 32, 9)
    """
    if len(shape) <= 2:
        return tuple(shape)
    return shape[0], shape[1], math.prod(shape[2:])


def mode_gram(g: Tensor, i: int) -> Tensor:
    """``mat_i(g) mat_i(g)^T``: ``g`` unfolded along mode ``i`` (fp32 or
    fp64)."""
    m = g.movedim(i, 0).reshape(g.shape[i], -1)
    if m.dtype != torch.float64:
        m = m.float()
    return m @ m.T


def trace_equalized(grams: Dict[int, Tensor], sq_norm: Tensor,
                    dims: Tuple[int, ...]) -> Dict[int, Tensor]:
    """Thesis Eq. 4.10: factors ``U~_i`` with equal average eigenvalue.

    With ``k`` factored modes, ``D = prod(dims)`` and
    ``c0 = (||G||_F^2 / D)^(1/k)``,
    ``U~_i = E[G^(i)] / (c0^(k-1) D / d_i)``: every ``tr(U~_i) / d_i`` is
    ``c0`` and the Kronecker product (identity on unfactored modes) has the
    trace ``E||G||_F^2`` of the Fisher block it models.

    Args:
        grams (dict[int, Tensor]): ``E[mat_i(G) mat_i(G)^T]`` per factored
            mode ``i``.
        sq_norm (Tensor): ``E||G||_F^2`` (0-dim).
        dims (tuple[int]): All mode sizes of the tensor.
    """
    k = len(grams)
    total = math.prod(dims)
    c0 = (sq_norm / total).clamp_min(1e-30)**(1.0 / k)
    return {
        i: g / (c0**(k - 1) * (total / dims[i]))
        for i, g in grams.items()
    }


class _SampledGradHook:
    """Forward hook on the logits module: sampled-label gradient ``G-bar``."""

    def __init__(self, optimizer: 'TNT') -> None:
        self.opt_ref = weakref.ref(optimizer)

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        opt = self.opt_ref()
        if opt is None or not opt.sampling_active:
            return
        if not (module.training and torch.is_grad_enabled()):
            return
        logits = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(logits, Tensor) or not logits.requires_grad:
            return
        if logits.dim() != 2:
            raise RuntimeError(
                f'TNT samples labels from a (batch, classes) output, but '
                f"'{opt.logits_module}' returned shape {tuple(logits.shape)}; "
                'point `logits_module` at the classifier head, or use TNT_EF.')
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=1)
            # a diverged row samples uniformly (its gradient is non-finite
            # and is kept out of the statistics); no device read here
            ok = torch.isfinite(probs).all(dim=1, keepdim=True)
            probs = torch.where(ok, probs, torch.ones_like(probs))
            labels = torch.multinomial(
                probs, 1, generator=opt.label_generator(probs.device)).squeeze(1)
        loss = F.cross_entropy(logits.float(), labels)
        params = opt.fisher_params
        grads = torch.autograd.grad(loss, params, retain_graph=True,
                                    allow_unused=True)
        for p, g in zip(params, grads):
            if g is None:
                continue
            prev = opt.sampled_grads.get(p)
            opt.sampled_grads[p] = g if prev is None else prev + g


@OPTIMIZERS.register_module()
class TNT(Optimizer, EngineProtocol):
    r"""TNT: tensor-normal training (Ren 2022, thesis Algorithm 15).

    Model-agnostic: every parameter tensor (weight and bias separately,
    BatchNorm included) is preconditioned by the inverse of a tensor-normal
    model of its Fisher block, ``F ~ U_1 (x) ... (x) U_k``, estimated from
    sampled-label gradients ``G-bar`` (minibatch mean; ``y ~ p(y|x)``)::

        mu = 0.9 (momentum), beta = 0.9 (statistics EMA)
        for t:
            forward/backward -> grad
            if t % T1 == 0: extra backward with sampled labels -> G-bar
                G^(i) = beta G^(i) + (1-beta) mat_i(G-bar) mat_i(G-bar)^T
            grad^ = mu grad^ + grad                       # no (1 - mu)
            if t % T2 == 0: U~_i by trace equalisation (Eq. 4.10);
                            Q_i = (U~_i + eps I)^-1
            p = grad^ x_1 Q_1 ... x_k Q_k;  p += wd W;  W -= lr p

    A conv weight is the 3-way tensor ``(C_out, C_in, k1 k2)``.  The extra
    backward needs no second forward: a forward hook on the classifier
    output (``logits_module``) draws labels from the softmax and takes the
    gradient of their cross-entropy with ``retain_graph``, before the main
    backward runs.  That needs a categorical likelihood (classifiers);
    detection losses have none, use :class:`TNT_EF` there.

    Choices where the thesis leaves room (documented, tested):

    * **Warm start.**  The thesis initialises ``G^(i)`` over the whole
      dataset.  ``warm_start_iters=N`` makes the first ``N`` iterations
      statistics-only (no parameter moves): their ``G^(i)`` are averaged and
      the inverses formed; ``t`` then starts at 0
      (:class:`~mmprecond.engine.WarmStartHook` makes those calls on the
      first ``N`` batches before training).  Without a warm start the
      first statistics initialise ``G^(i)`` (instead of an EMA from zero)
      and the first refresh is at ``t = 0``.
    * A mode of size 1 is dropped, and a mode wider than ``max_factor_dim``
      is left unpreconditioned (identity); trace equalisation then runs over
      the factored modes with the Fisher trace kept.  With every mode
      unfactored (``max_factor_dim=1``, no weight decay) TNT is exactly
      ``torch.optim.SGD(lr, momentum=mu)``; the tests check it.
    * Inverses by Cholesky in fp64 (the thesis uses a plain inverse).
    * **Damping** is the thesis' (Eq. 4.10 and Algorithm 15): an absolute
      ``eps`` added to every trace-equalised factor, ``(U~_i + eps I)^-1``,
      so ``||F^-1|| <= eps^-k``.  Damping relative to the factors' scale
      (``eps`` times their mean eigenvalue, or lambda_max) is not used: the
      thesis rejects it (a parameter whose gradient vanishes gets an
      unbounded preconditioner), and measured on a vanishing empirical
      Fisher it diverges even at lr 1e-4.
    * **Step clip** (not in the thesis; issue 18).  Where the Fisher is far
      below ``eps`` (an empirical Fisher near a minimum of a square loss)
      the damped inverse multiplies the step by up to ``eps^-k`` (1e4 for a
      matrix at the default ``eps``), which the thesis' small ``lr`` (1e-4)
      absorbs and a first-order ``lr`` (1e-2) turns into divergence.  Each
      preconditioned direction ``p`` of a tensor ``W`` is therefore scaled
      so that ``lr ||p|| <= max(max_step_ratio ||W||, lr ||grad^||)``: a
      step moves a tensor by at most ``max_step_ratio`` of its norm, or by
      the plain momentum step where that is longer (a zero-initialised
      bias).  Measured: at the thesis' lr (1e-4) it does not bind on the
      square-loss test (bit-identical to the unclipped run); where the
      loss falls to ~1e-5 within 30 steps it binds late and slows that
      tail (1.5e-4 instead of 2.3e-5); ``max_step_ratio=0`` turns it off.
    * **Non-finite values** never enter the parameters or the state: a step
      whose gradient, momentum or direction has a NaN / Inf entry leaves
      parameters, momentum and statistics unchanged (decided on the device
      with ``torch.where``; counted under ``'nonfinite_step'`` and
      ``'nonfinite_statistics'``); a failed inverse keeps the previous one;
      non-finite state in a checkpoint is dropped when it is loaded.  The
      step counter still advances on a skipped step (no host read).
    * Sampled labels are drawn with TNT's own seeded generators
      (:meth:`label_generator`), so resuming from a checkpoint is exact.

    Args:
        params (Iterable): Parameters or groups.
        model (nn.Module): The model; needed for the sampled-label hook.
        lr (float): ``alpha``.  Thesis' best for CIFAR ResNet-32: 1e-4 with
            ``weight_decay=10`` and ``damping=0.01``.
        momentum (float): ``mu``. Defaults to 0.9.
        stat_decay (float): ``beta``. Defaults to 0.9.
        damping (float): ``eps``. Defaults to 0.01.
        weight_decay (float): ``gamma``, added after preconditioning.
        stat_interval (int): ``T1``. Defaults to 10.
        refresh_interval (int): ``T2``. Defaults to 100.
        warm_start_iters (int): Statistics-only iterations before training.
        max_factor_dim (int): Widest mode that gets a factor.
        fisher (str): ``'sampled'`` (TNT) or ``'empirical'`` (TNT-EF: the
            minibatch gradient itself is ``G-bar``).
        logits_module (str): Name of the submodule whose output is the
            ``(batch, classes)`` logits (``'head'`` for mmpretrain
            classifiers, e.g. ``'fc'`` for a torchvision ResNet).
        max_step_ratio (float): Step clip: a preconditioned step changes a
            tensor by at most this fraction of its norm (or by the plain
            momentum step, if longer).  Defaults to 0.1; 0 disables it.

    Attributes:
        fallbacks (FallbackLog): Counted fallbacks (failed inverses,
            skipped non-finite steps and statistics, dropped state).
        phase_seconds (Counter): Host time in ``'statistics'``,
            ``'refresh'`` and ``'precondition'`` (incl. the base update).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> opt = TNT(model.parameters(), model=model, lr=0.01,
        ...           logits_module='2', stat_interval=1, refresh_interval=1)
        >>> F.cross_entropy(model(torch.randn(5, 4)),
        ...                 torch.tensor([0, 1, 2, 0, 1])).backward()
        >>> opt.step()
    """

    requires_model = True
    fisher_default = 'sampled'

    def __init__(self,
                 params: Iterable,
                 model: Optional[nn.Module] = None,
                 lr: float = 1e-4,
                 momentum: float = 0.9,
                 stat_decay: float = 0.9,
                 damping: float = 0.01,
                 weight_decay: float = 0.0,
                 stat_interval: int = 10,
                 refresh_interval: int = 100,
                 warm_start_iters: int = 0,
                 max_factor_dim: int = 4096,
                 fisher: Optional[str] = None,
                 logits_module: str = 'head',
                 max_step_ratio: float = 0.1) -> None:
        check_positive('lr', lr)
        check_positive('max_step_ratio', max_step_ratio, allow_zero=True)
        check_unit_interval('momentum', momentum)
        check_unit_interval('stat_decay', stat_decay)
        check_positive('damping', damping)
        check_positive('weight_decay', weight_decay, allow_zero=True)
        for name, v in (('stat_interval', stat_interval),
                        ('refresh_interval', refresh_interval),
                        ('max_factor_dim', max_factor_dim)):
            if int(v) < 1:
                raise ValueError(f'Invalid {name}: {v} (>= 1)')
        check_refresh_interval(type(self).__name__, 'refresh_interval',
                               int(refresh_interval), int(stat_interval))
        if int(warm_start_iters) < 0:
            raise ValueError(f'Invalid warm_start_iters: {warm_start_iters}')
        fisher = fisher or self.fisher_default
        if fisher not in ('sampled', 'empirical'):
            raise ValueError(f"Invalid fisher: {fisher!r} ('sampled' or "
                             "'empirical')")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.stat_decay = float(stat_decay)
        self.damping = float(damping)
        self.stat_interval = int(stat_interval)
        self.refresh_interval = int(refresh_interval)
        self.warm_start_iters = int(warm_start_iters)
        self.max_factor_dim = int(max_factor_dim)
        self.fisher = fisher
        self.logits_module = logits_module
        self.max_step_ratio = float(max_step_ratio)
        self.fallbacks = FallbackLog(type(self).__name__)
        self.phase_seconds: Counter = Counter()
        self.steps = 0
        self.fisher_params: List[Tensor] = [
            p for g in self.param_groups for p in g['params'] if p.requires_grad
        ]
        self.sampled_grads: Dict[Tensor, Tensor] = {}
        self._handle = None
        #: Seed of the sampled-label draws (see :meth:`label_generator`).
        self.label_seed = int(torch.randint(2**62, (1, )))  # a CPU draw
        self._draws = 0
        if fisher == 'sampled':
            if model is None:
                raise TypeError(
                    'TNT draws sampled labels from the model output and needs '
                    '`model` (the mmprecond constructor passes it: '
                    "constructor='PrecondOptimWrapperConstructor'); or use "
                    'TNT_EF, which needs no model.')
            try:
                head = model.get_submodule(logits_module)
            except AttributeError as err:
                raise ValueError(
                    f"logits_module='{logits_module}' is not a submodule of "
                    f'{type(model).__name__}') from err
            self._handle = head.register_forward_hook(_SampledGradHook(self))
        self.sampling_active = self._is_stat_step(0)

    # -------------------------------------------------------------- schedule
    def _k(self, t: int) -> int:
        return t - self.warm_start_iters

    def _is_stat_step(self, t: int) -> bool:
        k = self._k(t)
        return k < 0 or k % self.stat_interval == 0

    def _is_refresh_step(self, t: int) -> bool:
        k = self._k(t)
        return k >= 0 and k % self.refresh_interval == 0

    def factored_modes(self, p: Tensor) -> Tuple[Tuple[int, ...], List[int]]:
        """``(dims, factored mode indices)`` of a parameter."""
        dims = tensor_modes(tuple(p.shape))
        modes = [i for i, d in enumerate(dims) if 1 < d <= self.max_factor_dim]
        return dims, modes

    # ------------------------------------------------------------------ step
    def _fisher_grads(self) -> Dict[Tensor, Tensor]:
        if self.fisher == 'empirical':
            out = {p: p.grad for p in self.fisher_params if p.grad is not None}
        else:
            out, self.sampled_grads = self.sampled_grads, {}
        if world_size() > 1 and self.fisher == 'sampled':
            tensors = [out.get(p, torch.zeros_like(p)) for p in self.fisher_params]
            all_reduce_sum_(tensors)
            world = world_size()
            out = {p: t / world for p, t in zip(self.fisher_params, tensors)}
        return out

    def _gradients_finite(self) -> Optional[Tensor]:
        """Device flag: every parameter gradient is finite (``None``: none).

        A step whose gradient is not is dropped whole, statistics included,
        as an AMP overflow step is; nothing is read on the host.
        """
        grads = [p.grad for p in self.fisher_params if p.grad is not None]
        if not grads:
            return None
        return finite_flags(grads).all()

    def _fold(self, grads: Dict[Tensor, Tensor], warm: bool,
              grads_ok: Optional[Tensor] = None) -> None:
        beta = self.stat_decay
        flags: List[Tensor] = []
        labels: List[str] = []
        for p, g in grads.items():
            dims, modes = self.factored_modes(p)
            if not modes:
                continue
            st = self.state[p]
            g = g.detach().reshape(dims).float()
            new = {i: mode_gram(g, i) for i in modes}
            sq = g.pow(2).sum()
            finite = torch.isfinite(sq)
            keep = finite if grads_ok is None else finite & grads_ok.to(sq.device)
            count = int(st.get('stat_count', 0))
            if count == 0:
                w = 1.0
            elif warm:
                w = 1.0 / (count + 1)  # running mean over the warm start
            else:
                w = 1.0 - beta
            for i, gram in new.items():
                key = f'G{i}'
                old = st.get(key, torch.zeros_like(gram))
                st[key] = torch.where(keep, old + w * (gram - old), old)
            old_sq = st.get('sq_norm', torch.zeros_like(sq))
            st['sq_norm'] = torch.where(keep, old_sq + w * (sq - old_sq), old_sq)
            st['stat_count'] = count + 1
            flags.append(finite.logical_not())
            labels.append(self._label(p))
        if flags:
            self.fallbacks.record_flags(
                'nonfinite_statistics', torch.stack(flags), labels,
                'non-finite gradient statistics were not folded')

    def _label(self, p: Tensor) -> str:
        """``param<i>``: the parameter's index in :attr:`fisher_params`."""
        names = getattr(self, '_labels', None)
        if names is None:
            names = self._labels = {
                id(q): f'param{i}' for i, q in enumerate(self.fisher_params)}
        return names.get(id(p), 'param?')

    def _refresh(self) -> None:
        for p in self.fisher_params:
            st = self.state.get(p)
            if not st or 'sq_norm' not in st:
                continue
            dims, modes = self.factored_modes(p)
            grams = {i: st[f'G{i}'] for i in modes}
            factors = trace_equalized(grams, st['sq_norm'], dims)
            for i, u in factors.items():
                a = u.double() + self.damping * torch.eye(
                    u.shape[0], dtype=torch.float64, device=u.device)
                chol, info = torch.linalg.cholesky_ex(a)
                if int(info) != 0 or not bool(torch.isfinite(a).all()):
                    self.fallbacks.record(
                        'inverse_failed', 'a TNT factor is not positive '
                        'definite or not finite; its previous inverse is kept')
                    continue
                st[f'Q{i}'] = torch.cholesky_inverse(chol).float()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One TNT step (statistics only during the warm start)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        t = self.steps
        warm = self._k(t) < 0
        clock = time.perf_counter()
        grads_ok = self._gradients_finite()
        if self._is_stat_step(t):
            self._fold(self._fisher_grads(), warm, grads_ok)
        self.sampled_grads = {}
        now = time.perf_counter()
        self.phase_seconds['statistics'] += now - clock
        if (warm and self._k(t + 1) == 0) or (not warm
                                              and self._is_refresh_step(t)):
            self._refresh()
        clock = time.perf_counter()
        self.phase_seconds['refresh'] += clock - now
        if not warm:
            self._update(grads_ok)
            self.phase_seconds['precondition'] += time.perf_counter() - clock
        self.steps = t + 1
        self._draws = 0
        self.sampling_active = self._is_stat_step(self.steps)
        return loss

    def _update(self, grads_ok: Optional[Tensor] = None) -> None:
        """Momentum, preconditioning, the update clip and the base step.

        Decided on the device, with no value read: a step whose momentum or
        direction is not finite (a NaN / Inf gradient, an overflowing
        product) leaves every parameter and momentum buffer as it was and
        is counted under ``'nonfinite_step'``; otherwise the preconditioned
        directions are clipped (``max_step_ratio``, see the class
        docstring).
        """
        work = []
        for group in self.param_groups:
            params, bufs, grads = [], [], []
            for p in group['params']:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError('TNT does not support sparse gradients')
                st = self.state[p]
                if 'momentum_buffer' not in st:
                    st['momentum_buffer'] = torch.zeros_like(p)
                params.append(p)
                bufs.append(st['momentum_buffer'])
                grads.append(p.grad)
            if params:
                work.append((group, params, bufs, grads))
        if not work:
            return
        prepared, norms = [], []
        for group, params, bufs, grads in work:
            new = list(torch._foreach_mul(bufs, group['momentum']))
            torch._foreach_add_(new, grads)
            dirs, done = self._precondition_all(params, new)
            picked = [dirs[n] for n in done]
            buf_norms = torch._foreach_norm(new)
            dir_norms = torch._foreach_norm(picked) if picked else []
            norms += list(buf_norms) + list(dir_norms)
            if picked and self.max_step_ratio > 0:
                lr = group['lr']
                w_norms = torch._foreach_norm([params[n] for n in done])
                for j, n in enumerate(done):
                    bound = torch.maximum(
                        w_norms[j] * (self.max_step_ratio / lr), buf_norms[n])
                    scale = (bound / dir_norms[j].clamp_min(1e-30)).clamp(max=1.0)
                    dirs[n] = dirs[n] * scale.to(dirs[n].dtype)
            prepared.append((group, params, bufs, new, dirs))
        dev = norms[0].device
        ok = torch.isfinite(torch.stack([n.to(dev) for n in norms])).all()
        if grads_ok is not None:
            ok = ok & grads_ok.to(dev)
        self.fallbacks.record_flags(
            'nonfinite_step', ok.logical_not().reshape(1), ['step'],
            'non-finite momentum or preconditioned direction: the step was '
            'skipped (parameters and momentum unchanged)')
        for group, params, bufs, new, dirs in prepared:
            lr, wd = group['lr'], group['weight_decay']
            for buf, b in zip(bufs, new):
                buf.copy_(torch.where(ok, b, buf))
            moved = (torch._foreach_mul(params, 1.0 - lr * wd) if wd != 0 else
                     [p.clone() for p in params])
            torch._foreach_add_(moved, dirs, alpha=-lr)
            for p, q in zip(params, moved):
                p.copy_(torch.where(ok, q, p))

    def _precondition_all(self, params: List[Tensor], bufs: List[Tensor]
                          ) -> Tuple[List[Tensor], List[int]]:
        """``buf x_1 Q_1 ... x_k Q_k`` for every parameter; tensors of the
        same shape and factored modes are stacked into batched matmuls.

        Returns the directions (``bufs[n]`` itself where no inverse exists)
        and the indices ``n`` that were preconditioned.
        """
        dirs: List[Tensor] = list(bufs)
        batches: Dict[tuple, List[int]] = {}
        for n, p in enumerate(params):
            st = self.state[p]
            dims, modes = self.factored_modes(p)
            have = tuple(i for i in modes if f'Q{i}' in st)
            if have:
                batches.setdefault((dims, have, p.dtype, p.device), []).append(n)
        for (dims, have, dtype, _), idx in batches.items():
            out = torch.stack([bufs[n].reshape(dims) for n in idx]).float()
            for i in have:
                q = torch.stack([self.state[params[n]][f'Q{i}'] for n in idx])
                moved = out.movedim(i + 1, 1)
                shape = moved.shape
                prod = torch.bmm(q, moved.reshape(shape[0], shape[1], -1))
                out = prod.reshape(shape).movedim(1, i + 1)
            for j, n in enumerate(idx):
                dirs[n] = out[j].reshape(params[n].shape).to(dtype)
        return dirs, sorted(n for idx in batches.values() for n in idx)

    def draw_seed(self, step: int, draw: int) -> int:
        """Seed of the ``draw``-th label draw (forward) of step ``step``."""
        return (self.label_seed * 1_000_003 + step * 1_009 + draw) % 2**63

    def label_generator(self, device: torch.device) -> torch.Generator:
        """A generator for the next sampled-label draw, on ``device``.

        TNT draws its labels with generators of its own, seeded from
        :attr:`label_seed` (taken from torch's global generator when TNT is
        built, so ``torch.manual_seed`` still makes a run repeatable), the
        step and the draw's index within the step.  The draws are therefore
        a function of the checkpointed state: a resumed run draws what the
        uninterrupted one draws, and a step the AMP scaler skips changes
        nothing.  Seeding is a host-side call (no device read).
        """
        gen = torch.Generator(device=device)
        gen.manual_seed(self.draw_seed(self.steps, self._draws))
        self._draws += 1
        return gen

    # ----------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """torch state (momentum, factors, inverses), the step counter and
        the seed of the sampled-label draws."""
        sd = super().state_dict()
        sd['tnt_steps'] = self.steps
        sd['tnt_label_seed'] = self.label_seed
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        steps = state_dict.pop('tnt_steps', None)
        seed = state_dict.pop('tnt_label_seed', None)
        if seed is not None:
            self.label_seed = int(seed)
        super().load_state_dict(state_dict)
        if steps is None:
            self.fallbacks.record('missing_tnt_steps', 'checkpoint without the '
                                  'TNT step counter; counting from 0')
            steps = 0
        self.steps = int(steps)
        self._draws = 0
        self.sampled_grads = {}
        self.sampling_active = self._is_stat_step(self.steps)
        self._reset_nonfinite_state()

    def _reset_nonfinite_state(self) -> None:
        """Drop the state of a parameter if any of it is NaN / Inf.

        A checkpoint is the only way non-finite values reach the state (every
        step keeps them out), so this runs when one is loaded, with one read
        of a flag vector.  The parameter restarts as one seen for the first
        time (no statistics, inverses or momentum); counted under
        ``'nonfinite_state_reset'``.
        """
        checks = [(p, torch.isfinite(v).all()) for p, st in self.state.items()
                  for v in st.values()
                  if isinstance(v, Tensor) and v.is_floating_point()]
        if not checks:
            return
        dev = checks[0][1].device
        good = torch.stack([c.to(dev) for _, c in checks]).tolist()  # one read
        bad = list(dict.fromkeys(p for (p, _), g in zip(checks, good) if not g))
        for p in bad:
            del self.state[p]
        if bad:
            self.fallbacks.record(
                'nonfinite_state_reset',
                f'non-finite state of {len(bad)} parameter(s) in the checkpoint '
                'was dropped; they restart their statistics and momentum',
                n=len(bad))

    def __del__(self) -> None:
        if getattr(self, '_handle', None) is not None:
            self._handle.remove()

    # ---------------------------------------------------- engine protocol
    def warm_start_remaining(self) -> int:
        return max(self.warm_start_iters - self.steps, 0)


@OPTIMIZERS.register_module()
class TNT_EF(TNT):  # noqa: N801 (the thesis' name)
    """TNT-EF: :class:`TNT` with the empirical Fisher.

    The statistics come from the minibatch gradient itself (``G-bar =
    grad``), so there is no sampled-label backward and no model is needed:
    the variant that works for any loss, detection losses included (thesis
    Section 4.7 compares it with KFAC-EF).

    Example:
        >>> model = nn.Linear(4, 3)
        >>> opt = TNT_EF(model.parameters(), lr=0.01)
    """

    requires_model = False
    fisher_default = 'empirical'


__all__ = ['TNT', 'TNT_EF', 'trace_equalized', 'tensor_modes']

# Copyright (c) mmprecond contributors. All rights reserved.
"""SMW-NG: subsampled natural gradient through Sherman-Morrison-Woodbury.

Yi Ren, "Efficient Second-Order Methods for Training Neural Networks", PhD
thesis, Columbia University, 2022, Chapter 5 (Algorithm 23, Sections
5.2.3 and 5.4); Ren and Goldfarb, "Efficient Subsampled Gauss-Newton and
Natural Gradient Methods for Training Neural Networks", arXiv:1906.02353.
"""
import math
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from mmengine.registry import OPTIMIZERS
from torch import Tensor

from ..curvature.capture import gradient_matrix
from ..distributed import all_reduce_ints, all_reduce_sum_, world_size
from .base import PrecondOptimizer, check_positive, check_unit_interval
from .bfgs_updates import _conv_geometry
from .kbfgs import SECOND_PASS_MSG

#: Elements of one ``(rows, N2 T)`` block of the conv Gram computation.
GRAM_CHUNK_ELEMENTS = 1 << 24


def per_sample_rows(module: nn.Module, x: Tensor) -> Tensor:
    """Input rows of each sample, ``(n, T, d_in)`` (bias column of ones).

    Conv2d: ``T`` output positions, each row the zero-padded patch in the
    column order of ``weight.view(C_out, -1)``.  Linear: every index
    between the first and the last is a position (tokens).
    """
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x, padding = _conv_geometry(module, x)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation,
                        padding=padding, stride=module.stride)
        rows = cols.transpose(1, 2)
    else:
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1, ))], -1)
    return rows


def per_sample_grads_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Output-gradient rows of each sample, ``(n, T, d_out)``."""
    if isinstance(module, nn.Conv2d):
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def sample_gram(a: Tensor, g: Tensor,
                chunk_elements: int = GRAM_CHUNK_ELEMENTS) -> Tensor:
    """``K_ij = grad f_i . grad f_j`` of one layer, per-sample grads unformed.

    With ``a`` ``(N, T, d_in)`` and ``g`` ``(N, T, d_out)`` the per-sample
    gradient is ``sum_t g_it a_it^T``, so ``K_ij = sum_{t,s} (a_it . a_js)
    (g_it . g_js)``; for ``T = 1`` this is ``(A A^T) o (G G^T)``.  Cost
    ``N^2 T^2 (d_in + d_out)``, computed in blocks of rows (sample x
    position) of about ``chunk_elements`` products each.
    """
    n, t = a.shape[0], a.shape[1]
    if t == 1:
        return (a[:, 0] @ a[:, 0].T) * (g[:, 0] @ g[:, 0].T)
    a_flat, g_flat = a.reshape(n * t, -1), g.reshape(n * t, -1)
    owner = torch.arange(n, device=a.device).repeat_interleave(t)
    gram = a.new_zeros(n, n)
    rows = max(1, chunk_elements // (n * t))
    for start in range(0, n * t, rows):
        end = min(start + rows, n * t)
        prod = (a_flat[start:end] @ a_flat.T) * (g_flat[start:end] @ g_flat.T)
        gram.index_add_(0, owner[start:end], prod.view(end - start, n, t).sum(2))
    return gram


def jacobian_vector(a: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """``(J v)_i = grad f_i . v`` of one layer for a ``d_out x d_in`` ``v``."""
    return ((a @ v.T) * g).sum((1, 2))


def jacobian_t_vector(a: Tensor, g: Tensor, z: Tensor) -> Tensor:
    """``J^T z = sum_i z_i grad f_i`` of one layer, ``d_out x d_in``."""
    gz = g * z.view(-1, 1, 1)
    return gz.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])


class _SampleRecord:
    """Inputs and output gradients of the first samples of one layer."""

    def __init__(self) -> None:
        self.inputs: List[Tensor] = []
        self.grads: List[Tensor] = []
        self.batch = 0


class _SampleHook:
    """Forward hook: keep ``x[:n2]``; tensor hook on the output: ``dz[:n2]``."""

    def __init__(self, owner: 'SMW_NG', name: str) -> None:
        self.owner_ref = weakref.ref(owner)
        self.name = name

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        owner = self.owner_ref()
        if owner is None or not owner.recording:
            return
        if owner.layers.get(self.name) is not module:
            return  # deep copy of the model (EMA)
        if not (module.training and torch.is_grad_enabled()):
            return
        if not inputs or not isinstance(inputs[0], Tensor) or \
                not isinstance(output, Tensor) or not output.requires_grad:
            return
        x = inputs[0]
        if x.numel() == 0:
            return
        if isinstance(module, nn.Conv2d) and x.dim() == 3:
            x, output_view = x.unsqueeze(0), True
        else:
            output_view = False
        n2 = owner.samples_of(x.shape[0])
        rec = owner.records.setdefault(self.name, _SampleRecord())
        rec.batch = x.shape[0]
        rec.inputs.append(per_sample_rows(module, x[:n2].detach()))

        def grad_hook(grad: Tensor) -> None:
            gg = grad.unsqueeze(0) if output_view else grad
            rec.grads.append(per_sample_grads_rows(module, gg[:n2].detach()))

        output.register_hook(grad_hook)


@OPTIMIZERS.register_module()
class SMW_NG(PrecondOptimizer):  # noqa: N801 (the thesis' name)
    r"""SMW-NG, subsampled natural gradient (Ren 2022, thesis Algorithm 23).

    The preconditioned layers (every Linear / Conv2d weight with its bias as
    the last input column) take the Levenberg-Marquardt natural-gradient
    direction over the empirical Fisher of a curvature subset ``S2`` of
    ``N2`` samples of the minibatch ``S1``, inverted exactly through the
    Sherman-Morrison-Woodbury identity::

        lambda_LM = 1, tau = 1e-3, lambda = lambda_LM + tau
        for t = 0, 1, ...:
            forward/backward on S1 -> g (mean gradient); per layer l the
              inputs a_i and output gradients dz_i of the samples i in S2
            J = (grad f_i)_{i in S2}  (N2 x n, never formed)
            K = J J^T,  K_ij = sum_l sum_{t,s} (a_it.a_js)(dz_it.dz_js)
            D = lambda I + K / N2                          (N2 x N2)
            d = (1/lambda) (g - (1/N2) J^T D^-1 J g)      # = G^-1 g
            theta <- base step with d (SGD: theta -= lr d, i.e. alpha p)
            second forward on S1 at the new theta -> f(theta + s)
            rho = (f(theta) - f(theta + s)) / (m(0) - m(s)),
              m(0) - m(s) = -(g.s + 1/2 s^T B s),  B = J^T J / N2,  s = -lr d
            lambda_LM *= boost if rho < eps; *= drop if rho > 1 - eps
            lambda = lambda_LM + tau

    How the pieces are computed (thesis Section 5.4):

    * ``grad f_i`` is ``N1`` times the captured output gradient (the loss is
      the mean over the ``N1`` samples of the process's batch), so the
      per-sample gradient of layer ``l`` is ``sum_t dz_it a_it^T``.  It is
      never formed: ``K`` is :func:`sample_gram` (for a conv, the per-sample
      sum over positions, ``O(N2^2 T^2 (d_in + d_out))``); ``(J g)_i`` is
      :func:`jacobian_vector`.
    * ``J^T z`` is computed directly from the captured rows,
      ``sum_i z_i dz_i^T a_i`` (:func:`jacobian_t_vector`): one GEMM of the
      size of the weight-gradient GEMM of the ``N2`` samples.  That is
      cheaper than the extra backward of ``sum_i z_i f_i`` the thesis uses
      (no second forward, no graph kept), and exact.
    * ``D`` is solved in fp64 (Cholesky, ``N2 x N2``).  A non-finite
      direction falls back to the raw gradient (base class).
    * The rho-test needs ``f(theta + s)`` on the same ``S1``: the second
      forward of K-BFGS's machinery, here without a backward.  In MMEngine
      add ``custom_hooks = [dict(type='SecondPassHook')]``; in plain PyTorch
      call ``optimizer.second_pass(closure, first_loss=loss)`` after
      ``step()`` whenever ``needs_second_pass`` is set.  The model reduction
      uses the step the layers actually take, ``s = -lr d`` (the thesis'
      ``p`` with ``alpha``); momentum or weight decay, when set, are not in
      the model.  ``lambda_LM`` stays a device tensor and is updated with
      ``torch.where``: neither ``step()`` nor ``second_pass()`` reads a
      device value.  ``lm_interval=k`` runs the test every ``k``-th step
      only (``0``: fixed ``lambda``, no second pass).  Under DDP the two
      losses are averaged over the ranks first, so ``lambda`` stays equal
      everywhere.
    * Parameters outside the preconditioned layers (norms, ...) take the
      base step (SGD with ``momentum``) with their raw gradient.
    * Under DDP every process keeps its first ``curvature_samples`` samples;
      their rows are gathered (an all-reduce of zero-padded slots), so
      ``N2 = world x curvature_samples`` and every rank computes the same
      direction; equal per-rank batch shapes are assumed.

    Thesis settings: initial ``lambda_LM = 1``, ``boost = 1.01``,
    ``drop = 0.99``, ``eps = 1/4``, ``tau = 1e-3``; MLPs with ``N1 = 60,
    N2 = 30, lr = 0.1`` (MNIST) and ``N1 = 100, N2 = 50, lr = 0.01``
    (CIFAR-10).

    Args:
        params (Iterable): Parameters or groups.
        model (nn.Module): The model whose Linear/Conv2d layers are hooked.
        lr (float): ``alpha``. Defaults to 0.1.
        curvature_samples (int, optional): ``N2`` per process: the first
            samples of each batch form ``S2``. ``None``: the whole batch.
            Defaults to 30 (thesis, MNIST).
        damping (float): Initial ``lambda_LM``. Defaults to 1.
        tau (float): ``tau``. Defaults to 1e-3.
        boost (float): Defaults to 1.01.
        drop (float): Defaults to 0.99.
        eps (float): ``epsilon`` of the rho-test, in ``(0, 1/2)``.
            Defaults to 0.25.
        lm_interval (int): rho-test every this many steps; 0 disables it.
            Defaults to 1 (thesis).
        momentum (float): Base SGD momentum. Defaults to 0 (thesis).
        weight_decay (float): Base SGD (coupled) weight decay.
        max_factor_dim (int): Unused limit kept for the common API (no
            Kronecker factors here); see :class:`PrecondOptimizer`.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = SMW_NG(model.parameters(), model=model, curvature_samples=4)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8, ))
        >>> closure = lambda: F.cross_entropy(model(x), y)
        >>> loss = closure(); loss.backward(); opt.step(); opt.zero_grad()
        >>> opt.second_pass(closure, first_loss=loss.detach())
        >>> float(opt.lm_lambda) in (1.0 * 1.01, 1.0, 1.0 * 0.99)
        True
    """

    def __init__(self,
                 params: Iterable,
                 model: Optional[nn.Module] = None,
                 lr: float = 0.1,
                 curvature_samples: Optional[int] = 30,
                 damping: float = 1.0,
                 tau: float = 1e-3,
                 boost: float = 1.01,
                 drop: float = 0.99,
                 eps: float = 0.25,
                 lm_interval: int = 1,
                 momentum: float = 0.0,
                 weight_decay: float = 0.0,
                 max_factor_dim: int = 1 << 30) -> None:
        check_positive('lr', lr)
        check_positive('damping', damping)
        check_positive('tau', tau, allow_zero=True)
        check_unit_interval('momentum', momentum)
        check_positive('weight_decay', weight_decay, allow_zero=True)
        if curvature_samples is not None and int(curvature_samples) < 1:
            raise ValueError(f'Invalid curvature_samples: {curvature_samples} '
                             '(>= 1, or None for the whole batch)')
        if not boost >= 1.0 or not 0.0 < drop <= 1.0:
            raise ValueError(f'Invalid boost / drop: {boost} / {drop} (need '
                             'boost >= 1 and 0 < drop <= 1)')
        if not 0.0 < eps < 0.5:
            raise ValueError(f'Invalid eps: {eps} (must be in (0, 1/2))')
        if int(lm_interval) < 0:
            raise ValueError(f'Invalid lm_interval: {lm_interval} (>= 0)')
        self.curvature_samples = (None if curvature_samples is None else
                                  int(curvature_samples))
        self.tau, self.boost, self.drop, self.eps = (float(tau), float(boost),
                                                     float(drop), float(eps))
        self.lm_interval = int(lm_interval)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        nesterov=False)
        super().__init__(params, defaults, model, 'sgdm', 1, max_factor_dim)
        dev = next(iter(self.layers.values())).weight.device \
            if self.layers else torch.device('cpu')
        #: ``lambda_LM`` (0-dim device tensor; ``lambda = lambda_LM + tau``).
        self.lm_lambda = torch.tensor(float(damping), dtype=torch.float64,
                                      device=dev)
        self.records: Dict[str, _SampleRecord] = {}
        self.recording = True
        self.needs_second_pass = False
        self._first_loss: Optional[Tensor] = None
        #: rho of the latest test (device tensor), for logging.
        self.last_rho: Optional[Tensor] = None
        self._model: Dict[str, Tensor] = {}
        self._directions: Dict[str, Tensor] = {}
        self._handles = [
            m.register_forward_hook(_SampleHook(self, n))
            for n, m in self.layers.items()
        ]

    # ------------------------------------------------------------- schedule
    def capture_sides(self, module: nn.Module) -> Tuple[bool, bool]:
        """No Kronecker statistics: the sample hooks collect the rows."""
        return False, False

    def factor_bytes(self, module: nn.Module) -> int:
        """No per-layer factors are kept between steps."""
        return 0

    def is_stat_step(self, step: int) -> bool:
        """The Kronecker capture of the base class is never used."""
        return False

    def is_curvature_step(self, step: int) -> bool:
        """Whether (0-based) ``step`` is followed by the rho-test pass."""
        k = self.lm_interval
        return k > 0 and (step + 1) % k == 0

    def samples_of(self, batch: int) -> int:
        """``N2`` of this process for a batch of ``batch`` samples."""
        n2 = self.curvature_samples
        return batch if n2 is None else min(batch, n2)

    def update_statistics(self, stats: Dict[str, Any], step: int) -> None:
        """Unused (no running statistics)."""

    # ----------------------------------------------------------------- step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; rows of a step that was not taken are dropped."""
        if any(r.grads for r in self.records.values()):
            self.records = {}
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One SMW-NG step; see the class docstring."""
        if self.needs_second_pass:
            raise RuntimeError(SECOND_PASS_MSG.format(name=type(self).__name__)
                               .replace('`curvature_interval`', '`lm_interval`')
                               .replace('optimizer.second_pass(closure)',
                                        'optimizer.second_pass(closure, '
                                        'first_loss=loss)'))
        t = self.steps
        loss = super().step(closure)
        self.records = {}
        if self.steps == t + 1 and self.is_curvature_step(t) and self._model:
            self.needs_second_pass = True
            self._first_loss = None if loss is None else \
                torch.as_tensor(loss).detach()
        else:
            self._model = {}
        return loss

    def _gathered_rows(self) -> Dict[str, Tuple[Tensor, Tensor, int]]:
        """``(a, dz * N1, N1)`` per layer, gathered over ranks, unscaled."""
        scale = self._loss_scale()
        out = {}
        world = world_size()
        rank = dist.get_rank() if world > 1 else 0
        names = list(self.layers)
        local: List[Optional[Tuple[Tensor, Tensor]]] = []
        for name in names:
            rec = self.records.get(name)
            if rec is None or not rec.grads or \
                    len(rec.grads) != len(rec.inputs):
                local.append(None)
                continue
            a = torch.cat(rec.inputs, 1)
            g = torch.cat(rec.grads[::-1], 1)  # backward runs calls in reverse
            dtype = torch.promote_types(a.dtype, torch.float32)
            local.append((a.to(dtype), g.to(dtype) * (rec.batch / scale)))
        if world > 1:
            shapes = [(0, 0, 0, 0) if r is None else
                      (r[0].shape[0], r[0].shape[1], r[0].shape[2],
                       r[1].shape[2]) for r in local]
            # every rank must issue the same reduction: a layer missing on
            # one rank is absent from the direction everywhere
            have = all_reduce_ints([int(s[0] > 0) for s in shapes])
            tensors = []
            for i, r in enumerate(local):
                if have[i] != world:
                    local[i] = None
                    continue
                a, g = r
                slot_a = a.new_zeros((world, ) + tuple(a.shape))
                slot_g = g.new_zeros((world, ) + tuple(g.shape))
                slot_a[rank], slot_g[rank] = a, g
                tensors += [slot_a, slot_g]
                local[i] = (slot_a, slot_g)
            all_reduce_sum_(tensors)
            local = [None if r is None else
                     (r[0].flatten(0, 1), r[1].flatten(0, 1)) for r in local]
        for name, r in zip(names, local):
            if r is not None:
                out[name] = r
        return out

    def update_preconditioners(self, step: int) -> None:
        """``d = (1/lambda)(g - (1/N2) J^T D^-1 J g)`` for every layer."""
        self._directions = {}
        self._model = {}
        rows = self._gathered_rows()
        grads = {n: gradient_matrix(self.layers[n]) for n in rows}
        rows = {n: r for n, r in rows.items() if grads[n] is not None}
        if not rows:
            return
        first = next(iter(rows.values()))[0]
        n2 = first.shape[0]
        lam = self.lm_lambda + self.tau
        gram = sum(sample_gram(a, g).double() for a, g in rows.values())
        jg = sum(jacobian_vector(a, g, grads[n].to(a.dtype)).double()
                 for n, (a, g) in rows.items())
        eye = torch.eye(n2, dtype=torch.float64, device=first.device)
        system = lam * eye + gram / n2
        chol, _ = torch.linalg.cholesky_ex(system)
        z = torch.cholesky_solve(jg.unsqueeze(1), chol)[:, 0]
        lam_f = lam.to(first.dtype)
        jd = torch.zeros(n2, dtype=torch.float64, device=first.device)
        gd = []
        for name, (a, g) in rows.items():
            gmat = grads[name].to(a.dtype)
            d = (gmat - jacobian_t_vector(a, g, z.to(a.dtype)) / n2) / lam_f
            group_lr = self._lr_of(name)
            jd = jd + group_lr * jacobian_vector(a, g, d).double()
            gd.append(group_lr * (gmat * d).sum().double())
            self._directions[name] = d.to(grads[name].dtype)
        if self.is_curvature_step(step):
            # m(0) - m(s) for s = -lr d:  lr g.d - 1/2 |J (lr d)|^2 / N2
            self._model = dict(predicted=torch.stack(gd).sum()
                               - 0.5 * (jd @ jd) / n2)

    def _lr_of(self, name: str) -> float:
        weight = self.layers[name].weight
        for group in self.param_groups:
            if any(p is weight for p in group['params']):
                return group['lr']
        raise KeyError(name)

    def precondition(self, name: str, module: nn.Module,
                     grad: Tensor) -> Optional[Tensor]:
        """The direction :meth:`update_preconditioners` computed."""
        return self._directions.pop(name, None)

    # ---------------------------------------------------------- rho-test
    def lm_update(self, rho: Tensor) -> None:
        """The thesis' LM rule for ``lambda_LM`` (Section 5.2.3), on device."""
        lm = self.lm_lambda
        rho = rho.to(lm)
        self.lm_lambda = torch.where(
            rho < self.eps, lm * self.boost,
            torch.where(rho > 1.0 - self.eps, lm * self.drop, lm))

    def second_pass(self, closure: Callable[[], Tensor],
                    first_loss: Optional[Tensor] = None) -> None:
        """Loss at the new parameters on the same batch; the LM rho-test.

        Args:
            closure (Callable): Runs the forward on the step's batch (same
                random sampling) and returns the loss; no backward is run
                (the closure runs under ``torch.no_grad``).
            first_loss (Tensor, optional): ``f(theta)`` on that batch, i.e.
                the loss of the first pass; defaults to the loss the
                ``closure`` given to :meth:`step` returned.
        """
        if not self.needs_second_pass:
            raise RuntimeError('second_pass() called without a pending '
                               'rho-test (see `needs_second_pass`)')
        self.needs_second_pass = False
        model, self._model = self._model, {}
        f0 = first_loss if first_loss is not None else self._first_loss
        if f0 is None:
            raise RuntimeError(
                'SMW_NG.second_pass needs f(theta), the loss of the first '
                'pass: pass first_loss=loss (MMEngine: SecondPassHook does).')
        self.recording = False
        try:
            with torch.no_grad():
                f1 = closure()
        finally:
            self.recording = True
        pred = model['predicted']
        losses = torch.stack([torch.as_tensor(f).detach().to(pred).reshape(())
                              for f in (f0, f1)])
        if world_size() > 1:  # each rank's losses are of its own batch
            all_reduce_sum_([losses])
            losses = losses / world_size()
        actual = losses[0] - losses[1]
        # a non-positive or non-finite prediction counts as a failed test
        rho = torch.where((pred > 0) & torch.isfinite(actual),
                          actual / pred.clamp_min(1e-300),
                          torch.full_like(pred, -math.inf))
        self.last_rho = rho
        self.lm_update(rho)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Base state plus ``lambda_LM``."""
        sd = super().state_dict()
        sd['preconditioner']['lm_lambda'] = self.lm_lambda.detach().clone()
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load :meth:`state_dict`; a pending rho-test is dropped."""
        lm = (state_dict.get('preconditioner') or {}).get('lm_lambda')
        super().load_state_dict(state_dict)
        if lm is not None:
            self.lm_lambda = lm.to(self.lm_lambda.device, torch.float64)
        self.needs_second_pass = False
        self._model = {}
        self.records = {}

    def __del__(self) -> None:  # hooks must not outlive the optimizer
        for h in getattr(self, '_handles', []):
            h.remove()


__all__ = ['SMW_NG']

# Copyright (c) mmprecond contributors. All rights reserved.
"""SMW-NG: subsampled natural gradient through Sherman-Morrison-Woodbury.

Yi Ren, "Efficient Second-Order Methods for Training Neural Networks", PhD
thesis, Columbia University, 2022, Chapter 5 (Algorithm 23, Sections
5.2.3 and 5.4); Ren and Goldfarb, "Efficient Subsampled Gauss-Newton and
Natural Gradient Methods for Training Neural Networks", arXiv:1906.02353.
"""
import math
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

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
    """``K_uv = grad f_u . grad f_v`` of one layer, per-sample grads unformed.

    With ``a`` ``(N, T, d_in)`` and ``g`` ``(N m, T, d_out)`` (``m`` output
    rows per sample, ``u = (i, c)`` sample-major; ``m = 1`` for SMW-NG) the
    gradient of ``u`` is ``sum_t g_ut a_it^T``, so ``K_uv = sum_{t,s} (a_it .
    a_js)(g_ut . g_vs)``; for ``T = 1`` this is ``(A A^T kron 1 1^T) o (G
    G^T)``.  The input products are formed once per sample pair, not per
    output row, and contracted with one side's ``m`` rows first: cost
    ``N^2 T^2 (d_in + m d_out)`` (``m = 1``: blocks of rows of about
    ``chunk_elements`` products; ``m > 1``: blocks of whole samples).
    """
    n, t = a.shape[0], a.shape[1]
    nv = g.shape[0]
    m = nv // n
    if t == 1:
        aa = a[:, 0] @ a[:, 0].T
        if m > 1:
            aa = aa.repeat_interleave(m, 0).repeat_interleave(m, 1)
        return aa * (g[:, 0] @ g[:, 0].T)
    a_flat, g_flat = a.reshape(n * t, -1), g.reshape(nv * t, -1)
    gram = a.new_zeros(nv, nv)
    if m > 1:
        # K_(ic),(jd) = sum_e (G_i[., ., e] AA_ij G_j[., ., e]^T)_cd: the
        # position pairs are contracted with the m rows of one side first,
        # N^2 T^2 (d_in + m d_out), without an (N m T)^2 intermediate
        gs = g.view(n, m, t, -1)
        samples = max(1, chunk_elements // (t * n * t))
        for i0 in range(0, n, samples):
            i1 = min(i0 + samples, n)
            aa = (a_flat[i0 * t:i1 * t] @ a_flat.T).view(i1 - i0, t, n, t)
            right = torch.einsum('itjs,jdse->itjde', aa, gs)
            gram[i0 * m:i1 * m] = torch.einsum(
                'icte,itjde->icjd', gs[i0:i1], right).reshape(-1, nv)
        return gram
    rows = max(1, chunk_elements // (n * t))
    owner = torch.arange(n, device=a.device).repeat_interleave(t)
    for start in range(0, n * t, rows):
        end = min(start + rows, n * t)
        prod = (a_flat[start:end] @ a_flat.T) * (g_flat[start:end] @ g_flat.T)
        gram.index_add_(0, owner[start:end], prod.view(end - start, n, t).sum(2))
    return gram


def jacobian_vector(a: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """``(J v)_u = grad f_u . v`` of one layer for a ``d_out x d_in`` ``v``."""
    av = a @ v.T
    m = g.shape[0] // a.shape[0]
    if m > 1:
        av = av.repeat_interleave(m, 0)
    return (av * g).sum((1, 2))


def jacobian_t_vector(a: Tensor, g: Tensor, z: Tensor) -> Tensor:
    """``J^T z = sum_u z_u grad f_u`` of one layer, ``d_out x d_in``."""
    n, d_out = a.shape[0], g.shape[-1]
    gz = g * z.view(-1, 1, 1)
    if gz.shape[0] != n:  # m rows per sample: sum them first
        gz = gz.view(n, -1, gz.shape[1], d_out).sum(1)
    return gz.reshape(-1, d_out).T @ a.reshape(-1, a.shape[-1])


class _SampleRecord:
    """Per-sample input and output-gradient rows of one layer, one step.

    ``inputs[c]`` is ``(N2, P_c, d_in)`` for the ``c``-th call of the layer
    in this forward, ``grads`` the matching output-gradient rows (filled by
    the backward, in reverse call order for SMW-NG); ``outputs`` keeps the
    calls' output tensors for SMW-GN's Jacobian passes.  ``mismatch`` marks
    a call whose rows do not form whole per-sample blocks.
    """

    def __init__(self) -> None:
        self.inputs: List[Tensor] = []
        self.grads: List[Tensor] = []
        self.outputs: List[Tuple[Tensor, int, bool]] = []
        self.mismatch = False


class _SampleHook:
    """Forward hook: keep the rows of the ``N2`` first samples of a layer.

    The step's batch ``N1`` is the batch dimension of the first hooked call
    of the forward.  A call whose batch dimension is ``k N1`` holds ``k``
    consecutive rows per sample (sample-major, as a flattened token batch);
    any other non-empty batch is a row subset whose samples are unknown
    (the layer is marked ``mismatch``); an empty one contributes nothing.
    """

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
            return  # no rows: the layer contributes zero for these samples
        output_view = isinstance(module, nn.Conv2d) and x.dim() == 3
        if output_view:
            x = x.unsqueeze(0)
        if owner.step_batch is None:
            owner.step_batch = x.shape[0]
        n1 = owner.step_batch
        rec = owner.records.setdefault(self.name, _SampleRecord())
        if x.shape[0] % n1:
            rec.mismatch = True
            return
        k = x.shape[0] // n1
        n2 = owner.samples_of(n1)
        rows = per_sample_rows(module, x[:n2 * k].detach())
        rec.inputs.append(rows.reshape(n2, -1, rows.shape[-1]))
        owner._capture_output(module, output, rec, n2, k, output_view)


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
    * Which rows belong to which sample: the step's batch ``N1`` is the
      batch dimension of the first hooked layer call of the forward.  A
      call whose batch dimension is ``k N1`` is taken as ``k`` consecutive
      rows per sample (sample-major: a flattened token batch, a conv's
      batch); its first ``k N2`` rows are the ``S2`` rows.  A layer that got
      no rows contributes zero.  A layer whose row count is not a multiple
      of ``N1`` (a row subset, e.g. after ``index_select``) cannot be placed
      at its samples: it is left out of the Gram and takes the base step
      with its raw gradient, counted under ``'smw_rows_not_per_sample'``
      (logged once).
    * Under DDP every process keeps its first ``curvature_samples`` samples;
      their rows are gathered (one device all-reduce of zero-padded slots,
      with a per-layer "not per-sample here" flag: a layer flagged on any
      rank is masked out of the Gram everywhere, on the device), so ``N2 =
      world x curvature_samples`` and every rank computes the same
      direction; equal per-rank batch shapes are assumed.  The slots' shapes
      are agreed once, at the first step, by a reduction of Python ints
      over the CPU group (:func:`all_reduce_ints`: host-blocking, no device
      read); later steps issue device collectives only.  A layer no rank
      had per-sample rows of at that step stays out for good
      (``'smw_layer_excluded'``); one whose layout later changes (another
      input size) is flagged as above.

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
        self._initial_damping = float(damping)
        self.records: Dict[str, _SampleRecord] = {}
        #: ``N1`` of the step being captured (first hooked call's batch).
        self.step_batch: Optional[int] = None
        #: Per-layer ``(rows, P)`` agreed over ranks (DDP only, first step).
        self._layouts: Optional[Dict[str, Optional[Tuple]]] = None
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
    def _capture_output(self, module: nn.Module, output: Tensor,
                        rec: _SampleRecord, n2: int, k: int,
                        output_view: bool) -> None:
        """Output-gradient rows of the first ``n2`` samples, from the backward."""

        def grad_hook(grad: Tensor) -> None:
            gg = grad.unsqueeze(0) if output_view else grad
            rows = per_sample_grads_rows(module, gg[:n2 * k].detach())
            rec.grads.append(rows.reshape(n2, -1, rows.shape[-1]))

        output.register_hook(grad_hook)

    def _clear_records(self) -> None:
        self.records = {}
        self.step_batch = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; rows of a step that was not taken are dropped."""
        if any(r.grads for r in self.records.values()):
            self._clear_records()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One SMW step; see the class docstring."""
        if self.needs_second_pass:
            raise RuntimeError(SECOND_PASS_MSG.format(name=type(self).__name__)
                               .replace('`curvature_interval`', '`lm_interval`')
                               .replace('optimizer.second_pass(closure)',
                                        'optimizer.second_pass(closure, '
                                        'first_loss=loss)'))
        t = self.steps
        loss = super().step(closure)
        self._clear_records()
        if self.steps == t + 1 and self.is_curvature_step(t) and self._model:
            self.needs_second_pass = True
            self._first_loss = None if loss is None else \
                torch.as_tensor(loss).detach()
        else:
            self._model = {}
        return loss

    def _row_dtype(self, name: str) -> torch.dtype:
        return torch.promote_types(self.layers[name].weight.dtype,
                                   torch.float32)

    def _local_rows(self, name: str) -> Union[None, str, Tuple[Tensor, Tensor]]:
        """This process's ``(a, grad f rows)`` of ``name``.

        ``None``: the layer got no rows (it contributes zero); ``'bad'``: its
        rows are not whole per-sample blocks (it is left out of the Gram).
        """
        rec = self.records.get(name)
        if rec is None or (not rec.inputs and not rec.mismatch):
            return None
        if rec.mismatch:
            return 'bad'
        if not rec.grads:
            return None  # the outputs did not reach the loss
        if len(rec.grads) != len(rec.inputs):
            return 'bad'
        dtype = self._row_dtype(name)
        a = torch.cat(rec.inputs, 1).to(dtype)
        g = torch.cat(rec.grads[::-1], 1).to(dtype)  # backward: reverse order
        # grad f_i = N1 dz_i (mean loss over the N1 samples), loss scale off
        return a, g * (self.step_batch / self._loss_scale())

    def _exclusion_message(self) -> str:
        return ('a layer got rows that are not whole per-sample blocks (a row '
                'subset of the batch, e.g. an index_select): it is left out '
                'of the SMW Gram and takes the base step with its raw '
                'gradient')

    def _handshake(self, local: Dict[str, Any]) -> Dict[str, Optional[Tuple]]:
        """Every layer's per-rank row layout ``(rows, P)``, agreed once.

        The only host-side collective (:func:`all_reduce_ints`, a CPU group:
        no device value is read); it runs at the first step of this
        optimizer object.  A layer that no rank captured whole per-sample
        rows of then, or whose layouts differ between ranks, stays out of
        the Gram for good (counted once, logged).
        """
        names = list(self.layers)
        ints = []
        for name in names:
            r = local[name]
            ok = isinstance(r, tuple)
            n, p = (r[0].shape[0], r[0].shape[1]) if ok else (0, 0)
            ints += [int(ok), n, n * n, p, p * p]
        red = all_reduce_ints(ints)
        out: Dict[str, Optional[Tuple]] = {}
        dropped = []
        for i, name in enumerate(names):
            ok, n, nn_, p, pp = red[5 * i:5 * i + 5]
            agree = ok > 0 and ok * nn_ == n * n and ok * pp == p * p
            out[name] = (n // ok, p // ok) if agree else None
            if not agree:
                dropped.append(name)
        if dropped:
            self.fallbacks.record(
                'smw_layer_excluded',
                f'{dropped[:5]}: no whole per-sample rows on any rank at the '
                'first step (or layouts that differ between ranks); left out '
                'of the SMW Gram for good, base step with the raw gradient',
                n=len(dropped))
        return out

    def _gathered_rows(self) -> Tuple[Dict[str, Tuple[Tensor, Tensor]],
                                      Optional[Dict[str, Tensor]]]:
        """Rows per layer, gathered over ranks; per-layer keep flags.

        One process: a layer with rows that are not per-sample blocks is
        dropped here (counted) and ``keep`` is ``None``.  Under DDP every
        rank sends, per layer of the agreed layout, a zero-padded slot of
        its rows (zeros where it has none or they are not per-sample) and a
        0/1 "not per-sample here" flag, all in one device all-reduce; a layer
        flagged on any rank is masked out of the Gram and takes the raw
        gradient, chosen on the device (``keep``), counted lazily.
        """
        names = list(self.layers)
        local = {name: self._local_rows(name) for name in names}
        world = world_size()
        if world == 1:
            out = {}
            for name, r in local.items():
                if isinstance(r, tuple):
                    out[name] = r
                elif r == 'bad':
                    self.fallbacks.record('smw_rows_not_per_sample',
                                          self._exclusion_message())
            return out, None
        if self._layouts is None:
            self._layouts = self._handshake(local)
        rank = dist.get_rank()
        slots, flags, kept = [], [], []
        for name in names:
            layout = self._layouts[name]
            if layout is None:
                continue
            n, p = layout
            module = self.layers[name]
            d_out = module.weight.shape[0]
            d_in = module.weight[0].numel() + (module.bias is not None)
            dev, dtype = module.weight.device, self._row_dtype(name)
            slot_a = torch.zeros(world, n, p, d_in, device=dev, dtype=dtype)
            r = local[name]
            mv = self._grad_rows_per_sample()
            slot_g = torch.zeros(world, n * mv, p, d_out, device=dev,
                                 dtype=dtype)
            fits = isinstance(r, tuple) and \
                tuple(r[0].shape) == (n, p, d_in) and \
                tuple(r[1].shape) == (n * mv, p, d_out)
            if fits:
                slot_a[rank], slot_g[rank] = r
            flags.append(float(r is not None and not fits))
            slots += [slot_a, slot_g]
            kept.append(name)
        if not kept:
            return {}, None
        flag = torch.tensor(flags, device=slots[0].device)
        all_reduce_sum_(slots + [flag])
        bad = flag > 0
        self.fallbacks.record_flags('smw_rows_not_per_sample', bad, kept,
                                    self._exclusion_message())
        keep = bad.logical_not().unbind()
        out = {name: (slots[2 * i].flatten(0, 1), slots[2 * i + 1].flatten(0, 1))
               for i, name in enumerate(kept)}
        return out, dict(zip(kept, keep))

    def _grad_rows_per_sample(self) -> int:
        """Output-gradient rows of one sample (SMW-GN: ``m_L``)."""
        return 1

    def update_preconditioners(self, step: int) -> None:
        """``d = (1/lambda)(g - (1/N2) J^T D^-1 J g)`` for every layer."""
        self._directions = {}
        self._model = {}
        rows, keep = self._gathered_rows()
        grads = {n: gradient_matrix(self.layers[n]) for n in rows}
        rows = {n: r for n, r in rows.items() if grads[n] is not None}
        if not rows:
            return
        first, first_g = next(iter(rows.values()))
        n2, n_rows = first.shape[0], first_g.shape[0]

        def masked(name: str, value: Tensor) -> Tensor:
            if keep is None:
                return value
            return torch.where(keep[name], value, torch.zeros_like(value))

        lam = self.lm_lambda + self.tau
        gram = sum(masked(n, sample_gram(a, g).double())
                   for n, (a, g) in rows.items())
        jg = sum(masked(n, jacobian_vector(a, g, grads[n].to(a.dtype)).double())
                 for n, (a, g) in rows.items())
        eye = torch.eye(n_rows, dtype=torch.float64, device=first.device)
        system = lam * eye + gram / n2
        chol, _ = torch.linalg.cholesky_ex(system)
        z = torch.cholesky_solve(jg.unsqueeze(1), chol)[:, 0]
        jd = torch.zeros(n_rows, dtype=torch.float64, device=first.device)
        gd = []
        for name, (a, g) in rows.items():
            gmat = grads[name].to(a.dtype)
            d = (gmat - jacobian_t_vector(a, g, z.to(a.dtype)) / n2) \
                / lam.to(a.dtype)
            if keep is not None:
                d = torch.where(keep[name], d, gmat)
            group_lr = self._lr_of(name)
            jd = jd + masked(name, group_lr * jacobian_vector(a, g, d).double())
            gd.append(masked(name, group_lr * (gmat * d).sum().double()))
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
            lm = lm.to(self.lm_lambda.device, torch.float64)
            if not bool(torch.isfinite(lm) & (lm > 0)):  # one read, at load
                self.fallbacks.record(
                    'nonfinite_state_reset',
                    f'lambda_LM in the checkpoint is {lm.tolist()}; it '
                    f'restarts from damping={self._initial_damping}')
                lm = torch.full_like(lm, self._initial_damping)
            self.lm_lambda = lm
        self.needs_second_pass = False
        self._model = {}
        self._clear_records()

    def __del__(self) -> None:  # hooks must not outlive the optimizer
        for h in getattr(self, '_handles', []):
            h.remove()

    # ---------------------------------------------------- engine protocol
    uses_second_pass = True

    def second_pass_due(self) -> bool:
        return self.is_curvature_step(self.steps)

    def second_pass_pending(self) -> bool:
        return self.needs_second_pass


class _LogitsHook:
    """Forward hook on the module whose output are the logits (SMW-GN)."""

    def __init__(self, owner: 'SMW_GN') -> None:
        self.owner_ref = weakref.ref(owner)

    def __call__(self, module: nn.Module, inputs: tuple, output: Any) -> None:
        owner = self.owner_ref()
        if owner is None or not owner.recording:
            return
        if not (module.training and torch.is_grad_enabled()):
            return
        if not isinstance(output, Tensor):
            raise ValueError(
                f'SMW_GN: the output of {owner.logits_module or "the model"} '
                f'is a {type(output).__name__}, not the (N, m_L) logits: set '
                "logits_module to the classifier's final layer (e.g. "
                "'head.fc' for an mmpretrain classifier)")
        if output.requires_grad:
            owner._on_logits(output)


def softmax_hessian_factor(logits: Tensor) -> Tensor:
    """``L_i`` with ``L_i L_i^T = diag(p_i) - p_i p_i^T``, ``(N, m, m)``.

    With ``q = sqrt(p)`` (a unit vector), ``diag(p) - p p^T = D (I - q q^T)
    D`` for ``D = diag(q)``, and ``I - q q^T`` is a projector, so ``L_i = D
    (I - q q^T)`` needs neither an eigendecomposition nor a Cholesky
    factor of the singular ``H_i``.

    Example:
        >>> z = torch.randn(2, 4, dtype=torch.float64)
        >>> p = z.softmax(-1)
        >>> L = softmax_hessian_factor(z)
        >>> torch.allclose(L @ L.mT, torch.diag_embed(p) - p[:, :, None] * p[:, None])
        True
    """
    q = torch.softmax(logits, -1).sqrt()
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return q.unsqueeze(-1) * (eye - q.unsqueeze(-1) * q.unsqueeze(-2))


@OPTIMIZERS.register_module()
class SMW_GN(SMW_NG):  # noqa: N801 (the thesis' name)
    r"""SMW-GN, subsampled Gauss-Newton (Ren 2022, thesis Chapter 5).

    As :class:`SMW_NG` (same LM rule, rho-test, base step, DDP gather),
    with the Gauss-Newton matrix of the softmax cross-entropy in place of
    the empirical Fisher::

        G = lambda I + (1/N2) sum_{i in S2} J_i^T H_i J_i,
        J_i = d z_i / d theta  (m_L x n: the logits' Jacobian of sample i)
        H_i = diag(p_i) - p_i p_i^T = L_i L_i^T,  p_i = softmax(z_i)

    so that with ``U = (J_i^T L_i)_i`` (``n x N2 m_L``)::

        d = G^-1 g = (1/lambda)(g - (1/N2) U D^-1 U^T g),
        D = lambda I + (1/N2) U^T U            ((N2 m_L) x (N2 m_L))

    The ``N2 m_L`` columns of ``U`` are handled exactly as SMW-NG's
    per-sample gradients: each is, per layer, ``sum_t delta_t a_t^T`` with
    the sample's input rows ``a`` and the output gradients ``delta`` of the
    scalar ``(L_i^T z_i)_c``.  Those output gradients come from **one**
    vmapped backward (``torch.autograd.grad(..., is_grads_batched=True)``
    with the ``m_L`` cotangents ``L_i[:, c]`` on the ``S2`` rows of the
    logits), run from a hook on the logits while the training backward is
    under way (the graph is still alive there; ``retain_graph`` keeps it
    for the rest of that backward).  It costs about one backward per class
    evaluated as a batch, and no per-sample gradient is formed; where an
    operation has no batching rule it falls back to ``m_L`` plain
    backwards.  ``L_i = diag(q_i)(I - q_i q_i^T)``, ``q_i = sqrt(p_i)``
    (:func:`softmax_hessian_factor`), so the small system stays symmetric
    positive definite and is solved by fp64 Cholesky.

    The ``rho``-test's model is ``m(0) - m(s) = -(g.s + 1/2 s^T B s)`` with
    ``B = (1/N2) sum_i J_i^T H_i J_i``.  Assumptions: the loss is the mean
    softmax cross-entropy over the batch of the logits (no label smoothing
    in ``H``); the logits are ``(N1, m_L)``, the output of ``logits_module``
    (the whole model's output when ``None``), on the same batch the layers
    see.  Samples are treated as independent: with BatchNorm in training
    mode the output gradients of one sample's logit include its (small)
    influence through the batch statistics on the others.

    The system has ``N2 m_L`` rows, ``N2 = processes x curvature_samples``;
    above ``max_system_size`` the optimizer refuses (at build time when the
    logits module is a Linear and ``curvature_samples`` is set, otherwise at
    the first forward) and says what to lower.

    Args:
        params (Iterable): Parameters or groups.
        model (nn.Module): The model whose Linear/Conv2d layers are hooked.
        logits_module (str, optional): Name (as in ``named_modules``) of the
            module that outputs the logits, e.g. ``'head.fc'`` for an
            mmpretrain classifier; ``None``: the model's own output.
        max_system_size (int): Largest ``N2 m_L`` allowed. Defaults to
            4096.
        **kwargs: The keywords of :class:`SMW_NG` (``lr``,
            ``curvature_samples``, ``damping``, ``tau``, ``boost``,
            ``drop``, ``eps``, ``lm_interval``, ``momentum``,
            ``weight_decay``, ``max_factor_dim``).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> opt = SMW_GN(model.parameters(), model=model, curvature_samples=4)
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
                 max_factor_dim: int = 1 << 30,
                 logits_module: Optional[str] = None,
                 max_system_size: int = 4096) -> None:
        if int(max_system_size) < 1:
            raise ValueError(f'Invalid max_system_size: {max_system_size} '
                             '(>= 1)')
        self.max_system_size = int(max_system_size)
        #: ``m_L``, known from the first logits seen.
        self.outputs_per_sample: Optional[int] = None
        super().__init__(params, model, lr, curvature_samples, damping, tau,
                         boost, drop, eps, lm_interval, momentum,
                         weight_decay, max_factor_dim)
        if logits_module is None:
            root = model
        else:
            try:
                root = model.get_submodule(logits_module)
            except AttributeError as err:
                raise ValueError(f'Invalid logits_module: {logits_module!r} '
                                 'is not a module of the model') from err
        self.logits_module = logits_module
        if isinstance(root, nn.Linear) and self.curvature_samples is not None:
            self._check_system(world_size() * self.curvature_samples,
                               root.out_features)
        self._handles.append(root.register_forward_hook(_LogitsHook(self)))

    def _check_system(self, n2: int, m: int) -> None:
        if n2 * m > self.max_system_size:
            raise ValueError(
                f'SMW_GN: the Gauss-Newton system would be N2 x m_L = {n2} x '
                f'{m} = {n2 * m} rows square, above max_system_size='
                f'{self.max_system_size}. Lower curvature_samples (now '
                f'{self.curvature_samples} per process; N2 = processes x '
                'curvature_samples, the whole batch when None) or raise '
                'max_system_size (the solve costs O((N2 m_L)^3), the Gram '
                'O((N2 m_L)^2) memory).')

    def _capture_output(self, module: nn.Module, output: Tensor,
                        rec: _SampleRecord, n2: int, k: int,
                        output_view: bool) -> None:
        """Keep the output: the Jacobian pass differentiates towards it."""
        rec.outputs.append((output, k, output_view))

    def _on_logits(self, z: Tensor) -> None:
        """Check the system size; hook the Jacobian pass on ``z``'s gradient."""
        if z.dim() != 2:
            raise ValueError(
                f'SMW_GN needs (N, m_L) logits; the output of '
                f'{self.logits_module or "the model"} has shape '
                f'{tuple(z.shape)}: set logits_module to the classifier\'s '
                'final layer')
        n1 = self.step_batch if self.step_batch is not None else z.shape[0]
        if z.shape[0] != n1:
            raise ValueError(
                f'SMW_GN: the logits have {z.shape[0]} rows but the first '
                f'hooked layer saw a batch of {n1}; the logits must be one '
                'row per sample of the batch')
        n2, m = self.samples_of(n1), z.shape[1]
        self._check_system(world_size() * n2, m)
        self.outputs_per_sample = m
        busy = [False]

        def hook(grad: Tensor) -> None:
            if busy[0]:  # the Jacobian pass reaches z itself
                return
            busy[0] = True
            try:
                self._jacobian_rows(z, n2, m)
            finally:
                busy[0] = False

        z.register_hook(hook)

    def _jacobian_rows(self, z: Tensor, n2: int, m: int) -> None:
        """Output-gradient rows of the ``n2 m`` scalars ``(L_i^T z_i)_c``."""
        targets = [(name, rec, j) for name, rec in self.records.items()
                   for j in range(len(rec.outputs))]
        if not targets:
            return
        factor = softmax_hessian_factor(z[:n2].detach().double())
        cot = z.new_zeros((m, ) + tuple(z.shape))
        cot[:, :n2] = factor.permute(2, 0, 1).to(z.dtype)  # [c, i, k] = L_i[k, c]
        outs = [self.records[name].outputs[j][0] for name, _, j in targets]
        try:
            res = torch.autograd.grad(z, outs, grad_outputs=cot,
                                      retain_graph=True, allow_unused=True,
                                      is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: m backwards
            per_c = [torch.autograd.grad(z, outs, grad_outputs=cot[c],
                                         retain_graph=True, allow_unused=True)
                     for c in range(m)]
            res = tuple(None if per_c[0][i] is None else
                        torch.stack([r[i] for r in per_c])
                        for i in range(len(outs)))
        for (name, rec, j), r in zip(targets, res):
            _, k, output_view = rec.outputs[j]
            if r is None:
                rec.grads.append(None)
                continue
            module = self.layers[name]
            if output_view:
                r = r.unsqueeze(1)
            r = r[:, :n2 * k].detach()
            rows = per_sample_grads_rows(module, r.flatten(0, 1))
            d_out = rows.shape[-1]
            rec.grads.append(rows.reshape(m, n2, -1, d_out).transpose(0, 1)
                             .reshape(n2 * m, -1, d_out))
        for _, rec, _ in targets:
            rec.outputs = []

    def _local_rows(self, name: str) -> Union[None, str, Tuple[Tensor, Tensor]]:
        """``(a, u)``: ``a`` per sample, ``m_L`` output-gradient rows each."""
        rec = self.records.get(name)
        m = self.outputs_per_sample
        if rec is None or m is None or (not rec.inputs and not rec.mismatch):
            return None
        if rec.mismatch:
            return 'bad'
        if not rec.grads or all(g is None for g in rec.grads):
            return None
        if len(rec.grads) != len(rec.inputs):
            return 'bad'
        dtype = self._row_dtype(name)
        d_out = self.layers[name].weight.shape[0]
        a = torch.cat(rec.inputs, 1).to(dtype)
        g = torch.cat([
            a.new_zeros(a.shape[0] * m, x.shape[1], d_out) if u is None
            else u.to(dtype) for x, u in zip(rec.inputs, rec.grads)], 1)
        return a, g

    def _grad_rows_per_sample(self) -> int:
        return self.outputs_per_sample or 1

    def _clear_records(self) -> None:
        for rec in getattr(self, 'records', {}).values():
            rec.outputs = []
        super()._clear_records()


__all__ = ['SMW_NG', 'SMW_GN', 'softmax_hessian_factor']

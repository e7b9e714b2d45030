# Copyright (c) mmprecond contributors. All rights reserved.
"""K-BFGS and K-BFGS(L): Kronecker-factored quasi-Newton without inverses.

Yi Ren, "Efficient Second-Order Methods for Training Neural Networks", PhD
thesis, Columbia University, 2022, Chapter 3 (Algorithm 9); Ren and
Goldfarb, "Kronecker-factored Quasi-Newton Methods for Deep Learning",
arXiv:2102.06737.
"""
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.registry import OPTIMIZERS
from torch import Tensor

from ..curvature.capture import factor_dims, gradient_matrix
from ..curvature.factors import mean_update
from ..distributed import all_reduce_sum_, world_size
from .base import PrecondOptimizer, check_positive, check_unit_interval
from .bfgs_updates import CompactLBFGS, bfgs_update, hessian_action, powell_lm_damping
from .secant import SecantRecord, SecantRecorder

SECOND_PASS_MSG = (
    '{name} needs a second forward/backward on the same minibatch after '
    'every curvature step (every `curvature_interval` steps), but step() '
    'was called again without it. In an MMEngine config add\n'
    "    custom_hooks = [dict(type='SecondPassHook')]\n"
    'In plain PyTorch call `optimizer.second_pass(closure)` after '
    '`optimizer.step()` whenever `optimizer.needs_second_pass` is True, with '
    'a closure that re-runs the forward on the same batch and returns the '
    'loss.')


@OPTIMIZERS.register_module()
class KBFGS(PrecondOptimizer):
    r"""K-BFGS / K-BFGS(L) (Ren 2022, thesis Algorithm 9).

    Each Linear / Conv2d weight (bias as the last input column) is updated
    with ``H_G \hat{DW} H_A``, where ``H_A`` approximates ``(A + \lambda_A
    I)^{-1}`` for the input factor ``A = E_n[sum_t a_t a_t^T]`` and ``H_G``
    approximates the inverse of the pre-activation Hessian factor; both are
    built by BFGS updates, so no matrix is ever inverted::

        mu1 = 0.2, beta = 0.9 (momentum)
        lambda_A = sqrt(|T|) sqrt(lambda),  lambda_G = sqrt(lambda) / sqrt(|T|)
        H_A = (A + lambda_A I)^-1  (warm start, else lambda_A^-1 I)
        H_G = lambda_G^-1 I,  s_G = y_G = 0
        for k = 1, 2, ...:
            forward/backward on M_k -> DW
            DW^ = beta DW^ + DW                           # no (1 - beta)
            W -= lr (H_G DW^ H_A + wd W)
            if k % T == 0:
                second forward/backward on M_k -> h+, Dh+ (means)
                s_A = H_A a-bar;  y_A = A~ s_A + lambda_A s_A
                    (A~ s = 1/m sum_n sum_t (a_t^T s) a_t: A is never formed)
                H_A <- BFGS(H_A; s_A, y_A)
                s_G = beta s_G + (1-beta)(h+ - h);  y_G = beta y_G + (1-beta)(Dh+ - Dh)
                (s~, y~) = D_P D_LM(s_G, y_G; H_G, mu1, mu2=lambda_G)
                H_G <- BFGS(H_G; s~, y~)       (K-BFGS)
                       L-BFGS, p pairs        (K-BFGS(L), H0 = lambda_G^-1 I)

    ``|T|`` is the number of output positions of a conv (1 for Linear), so
    ``lambda_A lambda_G = lambda``.  Every other parameter (BatchNorm, layers
    that are not preconditioned) takes the momentum gradient with the
    "effective" learning rate ``lr / lambda``:
    ``W -= lr (DW^ / lambda + wd W)``; weight decay is ``W -= lr wd W``
    for all parameters, as in the thesis.

    Choices where the thesis leaves room (documented here, tested):

    * **Warm start.**  The thesis computes ``A`` over the whole dataset
      before training.  Here ``warm_start_iters=N`` makes the first ``N``
      training iterations statistics-only (no parameter moves, no momentum):
      their input Gram matrices are averaged and ``H_A = (A + lambda_A
      I)^-1`` is formed once, in fp64.  In MMEngine,
      :class:`~mmprecond.engine.WarmStartHook` makes those ``N`` calls on
      the first ``N`` batches before training (cost: ``N``
      forward/backward passes); without it the first ``N`` training
      iterations are the warm start.  With ``N = 0``, ``H_A`` starts at
      ``lambda_A^-1 I``.
    * **The second pass** re-runs the loss on the same batch after the
      update (the :class:`~mmprecond.engine.SecondPassHook` does it in an
      MMEngine loop, restoring the RNG so random sampling repeats).  The
      means of ``h`` and ``Dh`` are over all rows of the pass, so layers
      whose input rows change with the weights (RoI heads, whose proposals
      move) still get a secant pair of their means.
    * ``k`` counts from 1 after the warm start, so the first curvature
      update comes after ``T`` steps; ``|T|`` is that of the layer's first
      call ever seen (detection images vary in size).
    * Layers with a side wider than ``max_factor_dim`` keep that side at
      ``lambda^-1 I`` (scaled identity).
    * For a layer followed by BatchNorm the mean output gradient ``Dh-bar``
      is zero in exact arithmetic (BN is invariant to a per-channel shift of
      its input), so ``y_G`` is round-off and ``D_P D_LM`` turns the pair
      into about ``(s, lambda_G s)``: ``H_G`` stays near ``lambda_G^-1 I``
      there.  This is inherent to the method, not a fallback.

    With ``warm_start_iters=0``, no weight decay and fewer than
    ``curvature_interval`` steps, every parameter moves exactly like
    ``torch.optim.SGD(lr=lr / damping, momentum=momentum)``; the tests check
    this step for step.

    Args:
        params (Iterable): Parameters or groups.
        model (nn.Module): The model whose Linear/Conv2d layers are hooked.
        lr (float): ``alpha``.  Thesis' best values are large (CIFAR-10
            ResNet-32: 100 with damping 1e3); the effective lr is
            ``lr / damping``.
        damping (float): ``lambda``.
        momentum (float): ``beta`` of the gradient momentum. Defaults to 0.9.
        stat_decay (float): ``beta`` of the ``s_G, y_G`` averages.
            Defaults to 0.9.
        weight_decay (float): ``gamma``: ``W -= lr (p + gamma W)``.
        curvature_interval (int): ``T``. Defaults to 20 (the thesis' CNN value).
        mu1 (float): Powell threshold. Defaults to 0.2.
        history (int, optional): ``None`` for K-BFGS (dense BFGS ``H_G``);
            the number of L-BFGS pairs for K-BFGS(L) (see :class:`KBFGS_L`).
        warm_start_iters (int): Statistics-only iterations for ``A``.
        max_factor_dim (int): See :class:`PrecondOptimizer`.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> opt = KBFGS(model.parameters(), model=model, lr=0.1, damping=1.0,
        ...             curvature_interval=1)
        >>> x, y = torch.randn(16, 4), torch.randn(16, 2)
        >>> closure = lambda: ((model(x) - y)**2).mean()
        >>> closure().backward(); opt.step(); opt.zero_grad()
        >>> opt.needs_second_pass
        True
        >>> opt.second_pass(closure)
    """

    def __init__(self,
                 params: Iterable,
                 model: Optional[nn.Module] = None,
                 lr: float = 0.1,
                 damping: float = 1.0,
                 momentum: float = 0.9,
                 stat_decay: float = 0.9,
                 weight_decay: float = 0.0,
                 curvature_interval: int = 20,
                 mu1: float = 0.2,
                 history: Optional[int] = None,
                 warm_start_iters: int = 0,
                 max_factor_dim: int = 4096) -> None:
        check_positive('lr', lr)
        check_positive('damping', damping)
        check_unit_interval('momentum', momentum)
        check_unit_interval('stat_decay', stat_decay)
        check_positive('weight_decay', weight_decay, allow_zero=True)
        if not 0.0 < mu1 < 1.0:
            raise ValueError(f'Invalid mu1: {mu1} (must be in (0, 1))')
        if int(curvature_interval) < 1:
            raise ValueError(
                f'Invalid curvature_interval: {curvature_interval} (>= 1)')
        if history is not None and int(history) < 1:
            raise ValueError(f'Invalid history: {history} (>= 1 or None)')
        if int(warm_start_iters) < 0:
            raise ValueError(
                f'Invalid warm_start_iters: {warm_start_iters} (>= 0)')
        self.warm_start_iters = int(warm_start_iters)
        self.damping = float(damping)
        self.stat_decay = float(stat_decay)
        self.curvature_interval = int(curvature_interval)
        self.mu1 = float(mu1)
        self.history = None if history is None else int(history)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        nesterov=False)
        super().__init__(params, defaults, model, 'sgdm', 1, max_factor_dim)
        self.secant = SecantRecorder(dict(model.named_modules()), self.layers)
        self._layer_params = {
            id(p)
            for m in self.layers.values() for p in (m.weight, m.bias)
            if p is not None
        }
        self._group_of = {
            id(p): g
            for g in self.param_groups for p in g['params']
        }
        self._lbfgs: Dict[str, CompactLBFGS] = {}
        self._first: Dict[str, Tuple[Tensor, Tensor]] = {}
        self._directions: Dict[str, Tensor] = {}
        self.needs_second_pass = False
        self._set_modes()

    # ------------------------------------------------------------- schedule
    def capture_sides(self, module: nn.Module) -> Tuple[bool, bool]:
        """Input Gram matrices during the warm start only; no output side."""
        d_out, d_in = factor_dims(module)
        return self.warm_start_iters > 0 and self.side_enabled(d_in), False

    def is_stat_step(self, step: int) -> bool:
        """Gram statistics are collected in the warm-start iterations only."""
        return step < getattr(self, 'warm_start_iters', 0)

    def is_curvature_step(self, step: int) -> bool:
        """Whether (0-based) ``step`` is followed by a curvature update."""
        k = step - self.warm_start_iters + 1
        return k >= 1 and k % self.curvature_interval == 0

    def _set_modes(self) -> None:
        t = self.steps
        self.capture.active = self.is_stat_step(t)
        if self.is_curvature_step(t):
            self.secant.mode = 'first'
        elif self.is_stat_step(t):
            self.secant.mode = 'samples'
        elif len(self.secant.locations) < len(self.layers):
            self.secant.mode = 'locations'
        else:
            self.secant.mode = None

    def _dampings(self, name: str) -> Tuple[float, float]:
        module = self.layers[name]
        locs = 1
        if isinstance(module, nn.Conv2d):
            locs = self.secant.locations.get(name, 1)
        root = math.sqrt(self.damping)
        return math.sqrt(locs) * root, root / math.sqrt(locs)

    # ---------------------------------------------------------------- state
    def _init_layer(self, name: str) -> Dict[str, Tensor]:
        module = self.layers[name]
        d_out, d_in = factor_dims(module)
        lam_a, lam_g = self._dampings(name)
        dev = module.weight.device
        st: Dict[str, Tensor] = dict(
            momentum=torch.zeros(d_out, d_in, device=dev),
            s_G=torch.zeros(d_out, device=dev),
            y_G=torch.zeros(d_out, device=dev),
            locations=torch.tensor(self.secant.locations.get(name, 1)))
        if self.side_enabled(d_in):
            st['H_A'] = torch.eye(d_in, device=dev) / lam_a
        if self.side_enabled(d_out):
            if self.history is None:
                st['H_G'] = torch.eye(d_out, device=dev) / lam_g
            else:
                lb = CompactLBFGS(d_out, self.history, 1.0 / lam_g, device=dev)
                self._lbfgs[name] = lb
                st.update(lb.state())
        self.layer_state[name] = st
        return st

    def _state(self, name: str) -> Dict[str, Tensor]:
        st = self.layer_state.get(name)
        return self._init_layer(name) if st is None else st

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load state saved by :meth:`state_dict` (incl. L-BFGS pairs)."""
        super().load_state_dict(state_dict)
        self._lbfgs = {}
        for name, st in self.layer_state.items():
            self.secant.locations[name] = int(st['locations'])
            if 'lbfgs_S' in st:
                lam_g = self._dampings(name)[1]
                lb = CompactLBFGS(1, self.history or 1, 1.0 / lam_g)
                lb.load(st)
                lb.history = st['lbfgs_S'].shape[0]
                self._lbfgs[name] = lb
        self.needs_second_pass = False
        self.secant.take()
        self._set_modes()

    # ----------------------------------------------------------------- step
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients; a first pass whose step was skipped is dropped.

        Records with an output gradient still here were not consumed by
        :meth:`step` (e.g. the AMP ``GradScaler`` skipped it); inputs of a
        forward whose backward has not run yet are kept.
        """
        if any(r.g_sum is not None for r in self.secant.records.values()):
            self.secant.take()
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One K-BFGS step (statistics only during the warm start)."""
        if self.needs_second_pass:
            raise RuntimeError(SECOND_PASS_MSG.format(name=type(self).__name__))
        t = self.steps
        if t < self.warm_start_iters:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            self._warm_start_fold(t)
            self.steps = t + 1
            if self.steps == self.warm_start_iters:
                self._warm_start_finish()
            self._set_modes()
            return loss
        loss = super().step(closure)
        if self.is_curvature_step(t) and self.layers:
            # with every layer excluded there is no curvature to update and
            # no second pass to ask for: the step is the plain base update
            self._update_h_a(self.secant.take())
            self.needs_second_pass = True
        self._set_modes()
        return loss

    def _warm_start_fold(self, t: int) -> None:
        """Average ``A = E_n[sum_t a a^T]`` over the warm-start batches."""
        stats = self._reduced_statistics()
        records = self.secant.take()
        buffers = self.capture.buffers
        for name, st in stats.items():
            rec = records.get(name)
            if st.xx is None or rec is None or rec.samples == 0:
                continue
            # row mean x rows / samples (ranks assumed to hold equal batches)
            per_sample = buffers[name].x_rows / (rec.samples * world_size())
            state = self._state(name)
            count = int(state.get('A_count', torch.tensor(0))) + 1
            state['A'] = mean_update(state.get('A'), st.xx * per_sample, count)
            state['A_count'] = torch.tensor(count)
        self.capture.clear()

    def _warm_start_finish(self) -> None:
        for name, st in self.layer_state.items():
            A = st.pop('A', None)
            st.pop('A_count', None)
            if A is None or 'H_A' not in st:
                continue
            lam_a = self._dampings(name)[0]
            a64 = A.double() + lam_a * torch.eye(A.shape[0], dtype=torch.float64,
                                                 device=A.device)
            chol, info = torch.linalg.cholesky_ex(a64)
            if int(info) != 0:
                self.fallbacks.record(
                    'warm_start_cholesky', f'warm-start A of {name} is not '
                    'positive definite; H_A starts at lambda_A^-1 I')
                continue
            st['H_A'] = torch.cholesky_inverse(chol).float()

    def update_statistics(self, stats: Dict[str, Any], step: int) -> None:
        """Unused: Gram statistics enter only in the warm start."""

    def update_preconditioners(self, step: int) -> None:
        """Precondition every layer's gradient, batched by shape.

        ``H_G (beta DW^ + DW) H_A`` for all layers at once: layers with the
        same factor shapes are stacked into one ``bmm`` per side.  The
        momentum is updated only where it stays finite (no device read).
        :meth:`precondition` then hands out the results.
        """
        self._directions: Dict[str, Tensor] = {}
        batches: Dict[tuple, List[Tuple[str, Tensor]]] = {}
        for name, module in self.layers.items():
            g = gradient_matrix(module)
            if g is None:
                continue
            st = self._state(name)
            key = (tuple(st['momentum'].shape), 'H_A' in st, 'H_G' in st,
                   st['momentum'].device)
            batches.setdefault(key, []).append((name, g))
        for (_, has_a, has_g, _), items in batches.items():
            names = [n for n, _ in items]
            states = [self.layer_state[n] for n in names]
            dev = states[0]['momentum'].device
            betas = torch.tensor(
                [self._group_of[id(self.layers[n].weight)]['momentum']
                 for n in names], device=dev).view(-1, 1, 1)
            old = torch.stack([st['momentum'] for st in states])
            buf = old * betas + torch.stack([g.float() for _, g in items])
            keep = torch.isfinite(buf).flatten(1).all(1).view(-1, 1, 1)
            buf = torch.where(keep, buf, old)
            damp = torch.tensor([self._dampings(n) for n in names],
                                device=dev)  # (n, 2): lambda_A, lambda_G
            if has_a:
                out = torch.bmm(buf, torch.stack([st['H_A'] for st in states]))
            else:
                out = buf / damp[:, 0].view(-1, 1, 1)
            if has_g:
                out = torch.bmm(torch.stack([st['H_G'] for st in states]), out)
            elif not any(n in self._lbfgs for n in names):
                out = out / damp[:, 1].view(-1, 1, 1)
            for j, (name, st) in enumerate(zip(names, states)):
                st['momentum'] = buf[j].clone()
                lb = self._lbfgs.get(name)
                self._directions[name] = out[j] if lb is None else lb.apply(
                    out[j])

    def precondition(self, name: str, module: nn.Module,
                     grad: Tensor) -> Optional[Tensor]:
        """The direction :meth:`update_preconditioners` computed."""
        return self._directions.pop(name, None)

    def base_step(self, directions: Dict[Tensor, Tensor]) -> None:
        """``W -= lr (p + wd W)``; non-preconditioned parameters take
        ``p = DW^ / lambda`` with ``DW^ = beta DW^ + DW``."""
        for group in self.param_groups:
            lr, wd, beta = group['lr'], group['weight_decay'], group['momentum']
            own: List[Tensor] = []
            own_dirs: List[Tensor] = []
            other: List[Tensor] = []
            bufs: List[Tensor] = []
            grads: List[Tensor] = []
            for p in group['params']:
                d = directions.get(p)
                if d is None:
                    continue
                if id(p) in self._layer_params:
                    if d is p.grad:
                        continue  # non-finite direction, counted by the base
                    own.append(p)
                    own_dirs.append(d)
                    continue
                st = self.state[p]
                if 'momentum_buffer' not in st:
                    st['momentum_buffer'] = torch.zeros_like(p)
                other.append(p)
                bufs.append(st['momentum_buffer'])
                grads.append(d)
            if bufs:
                torch._foreach_mul_(bufs, beta)
                torch._foreach_add_(bufs, grads)
            params = own + other
            if not params:
                continue
            if wd != 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            if own:
                torch._foreach_add_(own, own_dirs, alpha=-lr)
            if other:
                torch._foreach_add_(other, bufs, alpha=-lr / self.damping)

    # ------------------------------------------------------------ curvature
    def _reduce(self, tensors: List[Tensor]) -> None:
        if world_size() > 1:
            all_reduce_sum_(tensors)

    def _secant_layers(self, records: Dict[str, SecantRecord]) -> List[str]:
        """Layers that take part in a curvature update, in a fixed order.

        With one process, those whose pass recorded an output gradient.
        Under torch.distributed every layer, with zero sums where this rank
        recorded nothing (a head that got no rows here): every rank then
        reduces the same tensors, and a layer that no rank saw gets zero
        rows, hence non-finite means, which the guarded updates reject.
        """
        if world_size() > 1:
            return list(self.layers)
        return [n for n in self.layers
                if n in records and records[n].g_sum is not None]

    def _pass_sums(self, names: List[str], records: Dict[str, SecantRecord],
                   scale: Any, with_a: bool) -> Tuple[List[List[Tensor]], Tensor]:
        """Per layer ``[h_sum, g_sum / scale(, a_sum)]`` and one count tensor.

        The counts are an ``(n, 2)`` tensor of ``(rows, samples)``, copied
        to the device once for all layers.  Zeros stand in for a layer this
        rank recorded nothing for.
        """
        sums: List[List[Tensor]] = []
        counts: List[Tuple[int, int]] = []
        for name in names:
            rec = records.get(name)
            module = self.layers[name]
            if rec is None or rec.g_sum is None:
                d_out, d_in = factor_dims(module)
                dev = module.weight.device
                vec = [torch.zeros(d_out, device=dev),
                       torch.zeros(d_out, device=dev)]
                if with_a:
                    vec.append(torch.zeros(d_in, device=dev))
                counts.append((0, 0))
            else:
                vec = [rec.h_sum, rec.g_sum / scale]
                if with_a:
                    vec.append(rec.a_sum)
                counts.append((rec.rows, rec.samples))
            sums.append(vec)
        dev = sums[0][0].device if sums else torch.device('cpu')
        return sums, torch.tensor(counts, dtype=torch.float32).view(-1, 2).to(dev)

    def _update_h_a(self, records: Dict[str, SecantRecord]) -> None:
        """Hessian-action BFGS for ``H_A`` from the first pass; keeps the
        first-pass means ``h-bar, Dh-bar`` for :meth:`second_pass`.

        Two bucketed all-reduces for all layers together: the sums and row
        counts, then the Hessian actions ``A~ s_A``, formed with ``s_A``
        from the all-rank mean patch.
        """
        self._first = {}
        names = self._secant_layers(records)
        if not names:
            return
        # DDP averages gradients over ranks: each rank's output gradients
        # are ``world`` times their share of the one-process gradient
        sums, counts = self._pass_sums(names, records,
                                       self._loss_scale() * world_size(),
                                       with_a=True)
        self._reduce([t for vec in sums for t in vec] + [counts])
        rows, samples = counts.unbind(1)
        acts: List[Tensor] = []
        pending = []
        for i, name in enumerate(names):
            h_sum, g_sum, a_sum = sums[i]
            self._first[name] = (h_sum / rows[i], g_sum * (samples[i] / rows[i]))
            st = self._state(name)
            h_a = st.get('H_A')
            rec = records.get(name)
            if h_a is None:
                if rec is not None:
                    rec.inputs.clear()
                continue
            s_a = h_a @ (a_sum / rows[i])
            inputs = rec.inputs if rec is not None and rec.g_sum is not None else []
            act = sum((hessian_action(self.layers[name], x, s_a) for x in inputs),
                      torch.zeros_like(s_a))
            acts.append(act)
            pending.append((i, name, st, h_a, s_a))
            if rec is not None:
                rec.inputs.clear()
        self._reduce(acts)
        for act, (i, name, st, h_a, s_a) in zip(acts, pending):
            lam_a = self._dampings(name)[0]
            y_a = act / samples[i] + lam_a * s_a
            new = bfgs_update(h_a, s_a, y_a)
            ok = torch.isfinite(new).all() & (s_a @ y_a > 0)
            st['H_A'] = torch.where(ok, new, h_a)

    def second_pass(self, closure: Callable[[], Tensor],
                    first_loss: Optional[Tensor] = None) -> None:
        """Second forward/backward on the step's minibatch; updates ``H_G``.

        Args:
            closure (Callable): Runs the forward on the same batch (same
                random sampling) and returns the loss; it must not call
                ``backward``.  Parameter ``.grad`` is left untouched.
            first_loss (Tensor, optional): The first pass's loss, which
                :class:`~mmprecond.engine.SecondPassHook` hands to every
                optimizer (SMW_NG's rho-test uses it); unused here.
        """
        if not self.needs_second_pass:
            raise RuntimeError('second_pass() called without a pending '
                               'curvature step (see `needs_second_pass`)')
        self.needs_second_pass = False
        self.secant.take()
        self.secant.mode = 'second'
        try:
            with torch.enable_grad():
                loss = closure()
                if not (isinstance(loss, Tensor) and loss.requires_grad):
                    self.fallbacks.record(
                        'second_pass_no_graph', 'the second-pass loss has no '
                        'graph; no H_G update this time')
                    self._first = {}
                    return
                weights = [m.weight for m in self.layers.values()]
                if not weights:  # every layer excluded: nothing to update
                    self._first = {}
                    return
                torch.autograd.grad(loss, weights, allow_unused=True)
        finally:
            self._set_modes()
        self._update_h_g(self.secant.take())

    @torch.no_grad()
    def _update_h_g(self, records: Dict[str, SecantRecord]) -> None:
        beta = self.stat_decay
        lbfgs_pairs = []
        names = [n for n in self._secant_layers(records) if n in self._first]
        sums, counts = self._pass_sums(names, records, float(world_size()),
                                       with_a=False)
        self._reduce([t for vec in sums for t in vec] + [counts])
        rows, samples = counts.unbind(1)
        for i, name in enumerate(names):
            h0, g0 = self._first[name]
            h1 = sums[i][0] / rows[i]
            g1 = sums[i][1] * (samples[i] / rows[i])
            st = self._state(name)
            s_g = st['s_G'].mul(beta).add_(h1 - h0, alpha=1 - beta)
            y_g = st['y_G'].mul(beta).add_(g1 - g0, alpha=1 - beta)
            ok = torch.isfinite(s_g).all() & torch.isfinite(y_g).all()
            st['s_G'] = torch.where(ok, s_g, st['s_G'])
            st['y_G'] = torch.where(ok, y_g, st['y_G'])
            lam_g = self._dampings(name)[1]
            lb = self._lbfgs.get(name)
            h_g = st.get('H_G')
            if lb is None and h_g is None:
                continue
            hy = lb.apply(st['y_G'][:, None])[:, 0] if lb is not None \
                else h_g @ st['y_G']
            s_t, y_t = powell_lm_damping(st['s_G'], st['y_G'], hy, self.mu1,
                                         lam_g)
            good = ok & (s_t @ y_t > 0) & torch.isfinite(s_t).all()
            if lb is not None:
                lbfgs_pairs.append((name, lb, s_t, y_t, good))
            else:
                new = bfgs_update(h_g, s_t, y_t)
                good = good & torch.isfinite(new).all()
                st['H_G'] = torch.where(good, new, h_g)
        self._first = {}
        if lbfgs_pairs:
            flags = torch.stack([g for *_, g in lbfgs_pairs]).cpu()
            for (name, lb, s_t, y_t, _), good in zip(lbfgs_pairs, flags):
                if bool(good):
                    lb.push(s_t, y_t)
                    self.layer_state[name].update(lb.state())
                else:
                    self.fallbacks.record(
                        'skipped_lbfgs_pair', f'non-finite or non-positive '
                        f'(s, y) pair for {name}; not stored')

    # ---------------------------------------------------- engine protocol
    uses_second_pass = True

    def second_pass_due(self) -> bool:
        return self.is_curvature_step(self.steps)

    def second_pass_pending(self) -> bool:
        return self.needs_second_pass

    def warm_start_remaining(self) -> int:
        return max(self.warm_start_iters - self.steps, 0)


@OPTIMIZERS.register_module()
class KBFGS_L(KBFGS):  # noqa: N801 (the thesis' name)
    """K-BFGS(L): :class:`KBFGS` with L-BFGS (``history`` pairs) for ``H_G``.

    ``H_G`` is kept as the last ``history`` (100 in the thesis) damped
    pairs and applied in the compact form of Byrd, Nocedal and Schnabel
    (1994), initialised as ``lambda_G^-1 I``; memory ``O(p d_out)`` instead of
    ``O(d_out^2)``.  Everything else is :class:`KBFGS`.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> opt = KBFGS_L(model.parameters(), model=model, history=10)
    """

    def __init__(self, params: Iterable, model: Optional[nn.Module] = None,
                 history: int = 100, **kwargs: Any) -> None:
        super().__init__(params, model=model, history=history, **kwargs)


__all__ = ['KBFGS', 'KBFGS_L']

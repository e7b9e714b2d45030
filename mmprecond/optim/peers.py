# Copyright (c) mmprecond contributors. All rights reserved.
"""Third-party preconditioned optimizers, registered for side-by-side runs.

``pip install .[peers]`` installs `pytorch-optimizer
<https://github.com/kozistr/pytorch_optimizer>`_ and `singd
<https://github.com/f-dangel/singd>`_; this module then registers, in
MMEngine's root ``OPTIMIZERS``:

* ``PeerSOAP``: ``pytorch_optimizer.SOAP`` (N. Vyas et al., *SOAP: Improving
  and Stabilizing Shampoo using Adam*, 2024), unchanged;
* ``PeerShampoo``: ``pytorch_optimizer.Shampoo`` (V. Gupta et al., *Shampoo:
  Preconditioned Stochastic Tensor Optimization*, ICML 2018), unchanged;
  the name keeps it apart from mmprecond's own :class:`~.Shampoo`;
* ``PeerMuon``: :class:`PeerMuon`, ``pytorch_optimizer.Muon`` (K. Jordan et
  al., *Muon: An optimizer for hidden layers*, 2024; J. Liu et al., *Muon is
  Scalable for LLM Training* (Moonlight), 2025) on the hidden weights, with
  AdamW on the 1-D parameters and the heads' final layers;
* ``PeerSINGD``: :class:`PeerSINGD`, ``singd.optim.optimizer.SINGD``
  (W. Lin et al., *Structured Inverse-Free Natural Gradient Descent*, ICML
  2024) on the Linear / Conv2d layers, with the SGD step for every other
  parameter, which SINGD itself leaves untrained.

They are here so that ``tools/analysis_tools/compare_optimizers.py`` can put
them in the same table as mmprecond's optimizers; their numerics, host
reads and checkpoint format are their authors' (see each class).
"""
import importlib.util
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.registry import OPTIMIZERS
from torch.optim import Optimizer

from ..protocol import EngineProtocol, tensor_megabytes

#: Names registered by this module, with the package each needs.
PEER_PACKAGES = dict(PeerSOAP='pytorch_optimizer',
                     PeerShampoo='pytorch_optimizer', PeerSINGD='singd',
                     PeerMuon='pytorch_optimizer')
#: Keys of a parameter group that :class:`PeerSINGD` forwards to its parts.
_SHARED_KEYS = ('lr', 'momentum', 'weight_decay')


def peer_available(name: str) -> bool:
    """Whether the package behind peer optimizer ``name`` is installed."""
    return importlib.util.find_spec(PEER_PACKAGES[name]) is not None


@OPTIMIZERS.register_module()
class PeerSINGD(Optimizer, EngineProtocol):
    """SINGD on Linear / Conv2d layers, SGD with momentum on the rest.

    ``singd``'s ``SINGD`` updates only the weights and biases of the
    ``nn.Linear`` / ``nn.Conv2d`` modules it hooks; a detector's norm layers
    and any free parameters would stay at their initial values.  This
    optimizer splits every parameter group in two: the parameters of
    supported modules go to ``SINGD`` and the others to ``torch.optim.SGD``
    with the same ``lr``, ``momentum`` and ``weight_decay`` (SINGD's own base
    step is SGD with momentum and coupled decay on the natural gradient, so
    for the other parameters this is SINGD with an identity preconditioner).
    ``param_groups`` are this optimizer's, so MMEngine's parameter
    schedulers and ``paramwise_cfg`` act on both parts; the values are copied
    into the parts at every step.  SINGD needs a layer's weight and bias in
    one group, so a bias that ``paramwise_cfg`` puts in another group (e.g.
    ``bias_decay_mult=0``) follows its weight's ``lr`` / ``momentum`` /
    ``weight_decay``.

    Algorithm (W. Lin et al., *Structured Inverse-Free Natural Gradient
    Descent: Memory-Efficient & Numerically-Stable KFAC*, ICML 2024; as in
    singd's code), per supported layer with ``d_i`` inputs ``a``, ``d_o``
    output gradients ``g`` and factors ``K`` (``d_i x d_i``), ``C``
    (``d_o x d_o``), both starting at ``I``::

        if t % T == 0:
            H_K = K^T E[a a^T] K;   H_C = C^T E[g g^T] C   (this step's batch)
            m_K <- a1 m_K + s (tr(H_C)/d_o H_K + lam tr(C^T C)/d_o K^T K - I)
            m_C <- a1 m_C + s (tr(H_K)/d_i H_C + lam tr(K^T K)/d_i C^T C - I)
            K <- K (I - b1 m_K);   C <- C (I - b1 m_C)
                 (s = 1/2, or (1 - a1)/2 with b1 divided by max(1, |m|_inf)
                  when normalize_lr_cov)
        d = C C^T G K K^T + wd W;  buf = mu buf + d;  W <- W - lr buf

    ``K K^T`` and ``C C^T`` track the inverse Kronecker factors without any
    matrix inversion.

    Notes:
        * ``SINGD.step`` reads the gradient scale with ``.item()`` and loops
          over layers in Python; the zero-host-read and batching guarantees
          of mmprecond's optimizers do not hold here.
        * Its checkpoints hold singd's structured-matrix objects, which
          ``torch.load(weights_only=True)`` (mmprecond's loader) refuses, so
          a run with PeerSINGD cannot be resumed from a file.
        * DDP: singd refuses a DDP-wrapped model, so the optim-wrapper
          constructor passes the unwrapped one; singd then averages its
          statistics and natural gradients over ranks itself when
          ``torch.distributed`` is initialised (on top of DDP's gradient
          average).  mmprecond does not test PeerSINGD under DDP.

    Args:
        params (Iterable): Parameters or parameter groups.
        model (nn.Module): The model (passed by
            ``PrecondOptimWrapperConstructor``).
        lr (float): Learning rate. Defaults to 1e-3 (singd's default).
        momentum (float): Momentum. Defaults to 0.9.
        weight_decay (float): Coupled L2 decay. Defaults to 0.
        T (int): Preconditioner update interval. Defaults to 10.
        damping (float): ``lambda``. Defaults to 1e-3.
        alpha1 (float): Riemannian momentum. Defaults to 0.5.
        lr_cov (float): ``beta1``, the preconditioner's learning rate.
            Defaults to 1e-2.
        structures (tuple[str, str]): Structures of ``K`` and ``C``.
            Defaults to ``('dense', 'dense')``.
        kfac_approx (str): ``'expand'`` or ``'reduce'``. Defaults to
            ``'expand'``.
        normalize_lr_cov (bool): Normalised steps on the preconditioner
            (more stable early in training). Defaults to True.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
        >>> opt = PeerSINGD(model.parameters(), model=model, lr=0.1)
        >>> len(opt.param_groups)
        1
    """
    requires_model = True

    def __init__(self,
                 params: Iterable,
                 model: nn.Module,
                 lr: float = 1e-3,
                 momentum: float = 0.9,
                 weight_decay: float = 0.0,
                 T: int = 10,
                 damping: float = 1e-3,
                 alpha1: float = 0.5,
                 lr_cov: float = 1e-2,
                 structures: Tuple[str, str] = ('dense', 'dense'),
                 kfac_approx: str = 'expand',
                 normalize_lr_cov: bool = True) -> None:
        try:
            from singd.optim.optimizer import SINGD
        except ImportError as err:  # pragma: no cover - depends on extras
            raise ImportError('PeerSINGD needs the singd package: '
                              'pip install .[peers]') from err
        super().__init__(
            params, dict(lr=lr, momentum=momentum,
                         weight_decay=weight_decay))
        # SINGD preconditions weight and bias of a layer jointly, so both go
        # to the SINGD group made from the weight's group
        owner = {id(p): i for i, g in enumerate(self.param_groups)
                 for p in g['params']}
        singd_params: Dict[int, List[nn.Parameter]] = {}
        taken = set()
        for module in model.modules():
            if (not isinstance(module, SINGD.SUPPORTED_MODULES)
                    or next(module.children(), None) is not None):
                continue
            mine = [p for p in module.parameters(recurse=False)
                    if id(p) in owner]
            if mine:
                index = owner.get(id(module.weight), owner[id(mine[0])])
                singd_params.setdefault(index, []).extend(mine)
                taken.update(id(p) for p in mine)
        singd_groups: List[Dict[str, Any]] = []
        sgd_groups: List[Dict[str, Any]] = []
        #: ``(part, index of the group in the part)`` for each own group
        self._links: List[List[Tuple[str, int]]] = []
        for index, group in enumerate(self.param_groups):
            links = []
            shared = {k: group[k] for k in _SHARED_KEYS}
            rest = [p for p in group['params'] if id(p) not in taken]
            if index in singd_params:
                links.append(('singd', len(singd_groups)))
                singd_groups.append(dict(params=singd_params[index], **shared))
            if rest:
                links.append(('sgd', len(sgd_groups)))
                sgd_groups.append(dict(params=rest, **shared))
            self._links.append(links)
        self.singd: Optional[Optimizer] = None
        if singd_groups:
            self.singd = SINGD(
                model, singd_groups, lr=lr, momentum=momentum,
                weight_decay=weight_decay, T=T, damping=damping,
                alpha1=alpha1, lr_cov=lr_cov, structures=tuple(structures),
                kfac_approx=kfac_approx, normalize_lr_cov=normalize_lr_cov,
                warn_unsupported=False)
        self.sgd: Optional[Optimizer] = (
            torch.optim.SGD(sgd_groups, lr=lr, momentum=momentum,
                            weight_decay=weight_decay) if sgd_groups else None)

    def _part(self, name: str) -> Optimizer:
        part = self.singd if name == 'singd' else self.sgd
        assert part is not None
        return part

    def _sync_hyper_parameters(self) -> None:
        for group, links in zip(self.param_groups, self._links):
            for name, index in links:
                target = self._part(name).param_groups[index]
                for key in _SHARED_KEYS:
                    target[key] = group[key]

    @torch.no_grad()
    def step(self, closure=None) -> Optional[torch.Tensor]:  # type: ignore[override]
        """One SINGD step on the supported layers and one SGD step on the rest.

        Args:
            closure (callable, optional): Re-evaluates the model and returns
                the loss; run once, before both parts step.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyper_parameters()
        for part in (self.singd, self.sgd):
            if part is not None:
                part.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in (self.singd, self.sgd):
            if part is not None:
                part.zero_grad(set_to_none=set_to_none)

    def state_megabytes(self) -> Tuple[float, float]:
        """``(all state, preconditioner state)`` in MiB, as
        :func:`~mmprecond.engine.hooks.optimizer_state_megabytes` reports
        it: the parts' momentum buffers plus SINGD's ``K``, ``C`` and their
        momenta (the tensors each structured matrix registers)."""
        matrices = []
        if self.singd is not None:
            for name in ('Ks', 'Cs', 'm_Ks', 'm_Cs'):
                matrices += list(getattr(self.singd, name, {}).values())
        factors = tensor_megabytes(
            getattr(m, t) for m in matrices
            for t in getattr(m, '_tensor_names', ()))
        base = tensor_megabytes(
            v for part in (self.singd, self.sgd) if part is not None
            for st in part.state.values() for v in st.values())
        return base + factors, factors

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state['parts'] = {
            name: part.state_dict()
            for name, part in (('singd', self.singd), ('sgd', self.sgd))
            if part is not None
        }
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        parts = state_dict.pop('parts')
        super().load_state_dict(state_dict)
        for name, part_state in parts.items():
            self._part(name).load_state_dict(part_state)


def register_peer_optimizers() -> List[str]:
    """Register ``PeerSOAP`` / ``PeerShampoo`` / ``PeerMuon`` when
    pytorch-optimizer is there.

    Returns:
        list[str]: The names registered by this call.
    """
    if not peer_available('PeerSOAP') or 'PeerSOAP' in OPTIMIZERS.module_dict:
        return []
    from pytorch_optimizer import SOAP
    from pytorch_optimizer import Shampoo as _Shampoo
    OPTIMIZERS.register_module(name='PeerSOAP', module=SOAP)
    OPTIMIZERS.register_module(name='PeerShampoo', module=_Shampoo)
    OPTIMIZERS.register_module(name='PeerMuon', module=PeerMuon)
    return ['PeerSOAP', 'PeerShampoo', 'PeerMuon']


# ---------------------------------------------------------------- PeerMuon
#: Modules (suffixes of their qualified names) whose weights
#: :class:`PeerMuon` gives to AdamW: the final classification / regression
#: layers of mmdet's heads (RoI bbox / mask heads, RPN, RetinaNet, the
#: single-stage heads) and mmpretrain's linear classifier ``head.fc``.
MUON_ADAMW_MODULES = ('fc_cls', 'fc_reg', 'conv_cls', 'conv_reg',
                      'retina_cls', 'retina_reg', 'rpn_cls', 'rpn_reg',
                      'conv_logits', 'head.fc')

if importlib.util.find_spec('pytorch_optimizer') is not None:
    from pytorch_optimizer import Muon as _MuonBase
else:  # pragma: no cover - depends on extras
    _MuonBase = Optimizer


def _suffix_match(name: str, patterns: Iterable[str]) -> bool:
    """Whether dotted ``name`` ends with one of ``patterns`` (whole parts)."""
    return any(name == p or name.endswith('.' + p) for p in patterns)


class PeerMuon(_MuonBase):  # type: ignore[misc, valid-type]
    """pytorch-optimizer's Muon on hidden weights, AdamW on everything else.

    Each parameter group (the ones ``paramwise_cfg`` makes, or the single
    one) is split in two groups of this one optimizer: ``use_muon=True``
    with the group's >=2-D weights, and ``use_muon=False`` (AdamW) with its
    1-D parameters, the weights of the modules named in ``adamw_modules``
    and any weight whose matrix view is a single row or column (a 1-output
    conv, a ``(1, n, d)`` token; orthogonalising a vector only normalises
    it).  Both halves keep the group's ``lr`` and ``weight_decay`` (and
    every other key ``paramwise_cfg`` set), so MMEngine's parameter
    schedulers, which scale every ``param_groups`` entry, scale both.
    Conv weights are passed unchanged: pytorch-optimizer's Muon
    orthogonalises a ``(c_out, c_in, k, k)`` weight as the
    ``c_out x (c_in k k)`` matrix itself.

    With ``use_adjusted_lr=True`` (the default) the Muon update of a
    ``m x n`` weight is scaled by Moonlight's ``0.2 sqrt(max(m, n))``,
    which gives it about the RMS of an AdamW update, so an AdamW config's
    ``lr`` / ``weight_decay`` carry over unchanged (J. Liu et al., 2025).

    Algorithm (per Muon weight ``W``, gradient ``G``; decoupled decay)::

        B <- mu B + (1 - mu) G;   U = mu B + (1 - mu) G   (Nesterov)
        O = NewtonSchulz5(U as c_out x rest)              (about U's polar
                                                           factor, bf16)
        W <- (1 - lr wd) W - lr 0.2 sqrt(max(m, n)) O

    and AdamW (``betas``, ``eps``, bias-corrected) on the other parameters.

    Notes:
        * The numerics are pytorch-optimizer's (4.1): Newton-Schulz runs in
          bfloat16; no non-finite handling of its own.
        * State: one momentum buffer per Muon weight, Adam's two moments per
          AdamW parameter (about half AdamW's state on a conv net).

    Args:
        params (Iterable): Parameters or parameter groups.
        model (nn.Module, optional): The model (passed by
            ``PrecondOptimWrapperConstructor``), to name the parameters for
            ``adamw_modules``; without it only the shape rule applies.
        lr (float): Learning rate of both halves. Defaults to 2e-3.
        weight_decay (float): Decoupled weight decay of both halves.
            Defaults to 0.05.
        momentum (float): Muon's momentum. Defaults to 0.95.
        nesterov (bool): Nesterov momentum for Muon. Defaults to True.
        ns_steps (int): Newton-Schulz iterations. Defaults to 5.
        use_adjusted_lr (bool): Moonlight's shape scaling (see above); False
            is Keller Jordan's ``sqrt(max(1, m / n))``. Defaults to True.
        betas (tuple[float, float]): AdamW's betas. Defaults to
            ``(0.9, 0.999)`` (torch's AdamW).
        eps (float): AdamW's epsilon. Defaults to 1e-8 (torch's AdamW).
        adamw_modules (tuple[str]): Suffixes (whole dotted parts) of the
            qualified names of modules whose parameters AdamW trains.
            Defaults to :data:`MUON_ADAMW_MODULES`.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(),
        ...                       nn.Linear(8, 2))
        >>> opt = PeerMuon(model.parameters(), model=model, lr=1e-3,
        ...                adamw_modules=('2', ))
        >>> [(g['use_muon'], len(g['params'])) for g in opt.param_groups]
        [(True, 1), (False, 3)]
    """
    requires_model = True

    def __init__(self,
                 params: Iterable,
                 model: Optional[nn.Module] = None,
                 lr: float = 2e-3,
                 weight_decay: float = 0.05,
                 momentum: float = 0.95,
                 nesterov: bool = True,
                 ns_steps: int = 5,
                 use_adjusted_lr: bool = True,
                 betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8,
                 adamw_modules: Iterable[str] = MUON_ADAMW_MODULES) -> None:
        if _MuonBase is Optimizer:  # pragma: no cover - depends on extras
            raise ImportError('PeerMuon needs pytorch-optimizer: '
                              'pip install .[peers]')
        adamw_modules = tuple(adamw_modules)
        owner: Dict[int, str] = {}
        if model is not None:
            for mod_name, module in model.named_modules():
                for p in module.parameters(recurse=False):
                    owner[id(p)] = mod_name
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [dict(params=groups)]
        split: List[Dict[str, Any]] = []
        for group in groups:
            muon, adamw = [], []
            for p in group['params']:
                matrix = p.ndim >= 2 and p.shape[0] > 1 and (
                    p.numel() > p.shape[0])
                head = _suffix_match(owner.get(id(p), ''), adamw_modules)
                (muon if matrix and not head else adamw).append(p)
            rest = {k: v for k, v in group.items() if k != 'params'}
            if muon:
                split.append(dict(rest, params=muon, use_muon=True))
            if adamw:
                split.append(dict(rest, params=adamw, use_muon=False))
        super().__init__(
            split, lr=lr, momentum=momentum, weight_decay=weight_decay,
            nesterov=nesterov, ns_steps=ns_steps,
            use_adjusted_lr=use_adjusted_lr, adamw_lr=lr, adamw_betas=betas,
            adamw_wd=weight_decay, adamw_eps=eps)
        # pytorch-optimizer's Muon keeps only ``foreach`` in ``defaults``;
        # MMEngine's OptimWrapper reads ``defaults['lr']`` (its base lr) when
        # there is more than one group
        self.defaults.update(lr=lr, weight_decay=weight_decay,
                             momentum=momentum, betas=betas, eps=eps)

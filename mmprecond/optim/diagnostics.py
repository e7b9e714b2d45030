# Copyright (c) mmprecond contributors. All rights reserved.
"""Each family's own health measures, for :meth:`EngineProtocol.diagnostics`.

:class:`~mmprecond.engine.PrecondStatsHook` logs what an optimizer's
``diagnostics()`` returns, at its logging interval only.  A measure is
named for what the family stores, so a curve always means something:

================  ===========================================================
``newton_residual``  Newton inverses ``B`` (NKFAC, AdaNKFAC, KFAC, FSGD,
                  FAdam, AFOpt, Ada_AFOpt): max over factors of
                  ``||I - A B||_F`` (4 Gaussian probes) against the current
                  damped factor ``A = S + max(floor, eta lambda_max(S)) I``
                  (``S`` Frobenius-normalised for the feature families):
                  Newton error plus drift since the refresh
                  (:func:`newton_diagnostics`)
``root_error``    inverse ``p``-th roots ``R`` (SGDM_BK, AdamW_BK with
                  ``p = 2``, Shampoo with ``p = 4``): max over factors of
                  ``||R^p (S + lambda I) - I||_F / sqrt(n)``, estimated from
                  4 random unit probes (:func:`root_residual`): the
                  truncation of the fixed Newton–Schulz iterations plus the
                  drift of ``S`` since the refresh; 0 for an exact root
                  (:func:`root_diagnostics`)
``basis_drift``   eigenbases ``Q`` (AdamR): max over factors of
                  ``||B - diag(B)||_F / ||B||_F`` with ``B = Q^T S Q``, the
                  criterion of Distributed Shampoo's eigenbasis refresh: 0
                  while ``Q`` still diagonalises the factor
                  (:func:`basis_drift`)
``lambda_max``,   mean over factors of ``lambda_max(S)`` and of the added
``damping``       damping (the Newton and root families)
================  ===========================================================

Nothing here reads a device value: the results are 0-dim tensors.
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..curvature.capture import factor_dims, gradient_matrix
from ..linalg import estimate_residual, power_iteration_lmax
from ..protocol import CheckpointLayout, Scalar

#: Random probes per factor of the residual estimates.
PROBES = 4


def _generator(gens: Dict[torch.device, torch.Generator],
               device: torch.device) -> torch.Generator:
    """One generator per device, seeded 0 at every call of a diagnostic."""
    if device not in gens:
        gens[device] = torch.Generator(device).manual_seed(0)
    return gens[device]


def _pairs(layer_state: Dict[str, Dict[str, Tensor]], suffix: str
           ) -> List[Tuple[Tensor, Tensor]]:
    """``(statistic, derived)`` of every factor ``k`` with ``k + suffix``."""
    out = []
    for st in layer_state.values():
        for key, stat in st.items():
            derived = st.get(key + suffix)
            if derived is not None and derived.shape == stat.shape:
                out.append((stat, derived))
    return out


def damped_blocks(stat: Tensor, damping: float, damping_floor: float,
                  normalise: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """The damped matrix a Newton-inverse family inverts for ``stat``.

    Returns ``(A, lambda_max, shift)`` with ``A`` as a ``(H, d, d)`` stack:
    ``A = S + max(floor, damping * lambda_max(S)) I``, where ``S`` is the
    statistic itself (NKFAC, AdaNKFAC, KFAC) or, with ``normalise``, its
    Frobenius-normalised form (FSGD, FAdam, AFOpt, Ada_AFOpt), whose
    stacks share one shift over their heads.

    Example:
        >>> import torch
        >>> a, lmax, shift = damped_blocks(torch.eye(3) * 2, 0.1, 1e-8)
        >>> round(float(lmax), 4), round(float(shift), 4), tuple(a.shape)
        (2.0, 0.2, (1, 3, 3))
    """
    blocks = stat.float()
    blocks = blocks.unsqueeze(0) if blocks.dim() == 2 else blocks
    if normalise:
        blocks = blocks / (blocks.square().sum().sqrt() + 1e-12)
    lmax = torch.stack([power_iteration_lmax(b) for b in blocks]).max()
    shift = torch.clamp(damping * lmax, min=damping_floor)
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return blocks + shift * eye, lmax, shift


def newton_diagnostics(layer_state: Dict[str, Dict[str, Tensor]],
                       damping: float, damping_floor: float,
                       normalise: bool = False) -> Dict[str, Scalar]:
    """``lambda_max``, ``damping`` and ``newton_residual`` of stored inverses.

    Args:
        layer_state (dict): The optimizer's per-layer state; every factor
            ``k`` with an inverse ``k + '_inv'`` of its shape is measured.
        damping (float): Relative damping ``eta``.
        damping_floor (float): Lower bound of the added damping.
        normalise (bool): Frobenius-normalise the statistic first (the
            feature families). Defaults to False.

    Returns:
        dict: 0-dim tensors; empty when no inverse is stored yet.
    """
    lmaxes, shifts, residuals = [], [], []
    gens: Dict[torch.device, torch.Generator] = {}
    for stat, inv in _pairs(layer_state, '_inv'):
        a, lmax, shift = damped_blocks(stat, damping, damping_floor, normalise)
        lmaxes.append(lmax)
        shifts.append(shift)
        b = inv.float().reshape(a.shape)
        gen = _generator(gens, a.device)
        residuals += [estimate_residual(ab, bb, generator=gen)
                      for ab, bb in zip(a, b)]
    if not lmaxes:
        return {}
    return dict(lambda_max=torch.stack(lmaxes).mean(),
                damping=torch.stack(shifts).mean(),
                newton_residual=torch.stack(residuals).max())


def root_residual(a: Tensor, root: Tensor, p: int, probes: int = PROBES,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """Estimate of ``||R^p A - I||_F / sqrt(n)`` from ``probes`` mat-vecs.

    For a random unit vector ``v``, ``E||M v||^2 = ||M||_F^2 / n``; the
    estimate is ``sqrt(mean_k ||M v_k||^2)``, exact whenever ``M`` is a
    multiple of an orthogonal matrix (e.g. ``R = c A^{-1/p}``, where it is
    ``|c^p - 1|``).  Cost: ``(p + 1) * probes`` mat-vecs, no ``O(n^3)``
    product.

    Args:
        a (Tensor): ``(n, n)`` damped factor ``S + lambda I``.
        root (Tensor): ``(n, n)`` approximate ``A^{-1/p}``.
        p (int): Root order.
        probes (int): Number of probe vectors. Defaults to 4.
        generator (torch.Generator, optional): RNG for the probes.

    Returns:
        Tensor: 0-dim.

    Example:
        >>> import torch
        >>> a = torch.diag(torch.tensor([1., 4., 16.]))
        >>> exact = torch.diag(torch.tensor([1., 4., 16.]) ** -0.5)
        >>> float(root_residual(a, exact, 2)) < 1e-6
        True
        >>> round(float(root_residual(a, 1.1 * exact, 2)), 4)
        0.21
    """
    v = torch.randn(a.shape[-1], probes, dtype=a.dtype, device=a.device,
                    generator=generator)
    v = v / torch.linalg.vector_norm(v, dim=0, keepdim=True)
    w = a @ v
    for _ in range(int(p)):
        w = root @ w
    return (w - v).square().sum(0).mean().sqrt()


def root_diagnostics(layer_state: Dict[str, Dict[str, Tensor]], p: int,
                     damping: float, relative: bool = True,
                     probes: int = PROBES) -> Dict[str, Scalar]:
    """``lambda_max``, ``damping`` and ``root_error`` of stored inverse roots.

    The damped factor is rebuilt as the root family builds it
    (:func:`~mmprecond.inverse_root.damped_inverse_roots`):
    ``A = S + eps I`` with ``eps = damping * lambda_max(S)`` (relative) or
    ``eps = damping``; ``root_error`` is the max over factors of
    :func:`root_residual` of the stored root ``k + '_root'``.

    Args:
        layer_state (dict): The optimizer's per-layer state.
        p (int): Root order (2: AdaBK, 4: Shampoo).
        damping (float): ``eps`` (relative to ``lambda_max`` or absolute).
        relative (bool): See ``damping``. Defaults to True.
        probes (int): Probe vectors per factor. Defaults to 4.

    Returns:
        dict: 0-dim tensors; empty when no root is stored yet.
    """
    lmaxes, shifts, errors = [], [], []
    gens: Dict[torch.device, torch.Generator] = {}
    for stat, root in _pairs(layer_state, '_root'):
        s = stat.float()
        lmax = power_iteration_lmax(s, 10)
        shift = damping * lmax if relative else lmax.new_tensor(damping)
        a = s + shift * torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)
        lmaxes.append(lmax)
        shifts.append(shift)
        errors.append(root_residual(a, root.float(), p, probes,
                                    _generator(gens, a.device)))
    if not lmaxes:
        return {}
    return dict(lambda_max=torch.stack(lmaxes).mean(),
                damping=torch.stack(shifts).mean(),
                root_error=torch.stack(errors).max())


def basis_offdiagonal(factor: Tensor, basis: Tensor) -> Tensor:
    """``||B - diag(B)||_F / ||B||_F`` with ``B = Q^T S Q`` (0 for ``S = 0``).

    Example:
        >>> import torch
        >>> s = torch.diag(torch.tensor([3., 1.]))
        >>> float(basis_offdiagonal(s, torch.eye(2)))
        0.0
    """
    b = basis.float().transpose(-2, -1) @ factor.float() @ basis.float()
    off = b - torch.diag_embed(b.diagonal(dim1=-2, dim2=-1))
    return (torch.linalg.matrix_norm(off)
            / torch.linalg.matrix_norm(b).clamp_min(1e-30))


def basis_drift(layer_state: Dict[str, Dict[str, Tensor]],
                bases: Tuple[Tuple[str, str], ...]) -> Dict[str, Scalar]:
    """``basis_drift``: max over factors of :func:`basis_offdiagonal`.

    Args:
        layer_state (dict): The optimizer's per-layer state.
        bases (tuple): ``(factor key, basis key)`` pairs, e.g.
            ``(('L', 'U1'), ('R', 'U2'))`` for AdamR.

    Returns:
        dict: A 0-dim tensor; empty before the first basis.
    """
    drifts = [basis_offdiagonal(st[f], st[q]).max()
              for st in layer_state.values() for f, q in bases
              if f in st and q in st and st[f].shape == st[q].shape]
    return dict(basis_drift=torch.stack(drifts).max()) if drifts else {}


def norm_ratios(optimizer) -> List[Tensor]:
    """``||P(G)|| / ||G||`` per layer of a layer-preconditioned optimizer.

    For optimizers whose ``precondition(name, module, grad)`` is a pure
    function of the gradient and the stored state, with optional
    gradient-norm recovery (switched off while measuring).  No sync.
    """
    ratios = []
    recovery = optimizer.grad_norm_recovery
    optimizer.grad_norm_recovery = False
    try:
        with torch.no_grad():
            for name, module in optimizer.layers.items():
                g = gradient_matrix(module)
                if g is None:
                    continue
                pg = optimizer.precondition(name, module, g)
                if pg is not None:
                    g = g.float()
                    ratios.append(pg.norm() / (g.norm() + 1e-12))
    finally:
        optimizer.grad_norm_recovery = recovery
    return ratios


def kronecker_layout(optimizer, derived_kind: str = 'inverses'
                     ) -> CheckpointLayout:
    """:class:`CheckpointLayout` of a :class:`PrecondOptimizer` (shapes only).

    Factors are the sides :meth:`capture_sides` collects, for every
    preconditioned layer.
    """
    factors = []
    for name, module in optimizer.layers.items():
        d_out, d_in = factor_dims(module)
        want_x, want_g = optimizer.capture_sides(module)
        for side, d, want in (('L', d_out, want_g), ('R', d_in, want_x)):
            if want:
                factors.append((f'{name}.{side}', d))
    return CheckpointLayout(
        per_param_buffers=2 if optimizer.base == 'adamw' else 1,
        factors=factors, derived_kind=derived_kind,
        derived_mode=getattr(optimizer, 'checkpoint_inverses', True))

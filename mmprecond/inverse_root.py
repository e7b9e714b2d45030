# Copyright (c) mmprecond contributors. All rights reserved.
"""Batched inverse matrix roots by the coupled Newton–Schulz iteration.

The routines here work on a *batch* of equal-size symmetric positive
definite matrices ``(B, n, n)`` with batched matrix products
(``torch.baddbmm`` / ``torch.bmm``), so that a refresh over many layers is a
handful of kernel launches per size instead of a Python loop over layers.
:func:`inverse_roots` groups a list of matrices of mixed sizes by size.

The iteration (Higham, *Functions of Matrices*, eq. 6.35; the "Schur–Newton"
iteration of Yong et al., *A General Regret Bound of Preconditioned Gradient
Method for DNN Training*, CVPR 2023, eq. 17) is, with ``A`` normalised by its
trace::

    Y_0 = A / tr(A),   Z_0 = I
    T_k = (3 I - Z_{k-1} Y_{k-1}) / 2
    Y_k = Y_{k-1} T_k,  Z_k = T_k Z_{k-1}
    A^{1/2} ~ Y_K sqrt(tr A),   A^{-1/2} ~ Z_K / sqrt(tr A)

``A^{-1/4}`` (Shampoo) is ``(A^{1/2})^{-1/2}``: two nested runs.

A fixed, small ``K`` does not converge for eigenvalues far below the trace:
for ``s = lambda / tr(A)`` the returned gain is ``~ s^{-1/2}`` only down to
``s ~ 1e-3`` with ``K = 10``.  AdaBK relies on exactly that truncation (it
acts as extra damping), so the number of iterations is the caller's choice
and nothing here "upgrades" it.

Example:
    >>> import torch
    >>> from mmprecond.inverse_root import inverse_root
    >>> a = torch.diag(torch.tensor([1., 2., 4.]))[None]
    >>> z = inverse_root(a, 2, iters=30)
    >>> bool(torch.allclose(z[0].diagonal(), torch.tensor([1., 2., 4.])**-0.5))
    True
"""
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from .linalg import _eye_like, power_iteration_lmax

#: Trace below which a matrix is treated as zero (its root is not defined).
_TINY = 1e-30


def coupled_newton_schulz(a: Tensor, iters: int = 10) -> Tuple[Tensor, Tensor]:
    """``(A^{1/2}, A^{-1/2})`` of a batch of SPD matrices, from scratch.

    Args:
        a (Tensor): ``(B, n, n)`` symmetric positive definite matrices.
        iters (int): Number of iterations ``K``. Defaults to 10.

    Returns:
        tuple[Tensor, Tensor]: ``Y_K sqrt(tr A)`` and ``Z_K / sqrt(tr A)``,
        each ``(B, n, n)``.  A matrix with (near) zero trace gives non-finite
        values, which the caller detects.
    """
    if a.dim() != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f'expected a (B, n, n) batch, got {tuple(a.shape)}')
    if int(iters) < 1:
        raise ValueError(f'Invalid iters: {iters} (>= 1)')
    tr = a.diagonal(dim1=-2, dim2=-1).sum(-1)
    tr = torch.where(tr > _TINY, tr, torch.full_like(tr, float('nan')))
    y = a / tr[:, None, None]
    eye = _eye_like(a).expand_as(a)
    z = eye.clone()
    for _ in range(int(iters)):
        t = torch.baddbmm(eye, z, y, beta=1.5, alpha=-0.5)
        y = torch.bmm(y, t)
        z = torch.bmm(t, z)
    root = tr.sqrt()[:, None, None]
    return y * root, z / root


def inverse_root(a: Tensor, p: int, iters: int = 10) -> Tensor:
    """``A^{-1/p}`` for ``p`` in ``{2, 4}`` of a batch of SPD matrices.

    ``p = 2`` is one coupled Newton–Schulz run; ``p = 4`` takes the inverse
    square root of the square root, each with ``iters`` iterations.

    Args:
        a (Tensor): ``(B, n, n)`` SPD matrices.
        p (int): Root order, 2 or 4.
        iters (int): Iterations per Newton–Schulz run. Defaults to 10.
    """
    if p == 2:
        return coupled_newton_schulz(a, iters)[1]
    if p == 4:
        sqrt, _ = coupled_newton_schulz(a, iters)
        sqrt = 0.5 * (sqrt + sqrt.transpose(-1, -2))
        return coupled_newton_schulz(sqrt, iters)[1]
    raise ValueError(f'Invalid root order p={p} (2 or 4)')


def damped_inverse_roots(a: Tensor, p: int, damping: float, iters: int,
                         relative: bool = True) -> Tensor:
    """``(A + eps I)^{-1/p}`` for a batch, ``eps = damping * lambda_max(A)``.

    Args:
        a (Tensor): ``(B, n, n)`` symmetric PSD matrices.
        p (int): Root order, 2 or 4.
        damping (float): ``eps`` relative to ``lambda_max`` (AdaBK) when
            ``relative``, else absolute (Shampoo).
        iters (int): Newton–Schulz iterations per run.
        relative (bool): See ``damping``. Defaults to True.
    """
    if relative:
        # 10 power steps from the package's fixed start vector
        shift = damping * power_iteration_lmax(a, 10)
    else:
        shift = torch.full((a.shape[0], ), damping, dtype=a.dtype, device=a.device)
    damped = a + shift[:, None, None] * _eye_like(a)
    return inverse_root(damped, p, iters)


def inverse_roots(mats: List[Tensor], p: int, damping: float, iters: int,
                  relative: bool = True) -> Tuple[List[Tensor], List[bool]]:
    """Damped inverse roots of matrices of mixed sizes, batched per size.

    Matrices of equal size and dtype are stacked and processed by one call
    of :func:`damped_inverse_roots`.  The result of a matrix whose root came
    out non-finite (a zero or non-finite factor) is the identity, and its
    flag in the second list is ``False`` so the caller can count it.

    Args:
        mats (list[Tensor]): Square symmetric PSD matrices.
        p, damping, iters, relative: As in :func:`damped_inverse_roots`.

    Returns:
        tuple[list[Tensor], list[bool]]: Roots in input order, and whether
        each was finite.
    """
    groups: Dict[Tuple, List[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((m.shape[-1], m.dtype, m.device), []).append(i)
    out: List[Tensor] = [mats[0]] * len(mats) if mats else []
    ok = [True] * len(mats)
    for idx in groups.values():
        batch = torch.stack([mats[i] for i in idx])
        roots = damped_inverse_roots(batch, p, damping, iters, relative)
        finite = torch.isfinite(roots).flatten(1).all(1).tolist()
        eye = _eye_like(roots[0])
        for j, i in enumerate(idx):
            ok[i] = bool(finite[j])
            out[i] = roots[j] if ok[i] else eye.clone()
    return out, ok

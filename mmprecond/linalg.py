# Copyright (c) mmprecond contributors. All rights reserved.
"""Dense linear algebra for Kronecker factors.

Everything here works on one symmetric positive (semi-)definite matrix at a
time and knows nothing about layers, hooks or optimizers.  Factors are kept in
fp32; the routines that can fail numerically (``inv``, ``eigh``) retry in
fp64 and report what they did through :class:`~mmprecond.logging.FallbackLog`
so the caller can count it.

Example:
    >>> import torch
    >>> from mmprecond.linalg import damp, exact_inverse, newton_inverse
    >>> a = torch.diag(torch.tensor([1., 2., 4.]))
    >>> b = exact_inverse(damp(a, 0.01))
    >>> b2, res = newton_inverse(damp(a, 0.01), b * 0.9, steps=3)
    >>> bool(torch.allclose(b2, b, atol=1e-3))
    True
"""
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .logging import FallbackLog

_START_VECTORS: Dict[Tuple[int, torch.dtype, torch.device], Tensor] = {}


def _start_vector(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fixed pseudo-random unit vector of length ``n`` (same on every rank)."""
    key = (n, dtype, device)
    v = _START_VECTORS.get(key)
    if v is None:
        gen = torch.Generator().manual_seed(n)
        v = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        v = (v / v.norm()).to(dtype=dtype, device=device)
        _START_VECTORS[key] = v
    return v


def power_iteration_lmax(a: Tensor, num_iters: int = 10) -> Tensor:
    """Largest eigenvalue of a symmetric PSD matrix by power iteration.

    Runs ``num_iters`` iterations (10, as in the authors' NKFAC code) and
    returns ``||A v||`` for the last unit iterate ``v``; for a PSD matrix
    this never exceeds the true value.

    The authors' code starts from the all-ones vector.  That start is
    *exactly* orthogonal to the range of the output-gradient factor of every
    softmax classifier (cross-entropy gradients sum to zero over the
    classes, so ``Delta Delta^T 1 = 0``): the iteration then amplifies
    round-off and the estimate depends on the BLAS thread count.  Here the
    start is a fixed pseudo-random vector seeded by the size, deterministic
    and identical on every rank.

    Args:
        a (Tensor): Square symmetric matrix.
        num_iters (int): Number of iterations. Defaults to 10.

    Returns:
        Tensor: 0-dim tensor, the estimate (``0`` for the zero matrix).
    """
    v = _start_vector(a.shape[0], a.dtype, a.device)
    lam = a.new_zeros(())
    for _ in range(num_iters):
        w = a @ v
        lam = w.norm()
        if not torch.isfinite(lam) or lam == 0:
            break
        v = w / lam
    return lam


def damp(a: Tensor,
         damping: float,
         floor: float = 1e-4,
         lmax: Optional[Tensor] = None) -> Tensor:
    """Return ``a + max(floor, damping * lambda_max(a)) * I`` (thesis eq. 3.8).

    Args:
        a (Tensor): Symmetric PSD matrix.
        damping (float): Relative damping ``eta``.
        floor (float): Absolute lower bound on the added multiple of ``I``.
        lmax (Tensor, optional): Pre-computed largest eigenvalue.
    """
    if lmax is None:
        lmax = power_iteration_lmax(a)
    shift = torch.clamp(damping * lmax, min=floor)
    out = a.clone()
    out.diagonal().add_(shift)
    return out


def exact_inverse(a: Tensor, log: Optional[FallbackLog] = None) -> Tensor:
    """Inverse of an SPD matrix, in its own dtype with an fp64 retry.

    Tries a Cholesky-based inverse first (the matrix is damped, hence SPD);
    if that fails or yields non-finite values it retries in fp64, and finally
    with ten times the diagonal's mean added.  Each retry is recorded in
    ``log`` under ``'inverse_fp64_retry'`` / ``'inverse_extra_damping'``.

    Args:
        a (Tensor): Symmetric positive definite matrix.
        log (FallbackLog, optional): Where fallbacks are counted.

    Returns:
        Tensor: ``a^{-1}`` in ``a.dtype``.
    """

    def _try(m: Tensor) -> Optional[Tensor]:
        try:
            chol, info = torch.linalg.cholesky_ex(m)
            if int(info) != 0:
                return None
            inv = torch.cholesky_inverse(chol)
        except RuntimeError:
            return None
        return inv if bool(torch.isfinite(inv).all()) else None

    out = _try(a)
    if out is not None:
        return out
    if log is not None:
        log.record('inverse_fp64_retry',
                   'Cholesky inverse failed in fp32; retried in fp64.')
    out = _try(a.double())
    if out is None:
        if log is not None:
            log.record('inverse_extra_damping',
                       'fp64 inverse failed; retried with extra damping.')
        m = a.double().clone()
        m.diagonal().add_(10 * m.diagonal().abs().mean() + 1e-6)
        out = _try(m)
        if out is None:
            raise FloatingPointError('could not invert a damped factor; it '
                                     'contains non-finite values')
    return out.to(a.dtype)


def newton_inverse(a: Tensor, b: Tensor, steps: int = 1) -> Tuple[Tensor, Tensor]:
    """Warm-started Newton–Schulz iteration for ``a^{-1}`` (thesis Alg. 2).

    Each step computes ``T = B A`` and

    * ``B <- 2B - T B``                      if ``||I - T||_F < 1``,
    * ``B <- (1 + s) B - s T B``, ``s = 1/||T||_F``   otherwise,

    i.e. the damped step of eq. 3.10 whenever the warm start lies outside
    the region where plain Newton provably converges.  The test uses the
    current iterate and the Frobenius norm, as the authors' code does
    (identical to the thesis' test for ``steps == 1``).

    Args:
        a (Tensor): SPD matrix to invert (already damped).
        b (Tensor): Warm start, usually the previous inverse.
        steps (int): Number of Newton steps ``K``. Defaults to 1.

    Returns:
        tuple[Tensor, Tensor]: The new iterate and the Frobenius residual
        ``||I - B A||_F`` of the warm start (free to compute; used by the
        caller's divergence guard).
    """
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    first_residual = a.new_tensor(float('nan'))
    for k in range(steps):
        t = b @ a
        residual = torch.linalg.matrix_norm(eye - t)
        if k == 0:
            first_residual = residual
        if residual < 1:
            b = 2 * b - t @ b
        else:
            s = 1.0 / torch.linalg.matrix_norm(t)
            b = (1 + s) * b - s * (t @ b)
    return b, first_residual


def estimate_residual(a: Tensor, b: Tensor, probes: int = 4,
                      generator: Optional[torch.Generator] = None) -> Tensor:
    """Unbiased estimate of ``||I - A B||_F`` from ``probes`` mat-vecs.

    For a standard Gaussian ``v``, ``E||M v||^2 = ||M||_F^2``, so the cost is
    ``O(probes * d^2)`` instead of the ``O(d^3)`` of forming ``A B``.

    Args:
        a (Tensor): Square matrix.
        b (Tensor): Approximate inverse of ``a``.
        probes (int): Number of random probe vectors.
        generator (torch.Generator, optional): RNG for the probes.
    """
    v = torch.randn(a.shape[0], probes, dtype=a.dtype, device=a.device,
                    generator=generator)
    r = v - a @ (b @ v)
    return (r.pow(2).sum() / probes).sqrt()


def safe_eigh(a: Tensor, log: Optional[FallbackLog] = None,
              dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition with retries.

    Computes in ``dtype`` (fp64 by default, as the AdamR notes recommend);
    on failure retries with a tiny diagonal jitter, then on the CPU.  Each
    retry is recorded in ``log`` under ``'eigh_retry'``.

    Returns:
        tuple[Tensor, Tensor]: Eigenvalues (ascending) and eigenvectors, in
        ``a.dtype``.
    """
    m = a.to(dtype)
    m = 0.5 * (m + m.T)
    try:
        vals, vecs = torch.linalg.eigh(m)
        if bool(torch.isfinite(vecs).all()):
            return vals.to(a.dtype), vecs.to(a.dtype)
    except RuntimeError:
        pass
    if log is not None:
        log.record('eigh_retry', 'eigh failed; retried with jitter on CPU.')
    jitter = 1e-7 * (m.diagonal().abs().mean() + 1)
    m = m.cpu() + jitter * torch.eye(m.shape[0], dtype=m.dtype)
    vals, vecs = torch.linalg.eigh(m)
    return vals.to(a.dtype).to(a.device), vecs.to(a.dtype).to(a.device)

# Copyright (c) mmprecond contributors. All rights reserved.
"""Dense linear algebra for Kronecker factors, one matrix or a batch at once.

Every routine takes a square symmetric matrix ``(n, n)`` or a batch
``(..., n, n)`` of equal-sized ones and knows nothing about layers, hooks or
optimizers.  A preconditioner refresh stacks the factors of one size and
calls each routine once per size, so it launches ``O(distinct sizes)``
kernels rather than ``O(factors)`` on an accelerator (on the CPU, batches
are kept cache-sized, see :func:`batch_limit`).

Factors are kept in fp32.  The routines that can fail numerically retry
*per matrix* (fp64, then extra damping for inverses; diagonal jitter on the
CPU for ``eigh``) and report what happened to each matrix as bit
:data:`FLAGS` in an integer tensor, so one bad factor never changes the
result of the others in its batch.  :func:`record_flags` turns those bits
into :class:`~mmprecond.logging.FallbackLog` counts (one per matrix).  The
batched routines read the device at most a constant number of times per
call (one ``all ok?`` read decides whether any retry is needed), never once
per matrix.

Example:
    >>> import torch
    >>> from mmprecond.linalg import (damp, exact_inverse, lanczos_lmax,
    ...                               newton_inverse)
    >>> a = torch.diag(torch.tensor([1., 2., 4.]))
    >>> b = exact_inverse(damp(a, 0.01))
    >>> b2, res = newton_inverse(damp(a, 0.01), b * 0.9, steps=3)
    >>> bool(torch.allclose(b2, b, atol=1e-3))
    True
    >>> batch = torch.stack([a, 2 * a])            # one call for both
    >>> [round(x, 4) for x in lanczos_lmax(batch).tolist()]
    [4.0, 8.0]
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .logging import FallbackLog

#: Bits of the per-matrix status returned by the batched routines.
FP64_RETRY = 1
EXTRA_DAMPING = 2
INVERSE_FAILED = 4
NEWTON_FALLBACK = 8
EIGH_RETRY = 16
EIGH_FAILED = 32

#: ``bit -> (FallbackLog kind, message logged the first time)``.
FLAGS: Dict[int, Tuple[str, str]] = {
    FP64_RETRY: ('inverse_fp64_retry',
                 'Cholesky inverse failed in fp32; retried in fp64.'),
    EXTRA_DAMPING: ('inverse_extra_damping',
                    'fp64 inverse failed; retried with extra damping.'),
    INVERSE_FAILED: ('inverse_failure',
                     'a damped factor could not be inverted (it contains '
                     'non-finite values); its previous inverse is kept.'),
    NEWTON_FALLBACK: ('newton_fallback',
                      'Newton inverse did not improve the residual or was '
                      'not finite; exact inverse used.'),
    EIGH_RETRY: ('eigh_retry', 'eigh failed; retried with jitter on CPU.'),
    EIGH_FAILED: ('eigh_failure',
                  'eigh of a factor failed (non-finite entries, or no '
                  'convergence even with jitter on the CPU).'),
}

#: Bytes of the factors batched together on the CPU (see :func:`batch_limit`).
CPU_BATCH_BYTES = 1 << 20

_START_VECTORS: Dict[Tuple[int, torch.dtype, torch.device], Tensor] = {}


def _start_vector(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fixed pseudo-random unit vector ``(n, 1)`` (same on every rank)."""
    key = (n, dtype, device)
    v = _START_VECTORS.get(key)
    if v is None:
        gen = torch.Generator().manual_seed(n)
        v = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        v = (v / v.norm()).to(dtype=dtype, device=device)
        _START_VECTORS[key] = v
    return v


def _as_batch(a: Tensor) -> Tensor:
    """``a`` viewed as ``(B, n, n)``."""
    return a.reshape(-1, a.shape[-2], a.shape[-1])


def _eye_like(a: Tensor) -> Tensor:
    return torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)


def _all_finite(a: Tensor) -> Tensor:
    """Per-matrix finiteness of a ``(B, n, n)`` batch, shape ``(B,)``."""
    return torch.isfinite(a).flatten(1).all(1)


def batch_limit(n: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many ``n x n`` matrices to stack into one batch.

    Unlimited on an accelerator, where a launch costs more than the work of
    a small matrix.  On the CPU launches are cheap, while the memory-bound
    passes of a refresh (mat-vecs, damping, checks, the stacking itself)
    run faster on matrices that stay in cache, and fresh allocations of
    tens of MB cost page faults: batches of about :data:`CPU_BATCH_BYTES`
    there (at least one matrix; 1 MiB, half a core's L2 on the machine it
    was tuned on, beat 4 and 16 MiB).  On the R50-FPN factors up to 1025 wide
    (``benchmarks/bench_inverse.py``, 1 thread) whole-size batches ran
    slower than one call per factor; capped ones run at par or faster.

    Example:
        >>> batch_limit(256, torch.float32, torch.device('cpu'))
        4
    """
    if torch.device(device).type != 'cpu':
        return 1 << 62
    item = n * n * torch.finfo(dtype).bits // 8
    return max(1, CPU_BATCH_BYTES // max(1, item))


def record_flags(log: Optional[FallbackLog], flags: Tensor) -> List[int]:
    """Count each matrix's fallbacks in ``log``; return the flags as ints.

    One host read for the whole batch, however many matrices it holds.

    Args:
        log (FallbackLog, optional): Where the events are counted.
        flags (Tensor): Integer-valued status bits (any dtype), one per
            matrix, from a batched routine of this module.
    """
    codes = [int(c) for c in flags.reshape(-1).tolist()]
    if log is not None:
        for bit, (kind, message) in FLAGS.items():
            n = sum(1 for c in codes if c & bit)
            if n:
                log.record(kind, message, n=n)
    return codes


# ------------------------------------------------------------- lambda_max
def lanczos_lmax(a: Tensor, steps: int = 10) -> Tensor:
    """Largest eigenvalue of symmetric PSD matrices by the Lanczos method.

    ``steps`` mat-vecs build an orthonormal Krylov basis ``Q`` (fully
    re-orthogonalised, twice, so rounding does not create spurious copies
    of converged eigenvalues; a matrix whose Krylov space becomes invariant
    to working precision stops there) and the result is the largest
    eigenvalue of the small tridiagonal ``T = Q^T A Q``.  By Cauchy interlacing it never
    exceeds ``lambda_max(A)`` in exact arithmetic; in floating point the
    excess is bounded by rounding, ``O(n eps ||A||)`` (about ``1e-6``
    relative in fp32 for the factor sizes of a detector).

    Why Lanczos and 10 steps: the authors' NKFAC code estimates
    ``lambda_max`` with 10 loops of two mat-vecs each (20 mat-vecs of power
    iteration, :func:`power_iteration_lmax`).  Power iteration converges as
    ``(lambda_2 / lambda_1)^k``, slowly on the flat top end of a Gram
    matrix: on a 385-wide factor of 3080 Gaussian rows it reads 8 % low
    after 10 mat-vecs and 4 % low after 20.  Ten Lanczos steps read 1 % low
    there and are at least as accurate as 20 power mat-vecs on every
    spectrum in ``tests/test_linalg.py``, at half the mat-vecs (the extra
    work, ``O(n steps^2)`` for re-orthogonalisation and one tiny ``eigvalsh``
    per batch, is negligible next to ``O(n^2)`` per mat-vec).

    Start vector: the authors' code starts from the all-ones vector.  That
    start is *exactly* orthogonal to the range of the output-gradient factor
    of every softmax classifier (cross-entropy gradients sum to zero over
    the classes, so ``Delta Delta^T 1 = 0``): the iteration then amplifies
    round-off and the estimate depends on the BLAS thread count.  Here the
    start is a fixed pseudo-random vector seeded by the size, deterministic
    and identical on every rank.

    Args:
        a (Tensor): ``(n, n)`` or ``(..., n, n)`` symmetric PSD matrices.
        steps (int): Number of mat-vecs (Krylov dimension). Defaults to 10.

    Returns:
        Tensor: Shape ``a.shape[:-2]``: the estimates (``0`` for a zero
        matrix, NaN for a matrix with non-finite entries).

    Example:
        >>> a = torch.diag(torch.arange(1., 101.))
        >>> float(lanczos_lmax(a))  # doctest: +ELLIPSIS
        99.9...
    """
    m = _as_batch(a)
    batch, n = m.shape[0], m.shape[-1]
    k = max(1, min(int(steps), n))
    q = _start_vector(n, m.dtype, m.device).expand(batch, n, 1)
    basis = m.new_zeros(batch, n, k)
    basis[:, :, :1] = q
    alpha = m.new_zeros(batch, k)
    beta = m.new_zeros(batch, k)
    # a residual below this fraction of ||A q|| is rounding: the Krylov
    # space is invariant (to working precision) and the iteration stops
    breakdown = torch.finfo(m.dtype).eps**0.5
    for j in range(k):
        w = torch.bmm(m, q)
        alpha[:, j] = (q * w).sum((1, 2))
        if j == k - 1:
            break
        scale = torch.linalg.vector_norm(w, dim=(1, 2), keepdim=True)
        done = basis[:, :, :j + 1]
        for _ in range(2):  # "twice is enough" (Kahan-Parlett)
            w = w - torch.bmm(done, torch.bmm(done.transpose(1, 2), w))
        b = torch.linalg.vector_norm(w, dim=(1, 2), keepdim=True)
        live = b > breakdown * scale
        beta[:, j] = torch.where(live, b, 0).view(batch)
        # stopped: q = 0, so the rest of T stays 0 and adds only eigenvalue 0
        q = torch.where(live, w / torch.where(live, b, 1), 0)
        basis[:, :, j + 1:j + 2] = q
    t = (torch.diag_embed(alpha) + torch.diag_embed(beta[:, :k - 1], 1)
         + torch.diag_embed(beta[:, :k - 1], -1)).double()
    finite = _all_finite(t)
    t = torch.where(finite[:, None, None], t, 0)
    lmax = torch.linalg.eigvalsh(t)[:, -1].clamp_min(0)
    lmax = torch.where(finite, lmax, float('nan'))
    return lmax.to(a.dtype).reshape(a.shape[:-2])


def power_iteration_lmax(a: Tensor, num_iters: int = 20) -> Tensor:
    """Largest eigenvalue of symmetric PSD matrices by power iteration.

    The estimator of the authors' NKFAC code: ``num_iters`` mat-vecs (their
    10 loops of two), returning ``||A v||`` for the last unit iterate
    ``v``; for PSD input it never exceeds the true value (up to rounding).
    It is the reference the package's :func:`lanczos_lmax` is compared
    with, and (10 steps) the ``lambda_max`` of AdaBK's relative damping in
    :mod:`mmprecond.inverse_root`; see :func:`lanczos_lmax` for the start
    vector.

    Args:
        a (Tensor): ``(n, n)`` or ``(..., n, n)`` symmetric matrices.
        num_iters (int): Number of mat-vecs. Defaults to 20.

    Returns:
        Tensor: Shape ``a.shape[:-2]``, the estimates (``0`` for a zero
        matrix).
    """
    m = _as_batch(a)
    v = _start_vector(m.shape[-1], m.dtype, m.device).expand(m.shape[0], -1, -1)
    lam = m.new_zeros(m.shape[0], 1, 1)
    for _ in range(num_iters):
        w = torch.bmm(m, v)
        lam = torch.linalg.vector_norm(w, dim=(1, 2), keepdim=True)
        v = torch.where(lam > 0, w / torch.where(lam > 0, lam, 1), v)
    return lam.reshape(a.shape[:-2])


def damp(a: Tensor,
         damping: float,
         floor: float = 1e-4,
         lmax: Optional[Tensor] = None) -> Tensor:
    """Return ``a + max(floor, damping * lambda_max(a)) * I`` (thesis eq. 3.8).

    Args:
        a (Tensor): ``(n, n)`` or ``(..., n, n)`` symmetric PSD matrices.
        damping (float): Relative damping ``eta``.
        floor (float): Absolute lower bound on the added multiple of ``I``.
        lmax (Tensor, optional): Pre-computed largest eigenvalues, shape
            ``a.shape[:-2]``; :func:`lanczos_lmax` by default.
    """
    if lmax is None:
        lmax = lanczos_lmax(a)
    shift = torch.clamp(damping * lmax, min=floor)
    out = a.clone()
    out.diagonal(dim1=-2, dim2=-1).add_(shift.unsqueeze(-1))
    return out


# ----------------------------------------------------------------- inverse
def _cholesky_inverse(m: Tensor) -> Tuple[Tensor, Tensor]:
    """Inverses of a ``(B, n, n)`` batch and a ``(B,)`` success mask."""
    chol, info = torch.linalg.cholesky_ex(m)
    ok = info == 0
    # a failed factorisation may hold a zero pivot, which cholesky_inverse
    # rejects for the whole batch: invert the identity there instead
    chol = torch.where(ok[:, None, None], chol, _eye_like(m))
    inv = torch.cholesky_inverse(chol)
    return inv, ok & _all_finite(inv)


def exact_inverse_batch(a: Tensor) -> Tuple[Tensor, Tensor]:
    """Inverses of SPD matrices ``(B, n, n)`` with per-matrix retries.

    A batched Cholesky inverse in ``a.dtype`` first.  Only the matrices
    where it failed (Cholesky info, or non-finite output) are retried in
    fp64, and those that still fail once more with ten times their
    diagonal's mean added.  A matrix that fails all three (non-finite
    input) comes back as NaN with :data:`INVERSE_FAILED` set.

    One host read when nothing fails; a few more, independent of ``B``,
    on the retry path.

    Returns:
        tuple[Tensor, Tensor]: The inverses in ``a.dtype`` and the
        ``(B,)`` int32 status bits (:data:`FP64_RETRY`,
        :data:`EXTRA_DAMPING`, :data:`INVERSE_FAILED`).
    """
    inv, ok = _cholesky_inverse(a)
    flags = torch.zeros(a.shape[0], dtype=torch.int32, device=a.device)
    if bool(ok.all()):
        return inv, flags
    bad = (~ok).nonzero().squeeze(1)
    flags[bad] |= FP64_RETRY
    m = a[bad].double()
    retry, ok64 = _cholesky_inverse(m)
    if not bool(ok64.all()):
        still = (~ok64).nonzero().squeeze(1)
        flags[bad[still]] |= EXTRA_DAMPING
        sub = m[still]
        sub.diagonal(dim1=-2, dim2=-1).add_(
            10 * sub.diagonal(dim1=-2, dim2=-1).abs().mean(-1, keepdim=True)
            + 1e-6)
        damped, ok_d = _cholesky_inverse(sub)
        flags[bad[still[~ok_d]]] |= INVERSE_FAILED
        retry[still] = torch.where(ok_d[:, None, None], damped, float('nan'))
    inv[bad] = retry.to(a.dtype)
    return inv, flags


def exact_inverse(a: Tensor, log: Optional[FallbackLog] = None) -> Tensor:
    """Inverse of an SPD matrix (or a batch), with fp64 / damping retries.

    See :func:`exact_inverse_batch`; each retry is recorded in ``log``
    under ``'inverse_fp64_retry'`` / ``'inverse_extra_damping'``, once per
    matrix.

    Args:
        a (Tensor): ``(n, n)`` or ``(..., n, n)`` symmetric positive
            definite matrices.
        log (FallbackLog, optional): Where fallbacks are counted.

    Returns:
        Tensor: ``a^{-1}`` in ``a.dtype``.

    Raises:
        FloatingPointError: If a matrix could not be inverted at all (it
            contains non-finite values).
    """
    inv, flags = exact_inverse_batch(_as_batch(a))
    codes = record_flags(log, flags) if bool(flags.any()) else []
    if any(c & INVERSE_FAILED for c in codes):
        raise FloatingPointError('could not invert a damped factor; it '
                                 'contains non-finite values')
    return inv.reshape(a.shape)


def newton_inverse(a: Tensor, b: Tensor, steps: int = 1) -> Tuple[Tensor, Tensor]:
    """Warm-started Newton–Schulz iteration for ``a^{-1}`` (thesis Alg. 2).

    Each step computes ``T = B A`` and, per matrix of the batch,

    * ``B <- 2B - T B``                      if ``||I - T||_F < 1``,
    * ``B <- (1 + s) B - s T B``, ``s = 1/||T||_F``   otherwise,

    i.e. the damped step of eq. 3.10 whenever the warm start lies outside
    the region where plain Newton provably converges.  Both are
    ``(1 + s) B - s T B`` with ``s = 1`` in the first case, which is how
    the branch is taken per matrix without reading the device.  The test
    uses the current iterate and the Frobenius norm, as the authors' code
    does (identical to the thesis' test for ``steps == 1``).

    Args:
        a (Tensor): SPD matrices to invert (already damped), ``(n, n)`` or
            ``(..., n, n)``.
        b (Tensor): Warm starts, usually the previous inverses.
        steps (int): Number of Newton steps ``K``. Defaults to 1.

    Returns:
        tuple[Tensor, Tensor]: The new iterates and the Frobenius residuals
        ``||I - B A||_F`` of the warm starts (shape ``a.shape[:-2]``).
    """
    shape = a.shape
    a, b = _as_batch(a), _as_batch(b)
    eye = _eye_like(a)
    first_residual = a.new_full(a.shape[:-2], float('nan'))
    for k in range(steps):
        t = b @ a
        e = eye - t
        residual = torch.linalg.matrix_norm(e)
        if k == 0:
            first_residual = residual
        s = torch.where(residual < 1, 1.0,
                        1.0 / torch.linalg.matrix_norm(t))[..., None, None]
        # (1 + s) B - s T B  ==  B + (I - T)(s B): one fused multiply-add,
        # and no cancellation between 2B and TB near convergence
        b = torch.baddbmm(b, e, s * b)
    return b.reshape(shape), first_residual.reshape(shape[:-2])


def estimate_residual(a: Tensor, b: Tensor, probes: int = 4,
                      generator: Optional[torch.Generator] = None,
                      vectors: Optional[Tensor] = None) -> Tensor:
    """Unbiased estimate of ``||I - A B||_F`` from ``probes`` mat-vecs.

    For a standard Gaussian ``v``, ``E||M v||^2 = ||M||_F^2``, so the cost is
    ``O(probes * n^2)`` instead of the ``O(n^3)`` of forming ``A B``.

    Args:
        a (Tensor): ``(n, n)`` or ``(..., n, n)`` matrices.
        b (Tensor): Approximate inverses of ``a``.
        probes (int): Number of random probe vectors.
        generator (torch.Generator, optional): RNG for the probes.
        vectors (Tensor, optional): The probes themselves,
            ``(..., n, probes)``; pass the same ones to compare two ``b``.

    Returns:
        Tensor: Shape ``a.shape[:-2]``.
    """
    if vectors is None:
        vectors = torch.randn(*a.shape[:-1], probes, dtype=a.dtype,
                              device=a.device, generator=generator)
    r = vectors - a @ (b @ vectors)
    return (r.square().sum((-2, -1)) / vectors.shape[-1]).sqrt()


def guarded_newton_inverse(a: Tensor, prev: Tensor, steps: int, probes: Tensor,
                           tol: float) -> Tuple[Tensor, Tensor]:
    """Newton inverses of ``(B, n, n)`` with a per-matrix divergence guard.

    Runs :func:`newton_inverse` from ``prev`` and estimates the residual
    ``||I - A B||_F`` of the warm start and of the result with the *same*
    ``probes`` (a paired comparison).  A matrix whose result is not finite,
    or whose residual grew and is above ``tol``, gets the exact inverse
    instead (flag :data:`NEWTON_FALLBACK`, plus the flags of
    :func:`exact_inverse_batch`).  One host read when no matrix falls back.

    Args:
        a (Tensor): Damped SPD matrices ``(B, n, n)``.
        prev (Tensor): Warm starts ``(B, n, n)``.
        steps (int): Newton steps ``K``.
        probes (Tensor): Probe vectors ``(B, n, p)``.
        tol (float): Residual accepted even without improvement.

    Returns:
        tuple[Tensor, Tensor]: Inverses and ``(B,)`` int32 status bits.
    """
    new, _ = newton_inverse(a, prev, steps)
    before = estimate_residual(a, prev, vectors=probes)
    after = estimate_residual(a, new, vectors=probes)
    # a non-finite result makes its residual estimate non-finite
    good = torch.isfinite(after) & ((after <= before) | (after <= tol))
    flags = torch.zeros(a.shape[0], dtype=torch.int32, device=a.device)
    if bool(good.all()):
        return new, flags
    bad = (~good).nonzero().squeeze(1)
    exact, sub_flags = exact_inverse_batch(a[bad])
    new[bad] = exact
    flags[bad] = sub_flags | NEWTON_FALLBACK
    return new, flags


def refresh_inverse(stats: Tensor,
                    damping: float,
                    floor: float = 1e-4,
                    prev: Optional[Tensor] = None,
                    *,
                    lmax: Optional[Tensor] = None,
                    newton_steps: int = 1,
                    probes: Optional[Tensor] = None,
                    tol: float = 1e-3) -> Tuple[Tensor, Tensor]:
    """Damped inverses of a ``(B, n, n)`` batch of Kronecker factors.

    ``A = S + max(floor, damping * lambda_max(S)) I`` (``lambda_max`` by
    :func:`lanczos_lmax` unless given), then the Cholesky inverse
    (:func:`exact_inverse_batch`) without a warm start, or
    :func:`guarded_newton_inverse` from ``prev``.  Every step is one batched
    call, so refreshing all factors of one size costs one launch of each
    kernel (callers batch at most :func:`batch_limit` factors).

    Args:
        stats (Tensor): Symmetric PSD factors ``(B, n, n)``.
        damping (float): Relative damping ``eta``.
        floor (float): Lower bound of the added multiple of ``I``.
        prev (Tensor, optional): Warm starts ``(B, n, n)``; ``None`` for
            the exact inverse.
        lmax (Tensor, optional): ``(B,)`` largest eigenvalues to damp with.
        newton_steps (int): Newton steps ``K``.
        probes (Tensor, optional): ``(B, n, p)`` probes of the Newton guard
            (required with ``prev``).
        tol (float): Residual the guard accepts without improvement.

    Returns:
        tuple[Tensor, Tensor]: Inverses and ``(B,)`` int32 status bits.
    """
    if prev is not None and probes is None:
        raise ValueError('a warm-started refresh needs the guard\'s probes')
    a = damp(stats, damping, floor, lanczos_lmax(stats) if lmax is None else lmax)
    if prev is None:
        return exact_inverse_batch(a)
    return guarded_newton_inverse(a, prev, newton_steps, probes, tol)


# -------------------------------------------------------------------- eigh
def _eigh_retry(m: Tensor) -> Tuple[Tensor, Tensor, bool]:
    """One matrix's eigh with a tiny diagonal jitter, on the CPU."""
    one = m.cpu()
    one = one + 1e-7 * (one.diagonal().abs().mean() + 1) * torch.eye(
        one.shape[0], dtype=one.dtype)
    try:
        w, v = torch.linalg.eigh(one)
    except RuntimeError:
        return one.new_tensor(float('nan')), one.new_tensor(float('nan')), False
    ok = bool(torch.isfinite(v).all()) and bool(torch.isfinite(w).all())
    return w.to(m.device), v.to(m.device), ok


def eigh_batch(a: Tensor, dtype: torch.dtype = torch.float64
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """Symmetric eigendecompositions of ``(B, n, n)``, retried per matrix.

    One batched ``eigh`` in ``dtype`` (fp64 by default, as AdamR's notes
    recommend) of the symmetrised matrices; a matrix with non-finite
    entries is left out of it and fails (:data:`EIGH_FAILED`).  If the
    batched call raises (LAPACK did not converge for some matrix) the
    matrices of a batch of several are decomposed one at a time to find
    the culprits (a batch of one was that matrix's own attempt).  Only a
    matrix whose own ``eigh`` failed or returned non-finite values is
    retried, with a tiny diagonal jitter on the CPU (:data:`EIGH_RETRY`);
    if that fails too it comes back as NaN (:data:`EIGH_FAILED`).

    Returns:
        tuple[Tensor, Tensor, Tensor]: Eigenvalues (ascending) ``(B, n)``
        and eigenvectors ``(B, n, n)`` in ``a.dtype``, and ``(B,)`` int32
        status bits.
    """
    m = a.to(dtype)
    m = 0.5 * (m + m.transpose(-2, -1))
    finite = _all_finite(m)
    m = torch.where(finite[:, None, None], m, _eye_like(m))
    try:
        vals, vecs = torch.linalg.eigh(m)
    except RuntimeError:  # one bad matrix fails the whole batched call
        vals = m.new_full(m.shape[:-1], float('nan'))
        vecs = torch.full_like(m, float('nan'))
        for i in range(m.shape[0] if m.shape[0] > 1 else 0):  # find it
            try:
                vals[i], vecs[i] = torch.linalg.eigh(m[i])
            except RuntimeError:
                pass
    ok = finite & _all_finite(vecs) & torch.isfinite(vals).all(1)
    flags = torch.where(finite, 0, EIGH_FAILED).to(torch.int32)
    if not bool(ok.all()):
        for i in (~ok & finite).nonzero().squeeze(1).tolist():
            vals[i], vecs[i], fixed = _eigh_retry(m[i])
            flags[i] = EIGH_RETRY if fixed else EIGH_RETRY | EIGH_FAILED
        failed = (flags & EIGH_FAILED) != 0
        vals[failed] = float('nan')
        vecs[failed] = float('nan')
    return vals.to(a.dtype), vecs.to(a.dtype), flags


def safe_eigh(a: Tensor, log: Optional[FallbackLog] = None,
              dtype: torch.dtype = torch.float64) -> Tuple[Tensor, Tensor]:
    """Symmetric eigendecomposition of one matrix or a batch, with retries.

    See :func:`eigh_batch`; retries are recorded in ``log`` under
    ``'eigh_retry'`` (and ``'eigh_failure'``), once per matrix.  A matrix
    that could not be decomposed comes back as NaN.

    Returns:
        tuple[Tensor, Tensor]: Eigenvalues (ascending) and eigenvectors, in
        ``a.dtype``.
    """
    vals, vecs, flags = eigh_batch(_as_batch(a), dtype)
    if bool(flags.any()):
        record_flags(log, flags)
    return vals.reshape(a.shape[:-1]), vecs.reshape(a.shape)

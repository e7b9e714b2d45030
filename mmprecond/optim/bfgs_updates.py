# Copyright (c) mmprecond contributors. All rights reserved.
"""BFGS building blocks of K-BFGS (Ren, Bahamou and Goldfarb; Yi Ren's thesis).

* :func:`bfgs_update`: the inverse-Hessian BFGS update
  ``H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T``, ``rho = 1/s^T y``.
* :func:`powell_lm_damping`: the double damping ``D_P D_LM`` (thesis
  Algorithm 8): Powell's damping on ``H`` then Levenberg-Marquardt damping,
  which guarantees ``s~^T y~ >= mu2 ||s~||^2``.
* :class:`CompactLBFGS`: L-BFGS kept as ``p`` pairs and applied in the
  compact ("non-loop") form of Byrd, Nocedal and Schnabel (1994), two
  matrix products of ``O(p d n)`` per application.
* :func:`hessian_action`: ``A s`` for the Kronecker input factor
  ``A = E_n[sum_t a_t a_t^T]`` of a Linear / Conv2d layer, from the layer
  input of one minibatch, without forming ``A`` or the im2col patches.

Every function is branch-free on tensor values (``torch.where``), so none of
them reads a device value.

Example:
    >>> import torch
    >>> H = torch.eye(3)
    >>> s, y = torch.randn(3), torch.randn(3)
    >>> s2, y2 = powell_lm_damping(s, y, H @ y, mu1=0.2, mu2=0.5)
    >>> bool(s2 @ y2 >= 0.5 * (s2 @ s2) - 1e-6)
    True
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def bfgs_update(H: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """One BFGS update of an inverse-Hessian approximation.

    ``H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T`` with
    ``rho = 1 / s^T y``, expanded for a symmetric ``H`` as
    ``H - rho (s (Hy)^T + (Hy) s^T) + (rho^2 y^T H y + rho) s s^T``
    (``O(d^2)``, no ``d x d`` product).  The update is invariant to
    scaling ``s`` and ``y`` together, so both are divided by ``||s||`` first:
    a pair of tiny vectors (the mean pre-activation of a layer followed by
    BatchNorm hardly moves) would otherwise overflow ``rho^2`` in fp32.
    The caller guarantees ``s^T y > 0`` (e.g. with
    :func:`powell_lm_damping`) and discards a non-finite result.

    Args:
        H (Tensor): ``(d, d)`` symmetric approximation of the inverse.
        s (Tensor): ``(d,)`` step.
        y (Tensor): ``(d,)`` change of gradient (or Hessian action).

    Returns:
        Tensor: The updated ``(d, d)`` matrix (a new tensor).
    """
    norm = torch.linalg.vector_norm(s)
    s = s / norm
    y = y / norm
    hy = H @ y
    rho = 1.0 / (s @ y)
    coef = rho * rho * (y @ hy) + rho
    out = H - rho * (torch.outer(s, hy) + torch.outer(hy, s))
    return out.add_(torch.outer(s, s) * coef)


def powell_lm_damping(s: Tensor, y: Tensor, hy: Tensor, mu1: float,
                      mu2: float) -> Tuple[Tensor, Tensor]:
    """Double damping ``D_P D_LM(s, y; H, mu1, mu2)`` (thesis Algorithm 8).

    ::

        theta1 = (1 - mu1) y^T H y / (y^T H y - s^T y)  if s^T y < mu1 y^T H y
                 1                                       otherwise
        s~ = theta1 s + (1 - theta1) H y        # Powell's damping on H
        y~ = y + mu2 s~                         # LM damping on H^{-1}

    After the first line ``s~^T y >= mu1 y^T H y >= 0``, hence
    ``s~^T y~ >= mu2 ||s~||^2``.

    Args:
        s (Tensor): ``(d,)`` step.
        y (Tensor): ``(d,)`` change of gradient.
        hy (Tensor): ``H y`` for the current inverse approximation ``H``.
        mu1 (float): Powell threshold in ``(0, 1)`` (0.2 in the thesis).
        mu2 (float): LM damping ``> 0`` (``lambda_G`` in K-BFGS).

    Returns:
        tuple[Tensor, Tensor]: ``(s~, y~)``.
    """
    sy = s @ y
    yhy = y @ hy
    damp = sy < mu1 * yhy
    denom = torch.where(damp, yhy - sy, torch.ones_like(yhy))
    theta = torch.where(damp, (1.0 - mu1) * yhy / denom, torch.ones_like(yhy))
    s_t = theta * s + (1.0 - theta) * hy
    return s_t, y + mu2 * s_t


class CompactLBFGS:
    """Limited-memory BFGS inverse in the compact representation.

    With the ``k <= p`` stored pairs as columns of ``S, Y`` (oldest first),
    ``H0 = h0 I``, ``R`` the upper triangle of ``S^T Y`` and
    ``D = diag(s_i^T y_i)`` (Byrd, Nocedal and Schnabel 1994, Eq. 3.1)::

        H = H0 + [S  H0 Y] [[R^-T (D + Y^T H0 Y) R^-1, -R^-T],
                            [-R^-1,                     0   ]] [S^T; Y^T H0]

    which equals ``k`` BFGS updates of ``H0`` with those pairs.  The small
    ``2k x 2k`` middle matrix is rebuilt (in fp64) only when a pair is added;
    :meth:`apply` then costs two ``(d x 2k) @ (2k x n)``-type products.

    The state lives in plain tensors (``S``, ``Y``, ``count``) so it goes
    into the optimizer's ``state_dict`` unchanged.

    Args:
        dim (int): ``d``.
        history (int): ``p``, the number of pairs kept (100 in the thesis).
        h0 (float): Scale of the initial matrix ``H0 = h0 I``.
        device, dtype: Where the pairs live.

    Example:
        >>> lb = CompactLBFGS(4, history=3, h0=1.0)
        >>> s = torch.randn(4); lb.push(s, 2 * s)
        >>> torch.allclose(lb.apply(s[:, None])[:, 0], 0.5 * s, atol=1e-6)
        True
    """

    def __init__(self, dim: int, history: int, h0: float,
                 device: Optional[torch.device] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.h0 = float(h0)
        self.history = int(history)
        self.S = torch.zeros(self.history, dim, device=device, dtype=dtype)
        self.Y = torch.zeros(self.history, dim, device=device, dtype=dtype)
        self.count = 0
        self._middle: Optional[Tensor] = None

    def state(self) -> dict:
        """Tensors to save (``count`` as a 0-dim CPU tensor)."""
        return dict(lbfgs_S=self.S, lbfgs_Y=self.Y,
                    lbfgs_count=torch.tensor(self.count))

    def load(self, state: dict) -> None:
        """Restore from :meth:`state` output."""
        self.S = state['lbfgs_S']
        self.Y = state['lbfgs_Y']
        self.count = int(state['lbfgs_count'])
        self._middle = None

    def push(self, s: Tensor, y: Tensor) -> None:
        """Add a pair (the oldest is dropped when ``p`` are stored).

        Each pair is stored divided by ``||s||`` (a BFGS update does not
        change when ``s`` and ``y`` are scaled together), so tiny pairs keep
        ``R`` well scaled, as in :func:`bfgs_update`.
        """
        norm = torch.linalg.vector_norm(s)
        s = s / norm
        y = y / norm
        if self.count == self.history:
            self.S = torch.roll(self.S, -1, 0)
            self.Y = torch.roll(self.Y, -1, 0)
            self.count -= 1
        self.S[self.count] = s.to(self.S.dtype)
        self.Y[self.count] = y.to(self.Y.dtype)
        self.count += 1
        self._middle = None

    def _middle_matrix(self) -> Tensor:
        if self._middle is None:
            k = self.count
            S = self.S[:k].double()
            Y = self.Y[:k].double()
            sty = S @ Y.T  # (k, k): s_i^T y_j
            R = torch.triu(sty)
            D = torch.diag(torch.diagonal(sty))
            eye = torch.eye(k, dtype=R.dtype, device=R.device)
            Rinv = torch.linalg.solve_triangular(R, eye, upper=True)
            top_left = Rinv.T @ (D + self.h0 * (Y @ Y.T)) @ Rinv
            self._middle = torch.cat([
                torch.cat([top_left, -Rinv.T], 1),
                torch.cat([-Rinv, torch.zeros_like(Rinv)], 1)
            ], 0)
        return self._middle

    def apply(self, M: Tensor) -> Tensor:
        """``H @ M`` for a ``(d, n)`` matrix ``M``."""
        if self.count == 0:
            return M * self.h0
        k = self.count
        S = self.S[:k]
        Y = self.Y[:k]
        left = torch.cat([S, Y * self.h0], 0).double()  # [S^T; Y^T H0]
        mid = self._middle_matrix()
        corr = left.T @ (mid @ (left @ M.double()))
        return M * self.h0 + corr.to(M.dtype)


def _conv_input(module: nn.Conv2d, x: Tensor) -> Tuple[Tensor, tuple, tuple]:
    """fp32 batched input, integer padding and single-filter kernel shape."""
    x = x.detach().float()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    x, padding = _conv_geometry(module, x)
    return x, padding, (1, ) + tuple(module.weight.shape[1:])


def _conv_geometry(module: nn.Conv2d, x: Tensor) -> Tuple[Tensor, tuple]:
    """Input padded for ``padding='same'`` and the integer padding to use."""
    pad = module.padding
    if isinstance(pad, str):
        if pad == 'valid':
            return x, (0, 0)
        kh, kw = module.kernel_size
        dh, dw = module.dilation
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2)), (0, 0)
    return x, tuple(int(p) for p in pad)


def _out_hw(module: nn.Conv2d, x: Tensor, padding: tuple) -> Tuple[int, int]:
    """Output height and width of a conv on the (already padded) input."""
    out = []
    for i in range(2):
        k = module.dilation[i] * (module.kernel_size[i] - 1) + 1
        out.append((x.shape[2 + i] + 2 * padding[i] - k) // module.stride[i] + 1)
    return out[0], out[1]


def layer_rows(module: nn.Module, x: Tensor) -> Tuple[int, int]:
    """``(samples m, locations |T|)`` of one call of a Linear/Conv2d layer.

    Conv2d: ``m`` is the batch size and ``|T|`` the number of output
    positions.  Linear: every leading index is a sample and ``|T| = 1``.
    """
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        x, padding = _conv_geometry(module, x)
        h, w = _out_hw(module, x, padding)
        return x.shape[0], h * w
    return x.numel() // x.shape[-1], 1


def hessian_action(module: nn.Module, x: Tensor, s: Tensor) -> Tensor:
    """``sum_n sum_t (a_t(n)^T s) a_t(n)`` for one layer input, ``A`` unformed.

    ``a_t(n)`` is the input patch of sample ``n`` at output position ``t``
    (Linear: the input row) with a trailing ``1`` when the layer has a bias;
    ``s`` is a ``d_in`` vector ordered like ``weight.view(C_out, -1)`` (plus
    the bias entry).  For a conv this is one convolution with ``s`` as a
    single filter and one weight-gradient convolution with the result as the
    output gradient (thesis Eq. 3.15), so neither the im2col matrix nor
    ``A`` exists.  Divide by the number of samples for the minibatch
    estimate ``A~ s``.

    Args:
        module (nn.Module): ``nn.Linear`` or ``nn.Conv2d`` (groups=1).
        x (Tensor): The layer input of one call.
        s (Tensor): ``(d_in,)`` vector, fp32.

    Returns:
        Tensor: ``(d_in,)`` vector.
    """
    has_bias = module.bias is not None
    sw = s[:-1] if has_bias else s
    if isinstance(module, nn.Conv2d):
        x, padding, kshape = _conv_input(module, x)
        u = F.conv2d(x, sw.reshape(kshape), None, module.stride, padding,
                     module.dilation)
        if has_bias:
            u = u + s[-1]
        aw = torch.nn.grad.conv2d_weight(x, kshape, u, module.stride, padding,
                                         module.dilation).reshape(-1)
    else:
        rows = x.detach().float().reshape(-1, x.shape[-1])
        u = rows @ sw
        if has_bias:
            u = u + s[-1]
        aw = rows.T @ u
    if has_bias:
        return torch.cat([aw, u.sum().reshape(1)])
    return aw


def mean_patch_sum(module: nn.Module, x: Tensor) -> Tensor:
    """``sum_n sum_t a_t(n)`` (bias entry included) for one layer input.

    Divide by ``samples * locations`` for the mean patch ``a-bar``.
    """
    has_bias = module.bias is not None
    if isinstance(module, nn.Conv2d):
        x, padding, kshape = _conv_input(module, x)
        h, w = _out_hw(module, x, padding)
        ones = x.new_ones((x.shape[0], 1, h, w))
        total = torch.nn.grad.conv2d_weight(x, kshape, ones, module.stride,
                                            padding, module.dilation).reshape(-1)
        n = x.shape[0] * h * w
    else:
        rows = x.detach().float().reshape(-1, x.shape[-1])
        total = rows.sum(0)
        n = rows.shape[0]
    if has_bias:
        return torch.cat([total, total.new_tensor([float(n)])])
    return total

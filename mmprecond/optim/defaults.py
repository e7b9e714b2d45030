# Copyright (c) mmprecond contributors. All rights reserved.
"""Validated ``param_groups`` defaults of the two base updates."""
from typing import Any, Dict, Tuple

from .base import check_positive
from .checks import check_momentum


def sgdm_defaults(lr: float, momentum: float, weight_decay: float,
                  nesterov: bool) -> Dict[str, Any]:
    """Defaults of an SGDM-based optimizer (``torch.optim.SGD`` keys)."""
    check_positive('lr', lr, allow_zero=True)
    check_momentum('momentum', momentum)
    check_positive('weight_decay', weight_decay, allow_zero=True)
    if nesterov and momentum <= 0:
        raise ValueError('nesterov momentum requires momentum > 0')
    return dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                nesterov=nesterov)


def adamw_defaults(lr: float, betas: Tuple[float, float], eps: float,
                   weight_decay: float) -> Dict[str, Any]:
    """Defaults of an AdamW-based optimizer (``torch.optim.AdamW`` keys)."""
    check_positive('lr', lr, allow_zero=True)
    check_positive('eps', eps, allow_zero=True)
    check_positive('weight_decay', weight_decay, allow_zero=True)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f'Invalid betas={betas!r}: a pair (beta1, beta2), '
                        'e.g. betas=(0.9, 0.999).')
    check_momentum('betas[0]', betas[0])
    check_momentum('betas[1]', betas[1])
    return dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

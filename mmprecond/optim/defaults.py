# Copyright (c) mmprecond contributors. All rights reserved.
"""Validated ``param_groups`` defaults of the two base updates."""
from typing import Any, Dict, Tuple

from .base import check_positive, check_unit_interval


def sgdm_defaults(lr: float, momentum: float, weight_decay: float,
                  nesterov: bool) -> Dict[str, Any]:
    """Defaults of an SGDM-based optimizer (``torch.optim.SGD`` keys)."""
    check_positive('lr', lr, allow_zero=True)
    check_positive('momentum', momentum, allow_zero=True)
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
    check_unit_interval('betas[0]', betas[0])
    check_unit_interval('betas[1]', betas[1])
    return dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)

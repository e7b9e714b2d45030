# Copyright (c) mmprecond contributors. All rights reserved.
"""Preconditioned optimizers, registered in MMEngine's root ``OPTIMIZERS``."""
from .adamr import AdamR
from .base import PrecondOptimizer
from .nkfac import KFAC, NKFAC, AdaNKFAC

__all__ = ['PrecondOptimizer', 'NKFAC', 'AdaNKFAC', 'KFAC', 'AdamR']

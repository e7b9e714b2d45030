# Copyright (c) mmprecond contributors. All rights reserved.
"""Preconditioned optimizers, registered in MMEngine's root ``OPTIMIZERS``."""
from .adabk import SGDM_BK, AdamW_BK, KroneckerRoot
from .adafisher import AdaFisher, AdaFisherW
from .adamr import AdamR
from .afopt import Ada_AFOpt, AFOpt, AttentionFeatureDescent
from .base import PrecondOptimizer
from .defaults import VARIANTS
from .fsgd import FSGD, FAdam, FeatureDescent
from .kbfgs import KBFGS, KBFGS_L
from .nkfac import KFAC, NKFAC, AdaNKFAC, KroneckerFactors, KroneckerInverse
from .peers import PeerSINGD, register_peer_optimizers
from .sgd_ph import SGD_PH
from .shampoo import Shampoo
from .smw import SMW_GN, SMW_NG
from .tnt import TNT, TNT_EF

# PeerSOAP / PeerShampoo, when pytorch-optimizer is installed (.[peers])
register_peer_optimizers()

__all__ = ['PrecondOptimizer', 'NKFAC', 'AdaNKFAC', 'KFAC', 'AdamR', 'FSGD', 'FAdam',
           'AFOpt', 'Ada_AFOpt', 'SGD_PH', 'SGDM_BK', 'AdamW_BK', 'Shampoo',
           'AdaFisher', 'AdaFisherW', 'KBFGS', 'KBFGS_L', 'TNT', 'TNT_EF', 'PeerSINGD',
           'SMW_NG', 'SMW_GN', 'VARIANTS', 'KroneckerFactors',
           'KroneckerInverse', 'KroneckerRoot', 'FeatureDescent',
           'AttentionFeatureDescent']

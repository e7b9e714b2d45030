# Copyright (c) mmprecond contributors. All rights reserved.
from .constructor import PrecondOptimWrapperConstructor
from .hooks import PrecondStatsHook
from .second_pass import SecondPassHook
from .warm_start import WarmStartHook

__all__ = ['PrecondOptimWrapperConstructor', 'PrecondStatsHook', 'SecondPassHook',
           'WarmStartHook']

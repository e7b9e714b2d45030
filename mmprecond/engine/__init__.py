# Copyright (c) mmprecond contributors. All rights reserved.
from .constructor import PrecondOptimWrapperConstructor
from .hooks import PrecondStatsHook
from .second_pass import SecondPassHook

__all__ = ['PrecondOptimWrapperConstructor', 'PrecondStatsHook', 'SecondPassHook']

# Copyright (c) mmprecond contributors. All rights reserved.
from .constructor import PrecondOptimWrapperConstructor
from .hooks import PrecondStatsHook

__all__ = ['PrecondOptimWrapperConstructor', 'PrecondStatsHook']

# Copyright (c) mmprecond contributors. All rights reserved.
from .constructor import PrecondOptimWrapperConstructor
from .hessian_wrapper import HessianOptimWrapper
from .hooks import PrecondStatsHook

__all__ = ['PrecondOptimWrapperConstructor', 'PrecondStatsHook', 'HessianOptimWrapper']

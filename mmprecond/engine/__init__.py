# Copyright (c) mmprecond contributors. All rights reserved.
from .constructor import PrecondOptimWrapperConstructor
from .hessian_wrapper import HessianOptimWrapper
from .hooks import PrecondStatsHook
from .second_pass import SecondPassHook
from .time_budget import TimeBudgetHook
from .warm_start import WarmStartHook

__all__ = ['PrecondOptimWrapperConstructor', 'PrecondStatsHook', 'HessianOptimWrapper',
           'SecondPassHook', 'WarmStartHook', 'TimeBudgetHook']

# Copyright (c) mmprecond contributors. All rights reserved.
from .constructor import PrecondOptimWrapperConstructor

__all__ = ['PrecondOptimWrapperConstructor']

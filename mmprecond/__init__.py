# Copyright (c) mmprecond contributors. All rights reserved.
"""mmprecond: preconditioned (second-order) optimizers for OpenMMLab.

Importing the package registers every optimizer into MMEngine's root
``OPTIMIZERS`` registry and the preconditioner-aware constructor into the
root ``OPTIM_WRAPPER_CONSTRUCTORS`` registry, so configs with either
``default_scope='mmdet'`` or ``default_scope='mmpretrain'`` find them through
``custom_imports=dict(imports=['mmprecond'])``.
"""
# ``compat`` comes first: it patches the OpenMMLab stack before use.
from . import compat, datasets, engine, optim  # noqa: F401
from .version import __version__, version_info

__all__ = ['__version__', 'version_info']

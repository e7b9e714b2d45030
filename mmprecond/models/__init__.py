# Copyright (c) mmprecond contributors. All rights reserved.
"""Small model definitions used by mmprecond's configs.

Not imported by ``import mmprecond`` (they need mmpretrain); configs that
use them import the module, e.g.
``custom_imports = dict(imports=['mmprecond', 'mmprecond.models.cifar_resnet'])``.
"""

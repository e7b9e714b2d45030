# Copyright (c) mmprecond contributors. All rights reserved.
"""Built-in synthetic datasets (see :mod:`mmprecond.datasets.synthetic`).

Importing this package needs only numpy; PIL and pycocotools are imported
when data is generated.
"""
from .generation import (
    GENERATOR_VERSION,
    ensure_synthetic_cls,
    ensure_synthetic_coco,
    generate_synthetic_cls,
    generate_synthetic_coco,
    synthetic_metainfo,
)
from .shapes import (
    SHAPE_CLASSES,
    SHAPE_PALETTE,
    ShapeObject,
    render_scene,
    render_single_shape,
)

__all__ = [
    'GENERATOR_VERSION', 'SHAPE_CLASSES', 'SHAPE_PALETTE', 'ShapeObject',
    'ensure_synthetic_cls', 'ensure_synthetic_coco', 'generate_synthetic_cls',
    'generate_synthetic_coco', 'render_scene', 'render_single_shape',
    'synthetic_metainfo'
]

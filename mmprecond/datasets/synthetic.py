# Copyright (c) mmprecond contributors. All rights reserved.
"""The built-in synthetic shapes datasets, and their command line.

COCO cannot be downloaded everywhere, so mmprecond ships a generator of
small, deterministic datasets of coloured shapes (:data:`SHAPE_CLASSES`) on
textured backgrounds, in the formats mmdet and mmpretrain read natively:

* :func:`generate_synthetic_coco` / :func:`ensure_synthetic_coco`: COCO
  detection and instance segmentation, with occlusion;
* :func:`generate_synthetic_cls` / :func:`ensure_synthetic_cls`:
  ImageNet-style classification, one shape per image.

The implementation lives in :mod:`mmprecond.datasets.shapes` (rendering) and
:mod:`mmprecond.datasets.generation` (files); this module re-exports it and
adds the command line::

    python -m mmprecond.datasets.synthetic coco --out data/synthetic_coco
    python -m mmprecond.datasets.synthetic cls --out data/synthetic_cls

Example:
    >>> import tempfile
    >>> from mmprecond.datasets.synthetic import main
    >>> main(['cls', '--out', tempfile.mkdtemp(), '--num-train', '5',
    ...       '--num-val', '5'])  # doctest: +ELLIPSIS
    synthetic cls data ready in ...
    0
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

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
    'generate_synthetic_coco', 'main', 'render_scene', 'render_single_shape',
    'synthetic_metainfo'
]


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m mmprecond.datasets.synthetic',
        description='Generate the synthetic shapes datasets.')
    sub = parser.add_subparsers(dest='kind', required=True)
    coco = sub.add_parser('coco', help='COCO-format detection/segmentation')
    coco.add_argument('--out', default='data/synthetic_coco')
    coco.add_argument('--num-train', type=int, default=400)
    coco.add_argument('--num-val', type=int, default=100)
    coco.add_argument('--img-size', type=int, default=160)
    coco.add_argument('--min-objects', type=int, default=1)
    coco.add_argument('--max-objects', type=int, default=4)
    coco.add_argument(
        '--mask-format', choices=('polygon', 'rle'), default='polygon')
    cls = sub.add_parser('cls', help='ImageNet-style classification')
    cls.add_argument('--out', default='data/synthetic_cls')
    cls.add_argument('--num-train', type=int, default=1000)
    cls.add_argument('--num-val', type=int, default=250)
    cls.add_argument('--img-size', type=int, default=64)
    for p in (coco, cls):
        p.add_argument('--seed', type=int, default=0)
        p.add_argument(
            '--force',
            action='store_true',
            help='regenerate even if identical data is already there')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point.

    Args:
        argv (list[str], optional): Arguments without the program name;
            ``sys.argv[1:]`` if ``None``.

    Returns:
        int: The exit status (0).

    Example:
        >>> import tempfile
        >>> main(['coco', '--out', tempfile.mkdtemp(), '--num-train', '2',
        ...       '--num-val', '1', '--img-size', '64'])  # doctest: +ELLIPSIS
        synthetic coco data ready in ...
        0
    """
    args = _parse_args(argv)
    kwargs = dict(
        num_train=args.num_train,
        num_val=args.num_val,
        img_size=args.img_size,
        seed=args.seed)
    if args.kind == 'coco':
        kwargs.update(
            min_objects=args.min_objects,
            max_objects=args.max_objects,
            mask_format=args.mask_format)
        generate, ensure = generate_synthetic_coco, ensure_synthetic_coco
    else:
        generate, ensure = generate_synthetic_cls, ensure_synthetic_cls
    start = time.perf_counter()
    if args.force:
        generate(args.out, **kwargs)
    else:
        ensure(args.out, **kwargs)
    print(f'synthetic {args.kind} data ready in {args.out} '
          f'({time.perf_counter() - start:.1f}s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())

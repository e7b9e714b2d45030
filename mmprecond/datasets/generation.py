# Copyright (c) mmprecond contributors. All rights reserved.
"""Writers for the built-in synthetic datasets.

Two on-disk datasets are produced from the scenes of
:mod:`mmprecond.datasets.shapes`:

* a COCO-format detection / instance-segmentation dataset
  (:func:`generate_synthetic_coco`), read by mmdet's ``CocoDataset``::

      out_dir/
        annotations/instances_train.json
        annotations/instances_val.json
        train/000001.png ...
        val/000001.png ...
        meta.json

* an ImageNet-style classification dataset (:func:`generate_synthetic_cls`),
  read by mmpretrain's ``CustomDataset``::

      out_dir/
        train/<class>/000001.png ...
        val/<class>/000001.png ...
        meta/train.txt        # "<class>/000001.png <label>", relative to train/
        meta/val.txt
        meta/classes.txt
        meta.json

Image ``i`` of a split is drawn from ``numpy.random.default_rng([seed,
split, i])``: it does not depend on the global RNG state nor on how many
images the split has.  Images are PNG, so pixels are stored exactly.

``meta.json`` records the generation parameters; :func:`ensure_synthetic_coco`
and :func:`ensure_synthetic_cls` regenerate only when it is missing,
incomplete or different.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import os.path as osp
import shutil
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple, Union

import numpy as np

from .shapes import (
    SHAPE_CLASSES,
    SHAPE_PALETTE,
    ShapeObject,
    render_scene,
    render_single_shape,
)

#: Bumped whenever the generator's output changes for the same parameters,
#: so :func:`ensure_synthetic_coco` / :func:`ensure_synthetic_cls` refresh
#: data written by an older version.
GENERATOR_VERSION = 1

_SPLITS = ('train', 'val')
_COCO_STREAM = {'train': 1, 'val': 2}
_CLS_STREAM = {'train': 11, 'val': 12}
_META_FILE = 'meta.json'

SizeType = Union[int, Sequence[int]]


def synthetic_metainfo() -> Dict[str, Any]:
    """Dataset meta information for configs and metrics.

    Returns:
        dict: ``dict(classes=SHAPE_CLASSES, palette=SHAPE_PALETTE)``, the
        form mmdet / mmpretrain datasets take as ``metainfo``.

    Example:
        >>> meta = synthetic_metainfo()
        >>> meta['classes'][:2], len(meta['palette']) == len(meta['classes'])
        (('cross', 'ellipse'), True)
    """
    return dict(classes=SHAPE_CLASSES, palette=list(SHAPE_PALETTE))


def _parse_size(img_size: SizeType) -> Tuple[int, int]:
    """Normalise ``img_size`` to ``(width, height)``."""
    if isinstance(img_size, (int, np.integer)):
        width = height = int(img_size)
    else:
        width, height = (int(v) for v in img_size)
    if width < 16 or height < 16:
        raise ValueError(f'img_size must be at least 16 pixels, got {img_size}')
    return width, height


def _save_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    # uint8 (H, W, 3) arrays are RGB; level 1 is fast and still lossless
    Image.fromarray(image).save(path, format='PNG', compress_level=1)


def _write_json(path: str, obj: Any) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, separators=(',', ':'))
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _start_generation(out_dir: str, kind: str, managed: Sequence[str],
                      params: Dict[str, Any]) -> None:
    """Clear what an earlier run of the same kind wrote, mark as unfinished.

    Only directories this module creates are removed, and only if a
    ``meta.json`` of the same ``kind`` proves that it created them.
    """
    os.makedirs(out_dir, exist_ok=True)
    meta_path = osp.join(out_dir, _META_FILE)
    old = _read_json(meta_path)
    if isinstance(old, dict) and old.get('kind') == kind:
        for name in managed:
            shutil.rmtree(osp.join(out_dir, name), ignore_errors=True)
    _write_json(meta_path, dict(kind=kind, complete=False, params=params))


def _finish_generation(out_dir: str, kind: str,
                       params: Dict[str, Any]) -> None:
    _write_json(
        osp.join(out_dir, _META_FILE),
        dict(kind=kind, complete=True, params=params))


def _bbox_of(mask: np.ndarray) -> List[int]:
    """Tight COCO box ``[x, y, w, h]`` around the pixels of ``mask``."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]), int(rows[0]), int(rows[-1])
    return [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def _encode_rle(mask: np.ndarray) -> Dict[str, Any]:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return dict(size=[int(v) for v in rle['size']],
                counts=rle['counts'].decode('ascii'))


def _coco_annotation(obj: ShapeObject, ann_id: int, image_id: int,
                     mask_format: str) -> Dict[str, Any]:
    """COCO annotation of the visible part of ``obj``.

    The polygon is used only when the shape is a polygon and nothing hides
    any of it: then the visible mask *is* the polygon's rasterisation.
    Everything else (rings, occluded shapes, ``mask_format='rle'``) is
    stored as a compressed RLE of the visible mask.  Box and area always
    come from the visible mask.
    """
    visible = obj.visible_mask
    if (mask_format == 'polygon' and obj.polygon is not None
            and not obj.is_occluded):
        segmentation: Any = [list(obj.polygon)]
    else:
        segmentation = _encode_rle(visible)
    return dict(
        id=ann_id,
        image_id=image_id,
        category_id=obj.label + 1,
        bbox=_bbox_of(visible),
        area=int(visible.sum()),
        iscrowd=0,
        segmentation=segmentation)


def _coco_params(num_train: int, num_val: int, img_size: SizeType,
                 min_objects: int, max_objects: int, seed: int,
                 mask_format: str) -> Dict[str, Any]:
    width, height = _parse_size(img_size)
    if mask_format not in ('polygon', 'rle'):
        raise ValueError("mask_format must be 'polygon' or 'rle', got "
                         f'{mask_format!r}')
    if not 1 <= int(min_objects) <= int(max_objects):
        raise ValueError('need 1 <= min_objects <= max_objects, got '
                         f'{min_objects} and {max_objects}')
    if int(num_train) < 0 or int(num_val) < 0:
        raise ValueError('num_train and num_val must be >= 0')
    return dict(
        version=GENERATOR_VERSION,
        num_train=int(num_train),
        num_val=int(num_val),
        width=width,
        height=height,
        min_objects=int(min_objects),
        max_objects=int(max_objects),
        seed=int(seed),
        mask_format=mask_format)


def generate_synthetic_coco(out_dir: str,
                            num_train: int = 400,
                            num_val: int = 100,
                            img_size: SizeType = 160,
                            min_objects: int = 1,
                            max_objects: int = 4,
                            seed: int = 0,
                            mask_format: str = 'polygon') -> Dict[str, Any]:
    """Write the synthetic shapes dataset in COCO format.

    Each image shows ``min_objects`` to ``max_objects`` random shapes
    (:data:`SHAPE_CLASSES`) of random size, position and colour on a
    textured background.  Later shapes occlude earlier ones; the
    annotations describe what is visible: ``segmentation`` is the visible
    mask (the shape's polygon when it is a polygon and unoccluded, a
    compressed RLE otherwise), ``bbox`` is the tight box of that mask and
    ``area`` its pixel count.  Category ids start at 1 and follow
    :data:`SHAPE_CLASSES`.

    Args:
        out_dir (str): Dataset root (created if needed).
        num_train (int): Number of training images. Defaults to 400.
        num_val (int): Number of validation images. Defaults to 100.
        img_size (int | tuple[int, int]): Image size, an int for square
            images or ``(width, height)`` (mmcv's ``scale`` order).
            Defaults to 160.
        min_objects (int): Fewest shapes per image. Defaults to 1.
        max_objects (int): Most shapes per image. Defaults to 4.
        seed (int): Random seed. Defaults to 0.
        mask_format (str): ``'polygon'`` (polygons where exact, RLE
            elsewhere) or ``'rle'`` (RLE everywhere). Defaults to
            ``'polygon'``.

    Returns:
        dict: Summary with ``out_dir``, ``classes``, ``ann_files``,
        ``img_dirs``, ``num_images`` and ``num_annotations`` (the last
        four keyed by split).

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> info = generate_synthetic_coco(root, num_train=2, num_val=1,
        ...                                img_size=64)
        >>> info['num_images']
        {'train': 2, 'val': 1}
        >>> osp.relpath(info['ann_files']['val'], root)
        'annotations/instances_val.json'
    """
    params = _coco_params(num_train, num_val, img_size, min_objects,
                          max_objects, seed, mask_format)
    width, height = params['width'], params['height']
    out_dir = osp.abspath(out_dir)
    _start_generation(out_dir, 'coco', ('annotations', ) + _SPLITS, params)
    ann_dir = osp.join(out_dir, 'annotations')
    os.makedirs(ann_dir, exist_ok=True)
    categories = [
        dict(id=i + 1, name=name, supercategory='shape')
        for i, name in enumerate(SHAPE_CLASSES)
    ]
    summary: Dict[str, Any] = dict(
        out_dir=out_dir,
        classes=SHAPE_CLASSES,
        ann_files={},
        img_dirs={},
        num_images={},
        num_annotations={})
    for split, count in (('train', params['num_train']),
                         ('val', params['num_val'])):
        img_dir = osp.join(out_dir, split)
        os.makedirs(img_dir, exist_ok=True)
        images: List[Dict[str, Any]] = []
        annotations: List[Dict[str, Any]] = []
        for index in range(count):
            rng = np.random.default_rng(
                [params['seed'], _COCO_STREAM[split], index])
            image, objects = render_scene(rng, height, width,
                                          params['min_objects'],
                                          params['max_objects'])
            image_id = index + 1
            file_name = f'{image_id:06d}.png'
            _save_png(osp.join(img_dir, file_name), image)
            images.append(
                dict(id=image_id, file_name=file_name, width=width,
                     height=height))
            for obj in objects:
                # COCOeval treats annotation id 0 as "unmatched": start at 1.
                annotations.append(
                    _coco_annotation(obj, len(annotations) + 1, image_id,
                                     params['mask_format']))
        ann_file = osp.join(ann_dir, f'instances_{split}.json')
        _write_json(
            ann_file,
            dict(
                info=dict(
                    description='mmprecond synthetic shapes',
                    version=str(GENERATOR_VERSION)),
                licenses=[],
                images=images,
                annotations=annotations,
                categories=categories))
        summary['ann_files'][split] = ann_file
        summary['img_dirs'][split] = img_dir
        summary['num_images'][split] = count
        summary['num_annotations'][split] = len(annotations)
    _finish_generation(out_dir, 'coco', params)
    return summary


def _cls_params(num_train: int, num_val: int, img_size: SizeType,
                seed: int) -> Dict[str, Any]:
    width, height = _parse_size(img_size)
    if int(num_train) < 0 or int(num_val) < 0:
        raise ValueError('num_train and num_val must be >= 0')
    return dict(
        version=GENERATOR_VERSION,
        num_train=int(num_train),
        num_val=int(num_val),
        width=width,
        height=height,
        seed=int(seed))


def generate_synthetic_cls(out_dir: str,
                           num_train: int = 1000,
                           num_val: int = 250,
                           img_size: SizeType = 64,
                           seed: int = 0) -> Dict[str, Any]:
    """Write the synthetic shapes classification dataset.

    Every image holds one shape near its centre on a textured background;
    the label is the shape's index in :data:`SHAPE_CLASSES`.  Classes are
    balanced within each split (they differ by at most one image).  The
    layout is the ImageNet one mmpretrain's ``CustomDataset`` reads, with
    ``data_prefix='train'`` and ``ann_file='meta/train.txt'`` (or without
    an ann file, from the class folders: their sorted order equals the
    label order).

    Args:
        out_dir (str): Dataset root (created if needed).
        num_train (int): Number of training images. Defaults to 1000.
        num_val (int): Number of validation images. Defaults to 250.
        img_size (int | tuple[int, int]): Image size, an int for square
            images or ``(width, height)``. Defaults to 64.
        seed (int): Random seed. Defaults to 0.

    Returns:
        dict: Summary with ``out_dir``, ``classes``, ``ann_files``,
        ``img_dirs`` and ``num_images`` (the last three keyed by split).

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> info = generate_synthetic_cls(root, num_train=5, num_val=5)
        >>> info['num_images']
        {'train': 5, 'val': 5}
        >>> open(info['ann_files']['train']).readline().split()
        ['cross/000001.png', '0']
    """
    params = _cls_params(num_train, num_val, img_size, seed)
    width, height = params['width'], params['height']
    out_dir = osp.abspath(out_dir)
    _start_generation(out_dir, 'cls', ('meta', ) + _SPLITS, params)
    meta_dir = osp.join(out_dir, 'meta')
    os.makedirs(meta_dir, exist_ok=True)
    with open(osp.join(meta_dir, 'classes.txt'), 'w') as f:
        f.write(''.join(name + '\n' for name in SHAPE_CLASSES))
    num_classes = len(SHAPE_CLASSES)
    summary: Dict[str, Any] = dict(
        out_dir=out_dir,
        classes=SHAPE_CLASSES,
        ann_files={},
        img_dirs={},
        num_images={})
    for split, count in (('train', params['num_train']),
                         ('val', params['num_val'])):
        split_dir = osp.join(out_dir, split)
        for name in SHAPE_CLASSES:
            os.makedirs(osp.join(split_dir, name), exist_ok=True)
        # The first image of each class in label order, then shuffled: the
        # class counts are balanced whatever the seed.
        labels = np.arange(count) % num_classes
        if count > num_classes:
            order = np.random.default_rng(
                [params['seed'], _CLS_STREAM[split], 1 << 20])
            labels[num_classes:] = order.permutation(labels[num_classes:])
        lines = []
        for index, label in enumerate(labels.tolist()):
            rng = np.random.default_rng(
                [params['seed'], _CLS_STREAM[split], index])
            image = render_single_shape(rng, height, width, label)
            rel_path = f'{SHAPE_CLASSES[label]}/{index + 1:06d}.png'
            _save_png(osp.join(split_dir, rel_path), image)
            lines.append(f'{rel_path} {label}\n')
        ann_file = osp.join(meta_dir, f'{split}.txt')
        with open(ann_file, 'w') as f:
            f.write(''.join(lines))
        summary['ann_files'][split] = ann_file
        summary['img_dirs'][split] = split_dir
        summary['num_images'][split] = count
    _finish_generation(out_dir, 'cls', params)
    return summary


@contextlib.contextmanager
def _dir_lock(out_dir: str) -> Iterator[None]:
    """Serialise generation in ``out_dir`` across processes (POSIX only).

    Several ranks or dataloader workers may call ``ensure_*`` at once; the
    first one generates, the others wait and then find the data in place.
    """
    os.makedirs(out_dir, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover (Windows)
        yield
        return
    with open(osp.join(out_dir, '.lock'), 'w') as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _bind(func: Callable[..., Any], out_dir: str,
          kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """All parameters of ``func`` but ``out_dir``, defaults filled in."""
    bound = inspect.signature(func).bind(out_dir, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    params.pop('out_dir')
    return params


def _is_current(out_dir: str, kind: str, params: Dict[str, Any],
                required: Sequence[str]) -> bool:
    meta = _read_json(osp.join(out_dir, _META_FILE))
    return (isinstance(meta, dict) and meta.get('kind') == kind
            and meta.get('complete') is True and meta.get('params') == params
            and all(osp.exists(osp.join(out_dir, p)) for p in required))


def ensure_synthetic_coco(out_dir: str, **kwargs: Any) -> str:
    """Generate the COCO-format dataset unless an identical one exists.

    The dataset counts as present when ``out_dir/meta.json`` records a
    completed generation with the same parameters (and generator version)
    and both annotation files exist; then this returns at once.

    Args:
        out_dir (str): Dataset root.
        **kwargs: Parameters of :func:`generate_synthetic_coco`.

    Returns:
        str: ``out_dir``, to use as ``data_root``.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> root == ensure_synthetic_coco(root, num_train=2, num_val=1,
        ...                               img_size=32)
        True
    """
    args = _bind(generate_synthetic_coco, out_dir, kwargs)
    params = _coco_params(**args)
    required = [
        osp.join('annotations', f'instances_{s}.json') for s in _SPLITS
    ]
    if _is_current(out_dir, 'coco', params, required):
        return out_dir
    with _dir_lock(out_dir):
        if not _is_current(out_dir, 'coco', params, required):
            generate_synthetic_coco(out_dir, **args)
    return out_dir


def ensure_synthetic_cls(out_dir: str, **kwargs: Any) -> str:
    """Generate the classification dataset unless an identical one exists.

    Args:
        out_dir (str): Dataset root.
        **kwargs: Parameters of :func:`generate_synthetic_cls`.

    Returns:
        str: ``out_dir``, to use as ``data_root``.

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> root == ensure_synthetic_cls(root, num_train=5, num_val=5)
        True
    """
    args = _bind(generate_synthetic_cls, out_dir, kwargs)
    params = _cls_params(**args)
    required = [osp.join('meta', f'{s}.txt') for s in _SPLITS]
    if _is_current(out_dir, 'cls', params, required):
        return out_dir
    with _dir_lock(out_dir):
        if not _is_current(out_dir, 'cls', params, required):
            generate_synthetic_cls(out_dir, **args)
    return out_dir

# Copyright (c) mmprecond contributors. All rights reserved.
"""Rendering of the synthetic shape images.

This module only needs :mod:`numpy` (and :mod:`pycocotools` for rasterising
polygons, imported lazily), so importing it is cheap.  It knows nothing about
files: :mod:`mmprecond.datasets.generation` turns the rendered scenes into
COCO / ImageNet-style datasets.

Every random decision is drawn from the :class:`numpy.random.Generator`
handed in, so a scene is a pure function of that generator's seed.

Pixel geometry follows COCO: pixel ``(row, col)`` covers the square
``[col, col + 1) x [row, row + 1)`` and its centre is at
``(col + 0.5, row + 0.5)``.  Polygon shapes are rasterised with
:func:`pycocotools.mask.frPyObjects`, i.e. with exactly the rasteriser COCO
tools apply to a polygon annotation, so a painted object, its polygon and
the mask decoded from that polygon agree pixel for pixel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

#: Shape classes, in label order.  The order is alphabetical on purpose: an
#: image-folder reader that sorts its class folders assigns the same labels.
SHAPE_CLASSES: Tuple[str, ...] = ('cross', 'ellipse', 'rectangle', 'ring',
                                  'triangle')

#: One RGB colour per class, for visualisation (``metainfo['palette']``).
SHAPE_PALETTE: List[Tuple[int, int, int]] = [(220, 20, 60), (0, 130, 200),
                                             (60, 180, 75), (245, 130, 48),
                                             (145, 30, 180)]

#: Shapes whose outline is one simple polygon (all but the ring).
POLYGON_SHAPES: Tuple[str, ...] = ('cross', 'ellipse', 'rectangle',
                                   'triangle')

# An object is only kept if at least this many pixels, and this fraction of
# its unoccluded area, stay visible once the later objects are painted.
MIN_VISIBLE_AREA = 24
MIN_VISIBLE_FRAC = 0.3
# Colour separation (Euclidean, in 0..255 RGB units) between an object and
# the background's colour segment, and between two objects of one image.
# Background noise is clipped to +-BG_NOISE_CLIP per channel, which keeps
# every background pixel strictly closer than MIN_BG_COLOR_DIST to the
# segment, so no background pixel can ever take an object's colour.
MIN_BG_COLOR_DIST = 80.0
MIN_OBJ_COLOR_DIST = 60.0
BG_NOISE_CLIP = 12.0
ELLIPSE_POINTS = 32
_DECIMALS = 2


@dataclass(eq=False)
class ShapeObject:
    """One painted shape of a scene.

    Attributes:
        label (int): Index into :data:`SHAPE_CLASSES`.
        color (tuple[int, int, int]): RGB colour the shape is painted with.
        full_mask (np.ndarray): ``(H, W)`` bool mask of the whole shape.
        visible_mask (np.ndarray): ``(H, W)`` bool mask of the part not
            covered by later shapes (what the image shows).
        polygon (list[float], optional): Flat ``[x0, y0, x1, y1, ...]``
            outline that ``full_mask`` was rasterised from; ``None`` for
            shapes that are not a single polygon (rings).
    """

    label: int
    color: Tuple[int, int, int]
    full_mask: np.ndarray
    visible_mask: np.ndarray
    polygon: Optional[List[float]] = None

    @property
    def name(self) -> str:
        """str: The class name of the shape."""
        return SHAPE_CLASSES[self.label]

    @property
    def is_occluded(self) -> bool:
        """bool: Whether a later shape hides part of this one."""
        return int(self.visible_mask.sum()) != int(self.full_mask.sum())


def rasterize_polygon(polygon: Sequence[float], height: int,
                      width: int) -> np.ndarray:
    """Rasterise a polygon exactly as the COCO tools do.

    Args:
        polygon (Sequence[float]): Flat ``[x0, y0, x1, y1, ...]`` vertices.
        height (int): Mask height.
        width (int): Mask width.

    Returns:
        np.ndarray: ``(height, width)`` bool mask.

    Example:
        >>> m = rasterize_polygon([2, 2, 10, 2, 10, 6, 2, 6], 12, 12)
        >>> m.shape, int(m.sum())
        ((12, 12), 32)
    """
    from pycocotools import mask as mask_utils

    rles = mask_utils.frPyObjects([[float(v) for v in polygon]], height,
                                  width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _pixel_grid(height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(ys, xs)`` as ``(H, 1)`` and ``(1, W)``."""
    ys = np.arange(height, dtype=np.float64)[:, None] + 0.5
    xs = np.arange(width, dtype=np.float64)[None, :] + 0.5
    return ys, xs


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    """Rotate ``(N, 2)`` points counter-clockwise about the origin."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, s], [-s, c]])
    return points @ rot


def _unit_polygon(kind: str, rng: np.random.Generator,
                  size: float) -> np.ndarray:
    """Vertices ``(N, 2)`` of a polygon shape centred on the origin.

    ``size`` is the nominal diameter (longest extent before rotation).
    """
    half = size / 2.0
    if kind == 'rectangle':
        w, h = size, size * rng.uniform(0.35, 1.0)
        if rng.random() < 0.5:
            w, h = h, w
        pts = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2.0
        # Half of the rectangles stay axis-aligned, like most real boxes.
        angle = rng.uniform(0.0, math.pi) if rng.random() < 0.5 else 0.0
    elif kind == 'triangle':
        a0 = rng.uniform(0.0, 2.0 * math.pi)
        gaps = 2.0 * math.pi / 3.0 + rng.uniform(-0.4, 0.4, size=2)
        angles = np.array([a0, a0 + gaps[0], a0 + gaps[0] + gaps[1]])
        radii = half * rng.uniform(0.85, 1.0, size=3)
        pts = np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)
        angle = 0.0
    elif kind == 'ellipse':
        a, b = half, half * rng.uniform(0.45, 1.0)
        theta = np.arange(ELLIPSE_POINTS) * (2.0 * math.pi / ELLIPSE_POINTS)
        pts = np.stack([a * np.cos(theta), b * np.sin(theta)], 1)
        angle = rng.uniform(0.0, math.pi)
    elif kind == 'cross':
        t = size * rng.uniform(0.25, 0.4) / 2.0
        h = half
        pts = np.array([[-t, -h], [t, -h], [t, -t], [h, -t], [h, t], [t, t],
                        [t, h], [-t, h], [-t, t], [-h, t], [-h, -t],
                        [-t, -t]])
        angle = rng.uniform(0.0, math.pi / 2.0)
    else:
        raise ValueError(f'{kind!r} is not a polygon shape')
    return _rotate(pts, angle) if angle else pts


def _ring_mask(cx: float, cy: float, a: float, b: float, angle: float,
               inner: float, height: int, width: int) -> np.ndarray:
    """Mask of an elliptical ring (a hollow ellipse) via pixel centres."""
    ys, xs = _pixel_grid(height, width)
    dx, dy = xs - cx, ys - cy
    c, s = math.cos(angle), math.sin(angle)
    u = (dx * c + dy * s) / a
    v = (dy * c - dx * s) / b
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 > inner * inner)


def _sample_center(rng: np.random.Generator, ext_lo: np.ndarray,
                   ext_hi: np.ndarray, height: int, width: int,
                   center: Optional[Tuple[float, float]],
                   jitter: float) -> Tuple[float, float]:
    """Pick a centre ``(cx, cy)`` that keeps the extents inside the image.

    ``ext_lo``/``ext_hi`` are the (negative / positive) offsets of the
    shape's extremes from its centre.  With ``center`` given the centre is
    drawn within ``jitter`` pixels of it (and clamped to fit).
    """
    margin = 1.0
    lo = -ext_lo + margin
    hi = np.array([width, height], dtype=np.float64) - ext_hi - margin
    hi = np.maximum(hi, lo)
    if center is None:
        c = rng.uniform(lo, hi)
    else:
        c = np.asarray(center, dtype=np.float64) + rng.uniform(
            -jitter, jitter, size=2)
        c = np.clip(c, lo, hi)
    return float(c[0]), float(c[1])


def sample_shape(rng: np.random.Generator,
                 height: int,
                 width: int,
                 label: int,
                 size_range: Tuple[float, float] = (0.12, 0.45),
                 center: Optional[Tuple[float, float]] = None,
                 jitter: float = 0.0,
                 min_area: int = 40) -> Tuple[np.ndarray, Optional[List[float]]]:
    """Draw one shape of class ``label`` at a random place.

    Args:
        rng (np.random.Generator): Source of randomness.
        height (int): Image height.
        width (int): Image width.
        label (int): Index into :data:`SHAPE_CLASSES`.
        size_range (tuple[float, float]): Nominal diameter as a fraction of
            ``min(height, width)``. Defaults to ``(0.12, 0.45)``.
        center (tuple[float, float], optional): ``(cx, cy)`` to place the
            shape near; anywhere inside the image if ``None``.
        jitter (float): Maximum offset from ``center`` in pixels.
        min_area (int): Shapes whose rasterised area is smaller are redrawn.

    Returns:
        tuple[np.ndarray, list[float] | None]: The ``(H, W)`` bool mask and,
        for polygon shapes, the flat polygon it was rasterised from.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> mask, poly = sample_shape(rng, 64, 64, SHAPE_CLASSES.index('ring'))
        >>> mask.shape, poly is None
        ((64, 64), True)
    """
    kind = SHAPE_CLASSES[label]
    short = float(min(height, width))
    for _ in range(100):
        size = short * rng.uniform(*size_range)
        if kind == 'ring':
            a = size / 2.0
            b = a * rng.uniform(0.75, 1.0)
            angle = rng.uniform(0.0, math.pi)
            # at least ~2.5 px of wall, and a clearly visible hole
            inner = min(rng.uniform(0.45, 0.7), 1.0 - 2.5 / b)
            a, b, angle, inner = (round(float(v), _DECIMALS)
                                  for v in (a, b, angle, inner))
            if inner < 0.3:
                continue
            ext = np.array([a, a])
            cx, cy = _sample_center(rng, -ext, ext, height, width, center,
                                    jitter)
            cx, cy = round(cx, _DECIMALS), round(cy, _DECIMALS)
            mask = _ring_mask(cx, cy, a, b, angle, inner, height, width)
            polygon = None
        else:
            pts = _unit_polygon(kind, rng, size)
            cx, cy = _sample_center(rng, pts.min(0), pts.max(0), height,
                                    width, center, jitter)
            pts = np.round(pts + np.array([cx, cy]), _DECIMALS)
            pts = np.clip(pts, 0.0, [float(width), float(height)])
            polygon = [float(v) for v in pts.reshape(-1)]
            mask = rasterize_polygon(polygon, height, width)
        if int(mask.sum()) >= min_area:
            return mask, polygon
    raise RuntimeError(f'could not draw a {kind} of at least {min_area} px '
                       f'in a {height}x{width} image')


def _smooth_noise(rng: np.random.Generator, height: int,
                  width: int) -> np.ndarray:
    """Value noise: a coarse random lattice, smoothly interpolated."""
    cells = int(rng.integers(2, 7))
    lattice = rng.random((cells + 1, cells + 1))

    def coords(n: int) -> Tuple[np.ndarray, np.ndarray]:
        pos = (np.arange(n) + 0.5) * (cells / n)
        i0 = np.minimum(pos.astype(np.int64), cells - 1)
        f = pos - i0
        return i0, f * f * (3.0 - 2.0 * f)  # smoothstep weights

    y0, fy = coords(height)
    x0, fx = coords(width)
    top = lattice[y0][:, x0] * (1 - fx) + lattice[y0][:, x0 + 1] * fx
    bot = lattice[y0 + 1][:, x0] * (1 - fx) + lattice[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy[:, None]) + bot * fy[:, None]


def _texture(rng: np.random.Generator, height: int,
             width: int) -> np.ndarray:
    """A random ``(H, W)`` texture with values in ``[0, 1]``."""
    ys, xs = _pixel_grid(height, width)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        t = _smooth_noise(rng, height, width)
    elif kind == 1:  # linear gradient
        theta = rng.uniform(0.0, 2.0 * math.pi)
        t = xs * math.cos(theta) + ys * math.sin(theta)
    elif kind == 2:  # stripes
        theta = rng.uniform(0.0, math.pi)
        period = rng.uniform(6.0, 0.3 * max(height, width))
        phase = rng.uniform(0.0, 2.0 * math.pi)
        proj = xs * math.cos(theta) + ys * math.sin(theta)
        t = 0.5 + 0.5 * np.sin(proj * (2.0 * math.pi / period) + phase)
    else:  # checkerboard
        cell = int(rng.integers(6, max(7, min(height, width) // 4)))
        t = ((ys // cell + xs // cell) % 2).astype(np.float64)
    t = np.broadcast_to(t, (height, width))
    lo, hi = float(t.min()), float(t.max())
    return (t - lo) / (hi - lo) if hi > lo else np.zeros((height, width))


def render_background(
    rng: np.random.Generator, height: int, width: int
) -> Tuple[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
    """Render a textured background.

    The background blends two random colours ``c0`` and ``c1`` with a random
    texture (smooth noise, gradient, stripes or checkerboard, sometimes a mix
    of two) and adds a little pixel noise.

    Args:
        rng (np.random.Generator): Source of randomness.
        height (int): Image height.
        width (int): Image width.

    Returns:
        tuple: The ``(H, W, 3)`` uint8 image and the colours ``(c0, c1)``
        (float arrays) whose segment every pixel lies close to.

    Example:
        >>> img, (c0, c1) = render_background(np.random.default_rng(0), 8, 8)
        >>> img.shape, img.dtype
        ((8, 8, 3), dtype('uint8'))
    """
    c0 = rng.integers(0, 256, size=3).astype(np.float64)
    c1 = np.clip(c0 + rng.integers(-100, 101, size=3), 0, 255)
    t = _texture(rng, height, width)
    if rng.random() < 0.35:
        w = rng.uniform(0.3, 0.7)
        t = w * t + (1.0 - w) * _texture(rng, height, width)
    sigma = rng.uniform(0.0, 6.0)
    noise = rng.standard_normal((height, width, 3), dtype=np.float32)
    noise *= np.float32(sigma)
    np.clip(noise, -BG_NOISE_CLIP, BG_NOISE_CLIP, out=noise)
    noise += t.astype(np.float32)[..., None] * (c1 - c0).astype(np.float32)
    noise += c0.astype(np.float32)
    np.rint(noise, out=noise)
    np.clip(noise, 0, 255, out=noise)
    return noise.astype(np.uint8), (c0, c1)


def _dist_to_segment(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance from point ``p`` to the segment ``[a, b]``."""
    ab = b - a
    denom = float(ab @ ab)
    s = 0.0 if denom == 0 else float(np.clip((p - a) @ ab / denom, 0, 1))
    return float(np.linalg.norm(p - (a + s * ab)))


def sample_color(rng: np.random.Generator, background: Tuple[np.ndarray,
                                                             np.ndarray],
                 others: Sequence[Tuple[int, int, int]] = ()
                 ) -> Tuple[int, int, int]:
    """Draw an object colour that stands out from the scene.

    The colour keeps :data:`MIN_BG_COLOR_DIST` from the background's colour
    segment and :data:`MIN_OBJ_COLOR_DIST` from ``others``.  If no such
    colour turns up in a bounded number of draws, the draw that is farthest
    from both is used (still deterministic).

    Args:
        rng (np.random.Generator): Source of randomness.
        background (tuple[np.ndarray, np.ndarray]): The colours returned by
            :func:`render_background`.
        others (Sequence[tuple[int, int, int]]): Colours already in use.

    Returns:
        tuple[int, int, int]: An RGB colour.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> bg = (np.zeros(3), np.full(3, 40.0))
        >>> len(sample_color(rng, bg))
        3
    """
    best, best_score = None, -1.0
    for _ in range(64):
        cand = rng.integers(0, 256, size=3)
        p = cand.astype(np.float64)
        d_bg = _dist_to_segment(p, *background)
        d_obj = min((float(np.linalg.norm(p - np.asarray(o, np.float64)))
                     for o in others),
                    default=math.inf)
        if d_bg >= MIN_BG_COLOR_DIST and d_obj >= MIN_OBJ_COLOR_DIST:
            best = cand
            break
        score = min(d_bg / MIN_BG_COLOR_DIST, d_obj / MIN_OBJ_COLOR_DIST)
        if score > best_score:
            best, best_score = cand, score
    return int(best[0]), int(best[1]), int(best[2])


def render_scene(rng: np.random.Generator,
                 height: int,
                 width: int,
                 min_objects: int = 1,
                 max_objects: int = 4,
                 size_range: Tuple[float, float] = (0.12, 0.45)
                 ) -> Tuple[np.ndarray, List[ShapeObject]]:
    """Render a detection scene: several overlapping shapes on a texture.

    Shapes are painted in order, so later ones occlude earlier ones.  A new
    shape is only accepted if every earlier shape keeps at least
    :data:`MIN_VISIBLE_AREA` pixels and :data:`MIN_VISIBLE_FRAC` of its area
    visible; otherwise it is redrawn elsewhere (and dropped after a few
    failed tries), so every painted shape is annotated and none is a sliver.

    Args:
        rng (np.random.Generator): Source of randomness.
        height (int): Image height.
        width (int): Image width.
        min_objects (int): Fewest shapes to aim for. Defaults to 1.
        max_objects (int): Most shapes per image. Defaults to 4.
        size_range (tuple[float, float]): Shape diameter as a fraction of
            ``min(height, width)``. Defaults to ``(0.12, 0.45)``.

    Returns:
        tuple[np.ndarray, list[ShapeObject]]: The ``(H, W, 3)`` uint8 RGB
        image and its shapes, bottom-most first.

    Example:
        >>> img, objs = render_scene(np.random.default_rng(0), 64, 64)
        >>> img.shape, 1 <= len(objs) <= 4
        ((64, 64, 3), True)
        >>> all((img[o.visible_mask] == o.color).all() for o in objs)
        True
    """
    if not 1 <= min_objects <= max_objects:
        raise ValueError('need 1 <= min_objects <= max_objects, got '
                         f'{min_objects} and {max_objects}')
    image, bg_colors = render_background(rng, height, width)
    target = int(rng.integers(min_objects, max_objects + 1))
    owner = np.full((height, width), -1, dtype=np.int16)
    full_masks: List[np.ndarray] = []
    full_areas: List[int] = []
    visible_areas: List[int] = []
    polygons: List[Optional[List[float]]] = []
    labels: List[int] = []
    colors: List[Tuple[int, int, int]] = []
    tries, max_tries = 0, 12 * max_objects
    while len(labels) < target and tries < max_tries:
        tries += 1
        label = int(rng.integers(0, len(SHAPE_CLASSES)))
        mask, polygon = sample_shape(rng, height, width, label, size_range)
        if labels:
            hidden = np.bincount(
                owner[mask].astype(np.int64) + 1,
                minlength=len(labels) + 1)[1:]
            left = np.asarray(visible_areas) - hidden
            need = np.maximum(MIN_VISIBLE_AREA,
                              MIN_VISIBLE_FRAC * np.asarray(full_areas))
            if (left < need).any():
                continue
            visible_areas = [int(v) for v in left]
        owner[mask] = len(labels)
        area = int(mask.sum())
        full_masks.append(mask)
        full_areas.append(area)
        visible_areas.append(area)
        polygons.append(polygon)
        labels.append(label)
        colors.append(sample_color(rng, bg_colors, colors))
    objects = []
    for k, label in enumerate(labels):
        visible = owner == k
        image[visible] = colors[k]
        objects.append(
            ShapeObject(label=label, color=colors[k],
                        full_mask=full_masks[k], visible_mask=visible,
                        polygon=polygons[k]))
    return image, objects


def render_single_shape(
        rng: np.random.Generator,
        height: int,
        width: int,
        label: int,
        size_range: Tuple[float, float] = (0.4, 0.8)) -> np.ndarray:
    """Render a classification image: one shape near the image centre.

    Args:
        rng (np.random.Generator): Source of randomness.
        height (int): Image height.
        width (int): Image width.
        label (int): Index into :data:`SHAPE_CLASSES`.
        size_range (tuple[float, float]): Shape diameter as a fraction of
            ``min(height, width)``. Defaults to ``(0.4, 0.8)``.

    Returns:
        np.ndarray: The ``(H, W, 3)`` uint8 RGB image.

    Example:
        >>> img = render_single_shape(np.random.default_rng(0), 32, 32, 0)
        >>> img.shape
        (32, 32, 3)
    """
    image, bg_colors = render_background(rng, height, width)
    jitter = 0.12 * min(height, width)
    mask, _ = sample_shape(rng, height, width, label, size_range,
                           center=(width / 2.0, height / 2.0),
                           jitter=jitter, min_area=16)
    image[mask] = sample_color(rng, bg_colors)
    return image

# Copyright (c) mmprecond contributors. All rights reserved.
"""mmcv's compiled CPU ops that Faster R-CNN needs, against plain Python.

The environment builds mmcv 2.1.0 from source against the local torch; these
tests catch a broken or missing build of ``nms`` and ``roi_align`` before any
detector runs.
"""
import math
from typing import List

import pytest
import torch

ops = pytest.importorskip('mmcv.ops')


def reference_nms(boxes: torch.Tensor, scores: torch.Tensor,
                  iou_threshold: float) -> List[int]:
    """Greedy NMS: keep the best box, drop others with IoU > threshold."""
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep: List[int] = []
    for i in order:
        x1, y1, x2, y2 = boxes[i].tolist()
        suppressed = False
        for j in keep:
            a1, b1, a2, b2 = boxes[j].tolist()
            iw = max(0.0, min(x2, a2) - max(x1, a1))
            ih = max(0.0, min(y2, b2) - max(y1, b1))
            inter = iw * ih
            union = (x2 - x1) * (y2 - y1) + (a2 - a1) * (b2 - b1) - inter
            if inter / union > iou_threshold:
                suppressed = True
                break
        if not suppressed:
            keep.append(i)
    return keep


def random_boxes(num: int, size: float, gen: torch.Generator) -> torch.Tensor:
    """``num`` boxes ``(x1, y1, x2, y2)`` inside a ``size`` square."""
    xy = torch.rand(num, 2, generator=gen) * size * 0.8
    wh = torch.rand(num, 2, generator=gen) * size * 0.3 + 2.0
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize('iou_threshold', [0.3, 0.5, 0.7])
def test_nms_matches_greedy_reference(iou_threshold: float) -> None:
    gen = torch.Generator().manual_seed(0)
    # 20 boxes plus two jittered copies of each: overlaps at every IoU level
    base = random_boxes(20, 40.0, gen)
    boxes = torch.cat([base] + [
        base + (torch.rand(20, 4, generator=gen) - 0.5) * 2 * shift
        for shift in (0.5, 2.0)
    ])
    scores = torch.rand(len(boxes), generator=gen)
    dets, inds = ops.nms(boxes, scores, iou_threshold)
    want = reference_nms(boxes, scores, iou_threshold)
    assert 0 < len(want) < len(boxes)
    assert inds.tolist() == want
    torch.testing.assert_close(dets[:, :4], boxes[want])
    torch.testing.assert_close(dets[:, 4], scores[want])


def bilinear(feat: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """Bilinear sample of ``feat`` (C, H, W) with RoIAlign's border rules."""
    _, height, width = feat.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return feat.new_zeros(feat.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * feat[:, y0, x0] + hy * lx * feat[:, y0, x1] +
            ly * hx * feat[:, y1, x0] + ly * lx * feat[:, y1, x1])


def reference_roi_align(feats: torch.Tensor, rois: torch.Tensor,
                        out_size: int, spatial_scale: float,
                        sampling_ratio: int, aligned: bool) -> torch.Tensor:
    """RoIAlign (average pooling) written out sample by sample."""
    out = feats.new_zeros(len(rois), feats.shape[1], out_size, out_size)
    offset = 0.5 if aligned else 0.0
    for k, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        start_x, start_y = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        roi_w = x2 * spatial_scale - offset - start_x
        roi_h = y2 * spatial_scale - offset - start_y
        if not aligned:
            roi_w, roi_h = max(roi_w, 1.0), max(roi_h, 1.0)
        bin_w, bin_h = roi_w / out_size, roi_h / out_size
        grid_h = sampling_ratio or math.ceil(roi_h / out_size)
        grid_w = sampling_ratio or math.ceil(roi_w / out_size)
        count = max(grid_h * grid_w, 1)
        for ph in range(out_size):
            for pw in range(out_size):
                acc = feats.new_zeros(feats.shape[1])
                for iy in range(grid_h):
                    y = start_y + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_x + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        acc += bilinear(feats[int(b)], y, x)
                out[k, :, ph, pw] = acc / count
    return out


@pytest.mark.parametrize('sampling_ratio,aligned', [(2, True), (0, True),
                                                    (2, False)])
def test_roi_align_matches_reference(sampling_ratio: int,
                                     aligned: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 3, 12, 10, generator=gen)
    # image coordinates at stride 4; some RoIs cross the feature border
    rois = torch.tensor([[0, 4.0, 6.0, 30.0, 22.0],
                         [1, 0.0, 0.0, 39.0, 47.0],
                         [0, 20.5, 30.25, 52.0, 60.0],
                         [1, 10.0, 10.0, 12.0, 13.0]])
    got = ops.roi_align(feats, rois, (4, 4), 0.25, sampling_ratio, 'avg',
                        aligned)
    want = reference_roi_align(feats, rois, 4, 0.25, sampling_ratio, aligned)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_roi_align_gradient() -> None:
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(1, 2, 6, 6, generator=gen, dtype=torch.float64,
                        requires_grad=True)
    rois = torch.tensor([[0, 1.3, 0.7, 4.6, 5.2], [0, 0.0, 2.0, 3.0, 4.5]],
                        dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda f: ops.roi_align(f, rois, (2, 2), 1.0, 2, 'avg', True),
        (feats, ))

# Copyright (c) mmprecond contributors. All rights reserved.
"""Tests of the synthetic shapes datasets (real files, real readers)."""
from __future__ import annotations

import glob
import json
import os
import os.path as osp
import subprocess
import sys
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from mmprecond.datasets import (
    SHAPE_CLASSES,
    SHAPE_PALETTE,
    ensure_synthetic_cls,
    ensure_synthetic_coco,
    generate_synthetic_cls,
    generate_synthetic_coco,
    render_scene,
    synthetic_metainfo,
)
from mmprecond.datasets.synthetic import main

REPO = osp.abspath(osp.join(osp.dirname(__file__), '..', '..'))
CFG_DIR = osp.join(REPO, 'configs', '_base_', 'datasets')
DET_CFG = osp.join(CFG_DIR, 'synthetic_coco_detection.py')
INS_CFG = osp.join(CFG_DIR, 'synthetic_coco_instance.py')
CLS_CFG = osp.join(CFG_DIR, 'synthetic_cls.py')

# Non-square on purpose: checks the (width, height) order end to end.
WIDTH, HEIGHT = 128, 96
COCO_ARGS = dict(num_train=12, num_val=6, img_size=(WIDTH, HEIGHT), seed=3)
CLS_ARGS = dict(num_train=15, num_val=10, img_size=32, seed=3)


@pytest.fixture(scope='module')
def coco_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp('synthetic_coco'))
    generate_synthetic_coco(root, **COCO_ARGS)
    return root


@pytest.fixture(scope='module')
def cls_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp('synthetic_cls'))
    generate_synthetic_cls(root, **CLS_ARGS)
    return root


def _read_bytes(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()


def _pixels(root: str, split: str) -> Dict[str, np.ndarray]:
    files = sorted(glob.glob(osp.join(root, split, '**', '*.png'),
                             recursive=True))
    return {
        osp.relpath(f, root): np.asarray(Image.open(f).convert('RGB'))
        for f in files
    }


def _load_image(root: str, split: str, coco: COCO, img_id: int) -> np.ndarray:
    info = coco.imgs[img_id]
    return np.asarray(Image.open(osp.join(root, split, info['file_name'])))


# --------------------------------------------------------------- generator


def test_deterministic_and_independent_of_global_rng(tmp_path):
    a, b, c = (str(tmp_path / n) for n in 'abc')
    np.random.seed(1)
    generate_synthetic_coco(a, **COCO_ARGS)
    np.random.seed(2)
    np.random.rand(17)
    generate_synthetic_coco(b, **COCO_ARGS)
    generate_synthetic_coco(c, **dict(COCO_ARGS, seed=4))

    for split in ('train', 'val'):
        ann = osp.join('annotations', f'instances_{split}.json')
        assert _read_bytes(osp.join(a, ann)) == _read_bytes(osp.join(b, ann))
        assert _read_bytes(osp.join(a, ann)) != _read_bytes(osp.join(c, ann))
        pix_a, pix_b, pix_c = (_pixels(r, split) for r in (a, b, c))
        assert len(pix_a) == COCO_ARGS[f'num_{split}']
        assert pix_a.keys() == pix_b.keys() == pix_c.keys()
        assert all(np.array_equal(pix_a[k], pix_b[k]) for k in pix_a)
        assert not any(np.array_equal(pix_a[k], pix_c[k]) for k in pix_a)


def test_cls_deterministic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in 'abc')
    for root, seed in ((a, 0), (b, 0), (c, 1)):
        generate_synthetic_cls(root, num_train=10, num_val=5, img_size=32,
                               seed=seed)
    for split in ('train', 'val'):
        ann = osp.join('meta', f'{split}.txt')
        assert _read_bytes(osp.join(a, ann)) == _read_bytes(osp.join(b, ann))
        pix_a, pix_b, pix_c = (_pixels(r, split) for r in (a, b, c))
        assert pix_a.keys() == pix_b.keys()
        assert all(np.array_equal(pix_a[k], pix_b[k]) for k in pix_a)
        common = pix_a.keys() & pix_c.keys()
        assert not any(np.array_equal(pix_a[k], pix_c[k]) for k in common)


def test_render_scene_occlusion_order():
    """Later shapes own every pixel they cover; nothing is unannotated."""
    occluded = 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        image, objects = render_scene(rng, 80, 100, 2, 5)
        assert image.shape == (80, 100, 3) and image.dtype == np.uint8
        covered = np.zeros((80, 100), dtype=bool)
        for k, obj in enumerate(objects):
            # exactly the visible pixels carry the object's colour
            same = (image == np.asarray(obj.color, np.uint8)).all(-1)
            assert np.array_equal(same, obj.visible_mask)
            later = np.zeros_like(covered)
            for top in objects[k + 1:]:
                later |= top.full_mask
            assert np.array_equal(obj.visible_mask, obj.full_mask & ~later)
            assert obj.is_occluded == bool((obj.full_mask & later).any())
            occluded += obj.is_occluded
            assert obj.visible_mask.sum() >= max(24, 0.3 * obj.full_mask.sum())
            assert (obj.polygon is None) == (obj.name == 'ring')
            covered |= obj.full_mask
        union = np.zeros_like(covered)
        for obj in objects:
            assert not (union & obj.visible_mask).any()  # disjoint
            union |= obj.visible_mask
        assert np.array_equal(union, covered)
    assert occluded > 0


def test_coco_annotations_are_exact(coco_root):
    for split in ('train', 'val'):
        ann_file = osp.join(coco_root, 'annotations',
                            f'instances_{split}.json')
        coco = COCO(ann_file)
        assert [c['name'] for c in coco.dataset['categories']
                ] == list(SHAPE_CLASSES)
        assert sorted(coco.getCatIds()) == list(range(1, 6))
        assert len(coco.imgs) == COCO_ARGS[f'num_{split}']
        for img_id, info in coco.imgs.items():
            image = _load_image(coco_root, split, coco, img_id)
            assert image.shape == (info['height'], info['width'], 3)
            assert (info['width'], info['height']) == (WIDTH, HEIGHT)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
            assert 1 <= len(anns) <= 4
            for ann in anns:
                mask = coco.annToMask(ann).astype(bool)
                assert ann['area'] == int(mask.sum()) > 0
                assert ann['iscrowd'] == 0
                x, y, w, h = ann['bbox']
                ys, xs = np.nonzero(mask)
                # tight: the box encloses the mask and touches it on all sides
                assert (xs.min(), ys.min()) == (x, y)
                assert (xs.max() + 1, ys.max() + 1) == (x + w, y + h)
                name = coco.cats[ann['category_id']]['name']
                if name == 'ring':
                    assert isinstance(ann['segmentation'], dict)
                # occlusion check straight from the files: the mask is one
                # colour, and that colour appears nowhere else in the image
                colors = np.unique(image[mask], axis=0)
                assert len(colors) == 1
                same = (image == colors[0]).all(-1)
                assert np.array_equal(same, mask)
        ids = [a['id'] for a in coco.dataset['annotations']]
        assert sorted(ids) == list(range(1, len(ids) + 1))


def test_polygons_and_rle_describe_the_same_pixels(tmp_path, coco_root):
    rle_root = str(tmp_path / 'rle')
    generate_synthetic_coco(rle_root, mask_format='rle', **COCO_ARGS)
    poly = COCO(osp.join(coco_root, 'annotations', 'instances_train.json'))
    rle = COCO(osp.join(rle_root, 'annotations', 'instances_train.json'))
    num_polygons = 0
    for ann_id, p_ann in poly.anns.items():
        r_ann = rle.anns[ann_id]
        assert isinstance(r_ann['segmentation'], dict)
        num_polygons += isinstance(p_ann['segmentation'], list)
        assert r_ann['bbox'] == p_ann['bbox']
        assert r_ann['area'] == p_ann['area']
        assert np.array_equal(poly.annToMask(p_ann), rle.annToMask(r_ann))
    # both kinds of segmentation are exercised by the default format
    assert 0 < num_polygons < len(poly.anns)
    assert _pixels(rle_root, 'train').keys() == _pixels(coco_root,
                                                        'train').keys()


def test_every_class_appears(tmp_path):
    root = str(tmp_path / 'many')
    info = generate_synthetic_coco(root, num_train=40, num_val=0, img_size=64)
    with open(info['ann_files']['train']) as f:
        data = json.load(f)
    counts = np.bincount([a['category_id'] for a in data['annotations']],
                         minlength=6)
    assert counts[0] == 0 and (counts[1:] >= 5).all()
    assert info['num_annotations']['train'] == len(data['annotations'])
    assert data['images'] and info['num_images'] == {'train': 40, 'val': 0}


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        generate_synthetic_coco(str(tmp_path), mask_format='bitmap')
    with pytest.raises(ValueError):
        generate_synthetic_coco(str(tmp_path), min_objects=3, max_objects=2)
    with pytest.raises(TypeError):
        ensure_synthetic_coco(str(tmp_path), num_images=3)


# ------------------------------------------------------------ ensure / CLI


def _mtimes(root: str) -> Dict[str, int]:
    return {
        p: os.stat(p).st_mtime_ns
        for p in glob.glob(osp.join(root, '**', '*'), recursive=True)
        if osp.isfile(p) and not p.endswith('.lock')
    }


def test_ensure_coco_is_idempotent(tmp_path):
    root = str(tmp_path / 'coco')
    args = dict(num_train=6, num_val=3, img_size=48)
    assert ensure_synthetic_coco(root, **args) == root
    before = _mtimes(root)
    ann = osp.join(root, 'annotations', 'instances_train.json')
    first = _read_bytes(ann)
    ensure_synthetic_coco(root, **args)
    assert _mtimes(root) == before

    # different parameters: regenerated, stale images removed
    ensure_synthetic_coco(root, **dict(args, num_train=4, seed=1))
    assert _read_bytes(ann) != first
    assert len(os.listdir(osp.join(root, 'train'))) == 4
    with open(osp.join(root, 'meta.json')) as f:
        meta = json.load(f)
    assert meta['complete'] is True and meta['params']['seed'] == 1

    # an interrupted generation is redone
    meta['complete'] = False
    with open(osp.join(root, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    ensure_synthetic_coco(root, **dict(args, num_train=4, seed=1))
    with open(osp.join(root, 'meta.json')) as f:
        assert json.load(f)['complete'] is True


def test_ensure_cls_is_idempotent(tmp_path):
    root = str(tmp_path / 'cls')
    args = dict(num_train=10, num_val=5, img_size=32)
    assert ensure_synthetic_cls(root, **args) == root
    before = _mtimes(root)
    ensure_synthetic_cls(root, **args)
    assert _mtimes(root) == before
    ensure_synthetic_cls(root, **dict(args, num_train=7))
    assert len(glob.glob(osp.join(root, 'train', '*', '*.png'))) == 7
    with open(osp.join(root, 'meta', 'train.txt')) as f:
        assert len(f.readlines()) == 7


def test_cli(tmp_path):
    out = str(tmp_path / 'cli_coco')
    assert main(['coco', '--out', out, '--num-train', '3', '--num-val', '2',
                 '--img-size', '48', '--seed', '5']) == 0
    coco = COCO(osp.join(out, 'annotations', 'instances_val.json'))
    assert len(coco.imgs) == 2
    assert coco.imgs[1]['width'] == 48

    # the real entry point, as documented
    out = str(tmp_path / 'cli_cls')
    proc = subprocess.run(
        [sys.executable, '-m', 'mmprecond.datasets.synthetic', 'cls',
         '--out', out, '--num-train', '5', '--num-val', '5', '--img-size',
         '32'],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "found in sys.modules" not in proc.stderr
    with open(osp.join(out, 'meta', 'val.txt')) as f:
        assert len(f.readlines()) == 5


# ------------------------------------------------------------------ configs


def test_base_configs_parse():
    from mmengine.config import Config

    for path in (DET_CFG, INS_CFG, CLS_CFG):
        cfg = Config.fromfile(path)
        assert 'default_scope' not in cfg
        assert tuple(cfg.metainfo['classes']) == SHAPE_CLASSES
        assert cfg.val_evaluator == cfg.test_evaluator
    det, ins, cls = (Config.fromfile(p) for p in (DET_CFG, INS_CFG, CLS_CFG))
    meta = synthetic_metainfo()
    for cfg in (det, ins):
        assert cfg.dataset_type == 'CocoDataset'
        assert cfg.data_root == 'data/synthetic_coco/'
        assert [tuple(c) for c in cfg.metainfo['palette']] == SHAPE_PALETTE
        assert [tuple(c) for c in cfg.metainfo['palette']] == meta['palette']
        ds = cfg.train_dataloader.dataset
        assert ds.ann_file == 'annotations/instances_train.json'
        assert ds.data_prefix == dict(img='train/')
        assert ds.filter_cfg == dict(filter_empty_gt=True, min_size=4)
        assert cfg.val_evaluator.ann_file == (
            'data/synthetic_coco/annotations/instances_val.json')
    assert det.val_evaluator.metric == 'bbox'
    assert list(ins.val_evaluator.metric) == ['bbox', 'segm']
    assert cls.dataset_type == 'CustomDataset'
    assert cls.num_classes == len(SHAPE_CLASSES)
    assert cls.data_preprocessor.num_classes == len(SHAPE_CLASSES)
    assert cls.val_evaluator == dict(type='Accuracy', topk=(1, ))


def _dataset_cfg(cfg_path: str, loader: str, root: str):
    from mmengine.config import Config

    cfg = Config.fromfile(cfg_path)
    ds_cfg = cfg[loader].dataset
    ds_cfg.data_root = root
    return ds_cfg


# -------------------------------------------------------------------- mmdet


def test_mmdet_coco_dataset_reads_it(coco_root):
    from mmdet.registry import DATASETS
    from mmdet.utils import register_all_modules
    from mmengine.registry import DefaultScope

    # register mmdet's modules, but leave the process-wide default scope
    # alone: it is only set while the datasets (and pipelines) are built
    register_all_modules(init_default_scope=False)
    coco = COCO(osp.join(coco_root, 'annotations', 'instances_train.json'))

    with DefaultScope.overwrite_default_scope('mmdet'):
        dataset = DATASETS.build(
            _dataset_cfg(INS_CFG, 'train_dataloader', coco_root))
        det_val = DATASETS.build(
            _dataset_cfg(DET_CFG, 'val_dataloader', coco_root))
    assert len(dataset) == COCO_ARGS['num_train']
    assert tuple(dataset.metainfo['classes']) == SHAPE_CLASSES
    for idx in (0, len(dataset) - 1):
        item = dataset[idx]
        sample = item['data_samples']
        num = len(coco.getAnnIds(imgIds=[sample.img_id]))
        gt = sample.gt_instances
        assert len(gt) == num and gt.bboxes.shape == (num, 4)
        assert len(gt.masks) == num
        # Resize keeps the ratio and fits (160, 160): 128x96 -> 160x120
        assert tuple(item['inputs'].shape) == (3, 120, 160)
        assert (gt.masks.height, gt.masks.width) == (120, 160)
        assert sample.ori_shape == (HEIGHT, WIDTH)
        # every box still encloses its (resized, maybe flipped) mask
        masks = gt.masks.to_ndarray().astype(bool)
        boxes = gt.bboxes.tensor.numpy()
        for box, mask in zip(boxes, masks):
            ys, xs = np.nonzero(mask)
            assert xs.min() >= box[0] - 1 and xs.max() + 1 <= box[2] + 1
            assert ys.min() >= box[1] - 1 and ys.max() + 1 <= box[3] + 1

    assert len(det_val) == COCO_ARGS['num_val']
    sample = det_val[0]['data_samples']
    assert len(sample.gt_instances) == len(
        COCO(osp.join(coco_root, 'annotations',
                      'instances_val.json')).getAnnIds(imgIds=[sample.img_id]))


def _perfect_predictions(coco: COCO, wrong_labels: bool = False) -> List[dict]:
    import torch

    samples = []
    for img_id, info in coco.imgs.items():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img_id]))
        boxes = [[x, y, x + w, y + h] for x, y, w, h in
                 (a['bbox'] for a in anns)]
        labels = [a['category_id'] - 1 for a in anns]
        if wrong_labels:
            labels = [(lb + 1) % len(SHAPE_CLASSES) for lb in labels]
        masks = np.stack([coco.annToMask(a) for a in anns]).astype(bool)
        samples.append(
            dict(
                img_id=img_id,
                ori_shape=(info['height'], info['width']),
                pred_instances=dict(
                    bboxes=torch.tensor(boxes, dtype=torch.float32),
                    scores=torch.ones(len(anns)),
                    labels=torch.tensor(labels),
                    masks=torch.from_numpy(masks))))
    return samples


def test_coco_metric_perfect_predictions(coco_root):
    from mmdet.evaluation import CocoMetric

    ann_file = osp.join(coco_root, 'annotations', 'instances_val.json')
    coco = COCO(ann_file)
    for wrong in (False, True):
        metric = CocoMetric(ann_file=ann_file, metric=['bbox', 'segm'])
        metric.dataset_meta = synthetic_metainfo()
        samples = _perfect_predictions(coco, wrong_labels=wrong)
        metric.process({}, samples)
        results = metric.evaluate(len(samples))
        if wrong:  # the metric does look at the predictions
            assert results['coco/bbox_mAP'] < 0.2
        else:
            assert results['coco/bbox_mAP'] == 1.0
            assert results['coco/segm_mAP'] == 1.0
            assert results['coco/bbox_mAP_50'] == 1.0


# -------------------------------------------------------------- mmpretrain


def test_mmpretrain_custom_dataset_reads_it(cls_root):
    # mmpretrain 1.2 imports torchvision as soon as it is imported
    pytest.importorskip(
        'torchvision', reason='mmpretrain needs torchvision to import')
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import DATASETS
    from mmpretrain.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    cfg = _dataset_cfg(CLS_CFG, 'train_dataloader', cls_root)
    folder_cfg = cfg.copy()
    folder_cfg.ann_file = ''  # read the class folders instead
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        train = DATASETS.build(cfg)
        val = DATASETS.build(
            _dataset_cfg(CLS_CFG, 'val_dataloader', cls_root))
        folders = DATASETS.build(folder_cfg)
    assert len(train) == CLS_ARGS['num_train']
    assert len(val) == CLS_ARGS['num_val']
    assert tuple(train.CLASSES) == SHAPE_CLASSES
    labels = train.get_gt_labels()
    # balanced classes: 15 images, 5 classes -> 3 each
    assert np.bincount(labels, minlength=5).tolist() == [3] * 5
    for idx, label in enumerate(labels):
        path = train.get_data_info(idx)['img_path']
        assert osp.basename(osp.dirname(path)) == SHAPE_CLASSES[label]
    item = train[0]
    assert tuple(item['inputs'].shape) == (3, 64, 64)
    assert int(item['data_samples'].gt_label) == int(labels[0])

    # folder mode (no ann file) assigns the very same labels
    assert tuple(folders.CLASSES) == SHAPE_CLASSES
    by_path = {folders.get_data_info(i)['img_path']: int(lb)
               for i, lb in enumerate(folders.get_gt_labels())}
    assert by_path == {train.get_data_info(i)['img_path']: int(lb)
                       for i, lb in enumerate(labels)}

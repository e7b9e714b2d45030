# Copyright (c) mmprecond contributors. All rights reserved.
"""Derive a config that trains a zoo config on the built-in synthetic data.

Every config of the zoo (``configs/{baselines,nkfac,adamr,afopt}``) reads
COCO or ImageNet.  This tool writes a *derived* config that runs the same
experiment on mmprecond's synthetic shapes data, so any zoo config can be
exercised on a machine without those datasets (or without network access)::

    CFG=configs/nkfac/retinanet_r50_fpn_nkfac-1x_coco.py
    python tools/misc/on_synthetic.py $CFG --out work_dirs/retinanet_synthetic.py
    python tools/train.py work_dirs/retinanet_synthetic.py

Without ``--out`` the config goes to
``work_dirs/synthetic/<config name>_synthetic.py``.

What changes (and nothing else):

* **Data.**  Each dataloader's dataset becomes the synthetic one described
  by ``configs/_base_/datasets/synthetic_coco_detection.py`` (mmdet
  configs: ``CocoDataset`` on ``data/synthetic_coco``, which carries boxes
  and masks) or ``configs/_base_/datasets/synthetic_cls.py`` (mmpretrain
  configs: ``CustomDataset`` on ``data/synthetic_cls``): type, data root,
  annotation files, image prefixes and class names.  The zoo config's own
  pipelines, filters and samplers are kept, and COCO evaluators are pointed
  at the synthetic annotations.  The data is generated first if the
  annotation files are missing.
* **Class count.**  Every ``num_classes`` in ``model`` and
  ``data_preprocessor`` (``roi_head.bbox_head``, ``roi_head.mask_head``,
  RetinaNet's ``bbox_head``, mmpretrain's ``head`` and batch augments)
  becomes ``len(SHAPE_CLASSES)`` = 5; class-agnostic ones (``1``, e.g. an
  explicit ``RPNHead``) are left alone.
* **Image size.**  Every absolute size in the pipelines (``scale``,
  ``scales``, ``crop_size``, ``size``, ``img_scale``; integers only, so
  relative crop sizes and ratios are untouched) is multiplied by
  ``--img-size / reference``, the reference being the zoo's 800 px short
  side for COCO and 224 px crop for ImageNet.  Detection defaults to 160
  px (the synthetic images' size), except for the two-stage DETR-style
  detectors (DINO, Deformable DETR with ``as_two_stage``): they take
  ``num_queries`` (DINO: 900) of the encoder's tokens with ``topk``, so the
  default becomes the smallest size whose smallest training scale gives
  that many (DINO-4scale: 335 px), and a smaller ``--img-size`` stops with
  a message naming the size to use.  Classification defaults to 224 px,
  i.e. unchanged: mmpretrain's Swin asserts that every stage's feature map
  is at least one 7x7 window, which needs 224 px inputs.
* **Pretrained weights.**  ``init_cfg=dict(type='Pretrained', ...)`` and
  ``pretrained=...`` entries in the model are removed (nothing can be
  downloaded offline; the model trains from its random init), and so is
  ``load_from``.
* **Length.**  ``IterBasedTrainLoop`` for ``--max-iters`` iterations with
  one validation and one checkpoint at the end.  The ``LoggerHook`` and
  ``PrecondStatsHook`` intervals become at most ``max_iters // 5`` (at
  least 1, at most 10 for the logger), so even a 2-iteration run logs its
  losses and optimizer statistics.  Parameter
  schedulers are kept as they are (an epoch-based one without ``end`` gets
  the zoo config's ``max_epochs`` so it means the same).
* **Batch.**  ``--batch-size`` images per GPU (default 2; ``0`` keeps the
  zoo config's), ``--num-workers`` if given.
* **AMP**, only with ``--fp32``: ``AmpOptimWrapper`` becomes
  ``OptimWrapper`` (MMEngine's AMP wrapper needs a GPU).

The model (architecture and ``train_cfg``/``test_cfg``) and the optimizer
wrapper (type, constructor, optimizer and its hyper-parameters,
``paramwise_cfg``, ``clip_grad``) are exactly those of the zoo config.

The same transformation is available in Python::

    from mmengine.config import Config
    from on_synthetic import synthetic_config     # tools/misc on sys.path
    cfg = synthetic_config(Config.fromfile(zoo_cfg), img_size=128,
                           max_iters=2)
"""
import argparse
import copy
import os
import os.path as osp
import sys
from typing import Any, Dict, List, Optional

from mmengine.config import Config

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DATASET_BASE_DIR = osp.join(REPO_ROOT, 'configs', '_base_', 'datasets')

#: The synthetic dataset config each task reads its data from.
SYNTHETIC_BASES = {
    'det': osp.join(DATASET_BASE_DIR, 'synthetic_coco_detection.py'),
    'cls': osp.join(DATASET_BASE_DIR, 'synthetic_cls.py'),
}
#: ``default_scope`` -> task.
TASK_OF_SCOPE = {'mmdet': 'det', 'mmpretrain': 'cls'}
#: Short side (COCO) / crop (ImageNet) the zoo pipelines are written for.
REFERENCE_SIZE = {'det': 800, 'cls': 224}
#: ``--img-size`` when none is given.
DEFAULT_IMG_SIZE = {'det': 160, 'cls': 224}
#: Pipeline keys that hold absolute pixel sizes.
SIZE_KEYS = ('scale', 'scales', 'crop_size', 'size', 'img_scale')
#: Dataset keys that name the data; the rest (pipeline, filters, ...) stay.
DATA_KEYS = ('type', 'data_root', 'ann_file', 'data_prefix', 'metainfo')
#: Dataset keys kept from the zoo config when the dataset type is unchanged.
KEPT_DATASET_KEYS = ('pipeline', 'filter_cfg', 'test_mode', 'backend_args')
SPLITS = ('train', 'val', 'test')
#: DETR-style detectors (``model.type``).  The two-stage ones (DINO, and
#: Deformable DETR with ``as_two_stage=True``) pick ``num_queries`` of the
#: encoder's tokens with ``topk``, so the smallest training image must give
#: at least that many tokens (DINO: 900; at 160 px it has about 534).
DETR_TYPES = ('DETR', 'DeformableDETR', 'ConditionalDETR', 'DABDETR', 'DINO')
#: Resize transforms whose ``scale`` / ``scales`` set the short side.
RESIZE_TYPES = ('Resize', 'RandomResize', 'RandomChoiceResize',
                'FixShapeResize')
#: Logged points a run of ``--max-iters`` iterations gets at least (when the
#: config's interval is longer): logger and ``PrecondStatsHook`` intervals
#: become at most ``max_iters // LOGGED_POINTS`` (and at least 1).
LOGGED_POINTS = 5


def task_of(cfg: Config) -> str:
    """``'det'`` for mmdet configs, ``'cls'`` for mmpretrain configs."""
    scope = cfg.get('default_scope')
    if scope not in TASK_OF_SCOPE:
        raise ValueError(
            f"default_scope {scope!r} is not supported; expected one of "
            f'{sorted(TASK_OF_SCOPE)}')
    return TASK_OF_SCOPE[scope]


def scale_sizes(node: Any, factor: float) -> Any:
    """Multiply every integer size under :data:`SIZE_KEYS` by ``factor``.

    Walks dicts and lists (``RandomChoice`` / ``TestTimeAug`` nest
    transforms), rounding to the nearest integer (at least 1).  Float sizes
    (relative crops) and other keys are returned unchanged.
    """

    def scaled(value: Any) -> Any:
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            return max(1, int(round(value * factor)))
        if isinstance(value, (list, tuple)):
            return type(value)(scaled(v) for v in value)
        return value

    if isinstance(node, dict):
        return type(node)({
            k: scaled(v) if k in SIZE_KEYS else scale_sizes(v, factor)
            for k, v in node.items()
        })
    if isinstance(node, (list, tuple)):
        return type(node)(scale_sizes(v, factor) for v in node)
    return node


def set_num_classes(node: Any, num_classes: int) -> int:
    """Set every ``num_classes`` other than 1 under ``node``, in place.

    Returns:
        int: How many entries were changed.
    """
    changed = 0
    if isinstance(node, dict):
        for key, value in node.items():
            if (key == 'num_classes' and isinstance(value, int)
                    and value != 1):
                node[key] = num_classes
                changed += 1
            else:
                changed += set_num_classes(value, num_classes)
    elif isinstance(node, (list, tuple)):
        changed += sum(set_num_classes(v, num_classes) for v in node)
    return changed


def _is_pretrained(init_cfg: Any) -> bool:
    return isinstance(init_cfg, dict) and init_cfg.get('type') in (
        'Pretrained', 'PretrainedInit')


def drop_pretrained(node: Any) -> List[str]:
    """Remove pretrained-checkpoint initialisation under ``node``, in place.

    ``init_cfg=dict(type='Pretrained', ...)`` becomes ``None`` (or is taken
    out of an ``init_cfg`` list) and a ``pretrained`` path becomes ``None``.

    Returns:
        list[str]: The checkpoints that are no longer loaded.
    """
    dropped = []
    if isinstance(node, dict):
        for key, value in list(node.items()):
            if key == 'init_cfg' and _is_pretrained(value):
                dropped.append(str(value.get('checkpoint')))
                node[key] = None
            elif key == 'init_cfg' and isinstance(value, list):
                kept = [c for c in value if not _is_pretrained(c)]
                dropped += [
                    str(c.get('checkpoint')) for c in value
                    if _is_pretrained(c)
                ]
                node[key] = kept or None
            elif key == 'pretrained' and isinstance(value, str):
                dropped.append(value)
                node[key] = None
            else:
                dropped += drop_pretrained(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            dropped += drop_pretrained(value)
    return dropped


def _leaf_dataset(dataset: dict) -> dict:
    """The dataset dict under dataset wrappers (``RepeatDataset`` etc.)."""
    while 'pipeline' not in dataset and isinstance(
            dataset.get('dataset'), dict):
        dataset = dataset['dataset']
    return dataset


def replace_dataset(dataset: dict, synthetic: dict, factor: float) -> None:
    """Point ``dataset`` (in place) at the synthetic ``synthetic`` data.

    The data-naming keys (:data:`DATA_KEYS`) come from ``synthetic``; the
    pipeline (sizes scaled by ``factor``) and, if the dataset type is
    unchanged, filters and loading options stay as in ``dataset``.
    """
    leaf = _leaf_dataset(dataset)
    same_type = leaf.get('type') == synthetic.get('type')
    kept = {
        k: leaf[k]
        for k in KEPT_DATASET_KEYS if k in leaf and (same_type or k in (
            'pipeline', 'test_mode'))
    }
    leaf.clear()
    leaf.update({k: copy.deepcopy(synthetic[k])
                 for k in DATA_KEYS if k in synthetic})
    leaf.update(kept)
    pipeline = list(leaf.get('pipeline', []))
    if pipeline and not any(
            str(t.get('type', '')).startswith('Load') for t in pipeline
            if isinstance(t, dict)):
        # in-memory datasets (CIFAR, MNIST) load nothing; the synthetic
        # images are files
        pipeline.insert(0, dict(type='LoadImageFromFile'))
    leaf['pipeline'] = scale_sizes(pipeline, factor)


def _set_evaluator_ann(evaluator: Any, ann_file: str) -> None:
    if isinstance(evaluator, dict) and 'ann_file' in evaluator:
        evaluator['ann_file'] = ann_file
    elif isinstance(evaluator, (list, tuple)):
        for item in evaluator:
            _set_evaluator_ann(item, ann_file)


def _fill_scheduler_ends(schedulers: Any, max_epochs: Optional[int]) -> None:
    """Give epoch-based schedulers without ``end`` the zoo's ``max_epochs``.

    The runner would default ``end`` to the *iteration* loop's single
    epoch, which changes the schedule (or makes ``begin > end``).
    """
    if max_epochs is None:
        return
    if isinstance(schedulers, dict):
        schedulers = [schedulers]
    for scheduler in schedulers or []:
        if scheduler.get('by_epoch', True) and 'end' not in scheduler:
            scheduler['end'] = max_epochs


def _original_max_epochs(train_cfg: dict) -> Optional[int]:
    if train_cfg.get('type', 'EpochBasedTrainLoop') in (
            'EpochBasedTrainLoop', 'mmengine.EpochBasedTrainLoop'):
        if train_cfg.get('by_epoch', True):
            return train_cfg.get('max_epochs')
    return None


def ensure_synthetic_data(task: str, data_root: str) -> None:
    """Generate the synthetic data under ``data_root`` if it is missing.

    An existing dataset is never regenerated, whatever its parameters.
    """
    from mmprecond.datasets import ensure_synthetic_cls, ensure_synthetic_coco

    if task == 'det':
        needed = [
            osp.join(data_root, 'annotations', f'instances_{s}.json')
            for s in ('train', 'val')
        ]
        if not all(map(osp.exists, needed)):
            ensure_synthetic_coco(data_root)
    else:
        needed = [osp.join(data_root, 'meta', f'{s}.txt')
                  for s in ('train', 'val')]
        if not all(map(osp.exists, needed)):
            ensure_synthetic_cls(data_root)


def _short_sides(transform: dict) -> List[int]:
    """The short sides (pixels) a resize transform can produce."""
    sides = []
    scales = transform.get('scales', transform.get('scale'))
    if isinstance(scales, int):
        scales = [scales]
    elif isinstance(scales, tuple) or (
            isinstance(scales, list) and scales and isinstance(scales[0], int)):
        scales = [scales]
    for scale in scales or []:
        side = min(scale) if isinstance(scale, (list, tuple)) else scale
        ratio = transform.get('ratio_range')
        if transform.get('type') == 'RandomResize' and ratio:
            side = side * min(ratio)
        sides.append(int(side))
    return sides


def min_short_side(pipeline: Any, side: Optional[int] = None) -> Optional[int]:
    """The smallest short side a (scaled) pipeline gives a square image.

    The last resize of each path through the pipeline (``RandomChoice``
    branches are followed separately) sets the short side; an absolute
    ``RandomCrop`` after it can shorten it.  ``None`` if nothing resizes.
    """
    for t in pipeline or []:
        if not isinstance(t, dict):
            continue
        kind = str(t.get('type', '')).split('.')[-1]
        if kind in RESIZE_TYPES and _short_sides(t):
            side = min(_short_sides(t))
        elif kind == 'RandomChoice':
            ends = [min_short_side(branch, side)
                    for branch in t.get('transforms', [])]
            ends = [e for e in ends if e is not None]
            side = min(ends) if ends else side
        elif kind == 'RandomCrop' and side is not None and t.get(
                'crop_type', 'absolute') in ('absolute', 'absolute_range'):
            crop = t.get('crop_size')
            if isinstance(crop, (list, tuple)) and all(
                    isinstance(c, int) for c in crop):
                side = min(side, min(crop))
    return side


def encoder_tokens(model: dict, side: int) -> int:
    """Encoder tokens of a DETR-style detector on a ``side`` px square image.

    The backbone's first output stride is ``4 * 2**min(out_indices)``
    (ResNet / Swin); each further level halves it (the extra levels are
    stride-2 convolutions); the neck's ``num_outs`` levels in all.
    """
    out_indices = model.get('backbone', {}).get('out_indices', (3, ))
    stride = 4 * 2**min(out_indices)
    neck = model.get('neck') or {}
    attn = ((model.get('encoder') or {}).get('layer_cfg') or {}).get(
        'self_attn_cfg') or {}
    levels = int(model.get('num_feature_levels') or neck.get('num_outs')
                 or attn.get('num_levels') or len(out_indices))
    return sum((-(-side // (stride * 2**lvl)))**2 for lvl in range(levels))


def detr_queries_from_tokens(model: dict) -> int:
    """How many encoder tokens a DETR-style model takes with ``topk`` (0: none)."""
    kind = str(model.get('type', '')).split('.')[-1]
    if kind == 'DINO' or (kind == 'DeformableDETR'
                          and model.get('as_two_stage', False)):
        return int(model.get('num_queries', 300))
    return 0


def smallest_img_size(cfg: Config, factor_of: Any, start: int) -> int:
    """The smallest ``--img-size >= start`` at which a two-stage DETR runs.

    ``factor_of(img_size)`` is the pipeline scale factor.  Every train and
    test pipeline's smallest short side must give the encoder at least
    ``num_queries`` tokens.
    """
    needed = detr_queries_from_tokens(cfg.model)
    size = start
    while needed and size < 4096:
        sides = []
        for split in SPLITS:
            loader = cfg.get(f'{split}_dataloader')
            if loader:
                pipeline = _leaf_dataset(loader['dataset']).get('pipeline')
                side = min_short_side(scale_sizes(pipeline, factor_of(size)))
                if side is not None:
                    sides.append(side)
        if all(encoder_tokens(cfg.model, s) >= needed for s in sides):
            return size
        size += 1
    return size


def synthetic_config(cfg: Config,
                     data_root: Optional[str] = None,
                     img_size: Optional[int] = None,
                     max_iters: int = 20,
                     batch_size: int = 2,
                     num_workers: Optional[int] = None,
                     fp32: bool = False) -> Config:
    """The zoo config ``cfg`` moved onto the synthetic data.

    See the module docstring for exactly what changes.  ``cfg`` itself is
    not modified.

    Args:
        cfg (Config): A loaded zoo config (mmdet or mmpretrain).
        data_root (str, optional): Synthetic dataset root.  Defaults to the
            synthetic base config's (``data/synthetic_coco/`` or
            ``data/synthetic_cls/``).
        img_size (int, optional): Target short side / crop in pixels.
            Defaults to :data:`DEFAULT_IMG_SIZE` of the task.
        max_iters (int): Training iterations.  Defaults to 20.
        batch_size (int): Images per GPU in every dataloader; 0 keeps the
            config's.  Defaults to 2.
        num_workers (int, optional): Dataloader workers; ``None`` keeps the
            config's.
        fp32 (bool): Replace ``AmpOptimWrapper`` by ``OptimWrapper``.

    Returns:
        Config: The derived config.
    """
    cfg = copy.deepcopy(cfg)
    task = task_of(cfg)
    base = Config.fromfile(SYNTHETIC_BASES[task])
    classes = base.metainfo['classes']
    if task == 'det' and str(cfg.model.get('type', '')).split(
            '.')[-1] in DETR_TYPES:
        need = smallest_img_size(cfg, lambda s: s / REFERENCE_SIZE[task],
                                 DEFAULT_IMG_SIZE[task])
        if img_size is None:
            img_size = need
        elif img_size < need:
            raise ValueError(
                f'{cfg.model.type} picks num_queries={cfg.model.num_queries} '
                f'encoder tokens with topk, and at img_size={img_size} the '
                'smallest training scale of its pipeline gives fewer (mmdet '
                "would stop with 'RuntimeError: selected index k out of "
                f"range'). Use --img-size {need} or more (img_size={need} in "
                'Python).')
    if img_size is None:
        img_size = DEFAULT_IMG_SIZE[task]
    factor = img_size / REFERENCE_SIZE[task]
    root = base.data_root if data_root is None else data_root
    root = osp.join(root, '')  # mmengine joins data_root + ann_file

    # data
    for split in SPLITS:
        loader = cfg.get(f'{split}_dataloader')
        if not loader:
            continue
        base_split = 'train' if split == 'train' else 'val'
        synthetic = copy.deepcopy(
            base[f'{base_split}_dataloader']['dataset'].to_dict())
        synthetic['data_root'] = root
        replace_dataset(loader['dataset'], synthetic, factor)
        if batch_size:
            loader['batch_size'] = batch_size
        if num_workers is not None:
            loader['num_workers'] = num_workers
            if num_workers == 0:
                loader['persistent_workers'] = False
    val_ann = base.val_dataloader.dataset.ann_file
    for split in ('val', 'test'):
        _set_evaluator_ann(cfg.get(f'{split}_evaluator'), root + val_ann)

    # class count and pretrained weights
    set_num_classes(cfg.model, len(classes))
    if 'data_preprocessor' in cfg:
        set_num_classes(cfg.data_preprocessor, len(classes))
    drop_pretrained(cfg.model)
    cfg.load_from = None
    cfg.resume = False

    # length
    _fill_scheduler_ends(
        cfg.get('param_scheduler'), _original_max_epochs(cfg.train_cfg))
    cfg.train_cfg = dict(
        type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
    cfg.merge_from_dict(
        dict(
            log_processor=dict(by_epoch=False),
            default_hooks=dict(
                checkpoint=dict(
                    type='CheckpointHook', by_epoch=False,
                    interval=max_iters, max_keep_ckpts=1))))
    interval = max(1, max_iters // LOGGED_POINTS)
    logger = cfg.default_hooks.get('logger')
    if logger:
        logger['interval'] = min(logger.get('interval', 10), 10, interval)
        interval = logger['interval']
    for hook in cfg.get('custom_hooks') or []:
        if str(hook.get('type', '')).endswith('PrecondStatsHook'):
            hook['interval'] = min(hook.get('interval', 50), interval)

    if fp32 and cfg.optim_wrapper.get('type') == 'AmpOptimWrapper':
        cfg.optim_wrapper['type'] = 'OptimWrapper'
        for key in ('loss_scale', 'dtype', 'use_fsdp'):
            cfg.optim_wrapper.pop(key, None)
    return cfg


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Write a config that runs a zoo config on the built-in '
        'synthetic data (see the module docstring).')
    parser.add_argument('config', help='zoo config file')
    parser.add_argument(
        '--out',
        help='derived config to write (default: '
        'work_dirs/synthetic/<config name>_synthetic.py)')
    parser.add_argument(
        '--img-size',
        type=int,
        help='short side (detection, default 160) or crop (classification, '
        'default 224) in pixels')
    parser.add_argument(
        '--max-iters', type=int, default=20, help='training iterations')
    parser.add_argument(
        '--batch-size',
        type=int,
        default=2,
        help='images per GPU (0 keeps the config\'s)')
    parser.add_argument(
        '--num-workers', type=int, help='dataloader workers per GPU')
    parser.add_argument(
        '--data-root',
        help='synthetic dataset root (default: data/synthetic_coco/ or '
        'data/synthetic_cls/, generated if missing)')
    parser.add_argument(
        '--fp32',
        action='store_true',
        help='train an AmpOptimWrapper config in fp32 (CPU-only machines)')
    parser.add_argument(
        '--no-generate',
        action='store_true',
        help='do not generate the synthetic data when it is missing')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    cfg = Config.fromfile(args.config)
    cfg = synthetic_config(
        cfg,
        data_root=args.data_root,
        img_size=args.img_size,
        max_iters=args.max_iters,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        fp32=args.fp32)
    task = task_of(cfg)
    if not args.no_generate:
        ensure_synthetic_data(task,
                              cfg.train_dataloader.dataset.get('data_root'))
    out = args.out or osp.join(
        'work_dirs', 'synthetic',
        osp.splitext(osp.basename(args.config))[0] + '_synthetic.py')
    if osp.dirname(out):
        os.makedirs(osp.dirname(out), exist_ok=True)
    cfg.dump(out)
    summary: Dict[str, Any] = dict(
        optimizer=cfg.optim_wrapper.optimizer.get('type'),
        data_root=cfg.train_dataloader.dataset.get('data_root'),
        max_iters=cfg.train_cfg.max_iters)
    print(f'{out}  ({", ".join(f"{k}={v}" for k, v in summary.items())})')
    print(f'train it with: python tools/train.py {out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

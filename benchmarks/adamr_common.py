# Copyright (c) mmprecond contributors. All rights reserved.
"""Shared set-up of the AdamR benchmarks: the demo detector on synthetic data.

Both ``bench_adamr.py`` and ``adamr_moments.py`` train the demo Faster R-CNN
(``configs/demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py``) on the
synthetic shapes set; this module points that config at a data root, swaps
its optimizer, and counts optimizer-state memory.

Example:
    >>> cfg = demo_config('/tmp/shapes')            # doctest: +SKIP
    >>> cfg.optim_wrapper = optim_wrapper('AdamR', lr=2e-3)  # doctest: +SKIP
"""
import os.path as osp
from typing import Any, Dict, Optional

import torch
from mmengine.config import Config

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEMO_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo',
                       'faster-rcnn_r18-tiny_fpn_adamw_synthetic.py')


def ensure_data(data_root: str, num_train: int, num_val: int,
                seed: int = 0) -> str:
    """Generate the synthetic COCO set at ``data_root`` unless it exists."""
    from mmprecond.datasets import ensure_synthetic_coco
    return ensure_synthetic_coco(data_root, num_train=num_train,
                                 num_val=num_val, seed=seed)


def demo_config(data_root: str, work_dir: Optional[str] = None) -> Config:
    """The demo config reading ``data_root``, data loaded in-process."""
    cfg = Config.fromfile(DEMO_CONFIG)
    root = osp.join(data_root, '')
    for split in ('train', 'val', 'test'):
        loader = cfg[f'{split}_dataloader']
        loader.dataset.data_root = root
        loader.num_workers = 0
        loader.persistent_workers = False
    for split in ('val', 'test'):
        cfg[f'{split}_evaluator'].ann_file = root + 'annotations/instances_val.json'
    if work_dir is not None:
        cfg.work_dir = work_dir
    return cfg


def optim_wrapper(optimizer: str, **kwargs: Any) -> Dict[str, Any]:
    """The demo's optim wrapper (paramwise_cfg, clipping) with another optimizer.

    Args:
        optimizer (str): Registered optimizer type, e.g. ``'AdamR'``.
        **kwargs: The optimizer's arguments.
    """
    return dict(
        type='OptimWrapper',
        constructor='PrecondOptimWrapperConstructor',
        optimizer=dict(type=optimizer, **kwargs),
        paramwise_cfg=dict(norm_decay_mult=0.0, bias_decay_mult=0.0),
        clip_grad=dict(max_norm=10.0, norm_type=2))


def state_bytes(optimizer: torch.optim.Optimizer) -> Dict[str, int]:
    """Bytes of optimizer state by kind: moments, factors, bases, other.

    Counts ``optimizer.state`` (per-parameter AdamW moments) and, for the
    preconditioned optimizers, ``optimizer.layer_state``.
    """
    kinds = dict(exp_avg='moments', exp_avg_sq='moments', L='factors',
                 R='factors', U1='bases', U2='bases')
    out = dict(moments=0, factors=0, bases=0, other=0)
    states = list(optimizer.state.values())
    states += list(getattr(optimizer, 'layer_state', {}).values())
    for st in states:
        for key, value in st.items():
            if torch.is_tensor(value):
                out[kinds.get(key, 'other')] += value.numel() * value.element_size()
    return out

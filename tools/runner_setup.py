# Copyright (c) mmprecond contributors. All rights reserved.
"""Config handling shared by ``tools/train.py`` and ``tools/test.py``.

Both scripts import this module as a sibling (``python tools/train.py`` puts
``tools/`` first on ``sys.path``; so does ``mim train``, which runs the copy
under ``mmprecond/.mim/tools``).
"""
import argparse
import importlib
import os
import os.path as osp
from typing import Any, Dict, Optional

import torch
from mmengine.config import Config, DictAction
from mmengine.device import get_device
from mmengine.dist import get_dist_info
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

import mmprecond  # noqa: F401  (compat fixes, optimizer registries)

#: Environment variable that overrides the ``torch.distributed`` backend.
DIST_BACKEND_ENV = 'MMPRECOND_DIST_BACKEND'


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Arguments that ``train.py`` and ``test.py`` share."""
    parser.add_argument(
        '--work-dir',
        help='directory for logs and checkpoints (default: the config\'s '
        'work_dir, else ./work_dirs/<config name>)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config entries, e.g. train_cfg.max_iters=10 '
        '"model.backbone.depth=18"; lists as key="[a,b]" or key=a,b')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (torch>=2.0) or
    # --local_rank (older); torchrun only sets the LOCAL_RANK variable.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def load_config(args: argparse.Namespace) -> Config:
    """Read the config and apply the arguments every tool shares.

    Sets ``LOCAL_RANK`` for launchers that pass it as an argument, merges
    ``--cfg-options``, sets ``launcher`` and ``work_dir``, registers the
    modules of the config's ``default_scope`` and picks a distributed
    backend that the machine supports.

    Args:
        args: Parsed arguments from a parser given :func:`add_common_args`.

    Returns:
        Config: The config, ready for the tool's own changes.
    """
    os.environ.setdefault('LOCAL_RANK', str(args.local_rank))
    cfg = Config.fromfile(args.config)
    if args.cfg_options is not None:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])
    register_scope_modules(cfg.get('default_scope'))
    set_dist_backend(cfg)
    return cfg


def register_scope_modules(scope: Optional[str]) -> None:
    """Register the modules of an OpenMMLab package named by ``scope``.

    ``'mmdet'`` and ``'mmpretrain'`` (and any package following the same
    convention) provide ``<scope>.utils.register_all_modules``; the default
    scope itself is set later by the runner from ``cfg.default_scope``.

    Args:
        scope: The config's ``default_scope``; ``None`` or ``'mmengine'``
            needs nothing.

    Raises:
        ImportError: If the package named by ``scope`` is not installed.
    """
    if scope in (None, 'mmengine'):
        return
    try:
        utils = importlib.import_module(f'{scope}.utils')
    except ImportError as err:
        raise ImportError(
            f"The config's default_scope is '{scope}', but '{scope}' cannot "
            f'be imported ({err}). Install it, e.g. `pip install {scope}`.'
        ) from err
    register_all_modules = getattr(utils, 'register_all_modules', None)
    if register_all_modules is not None:
        register_all_modules(init_default_scope=False)


def set_dist_backend(cfg: Config) -> None:
    """Choose the ``torch.distributed`` backend for launched jobs.

    ``$MMPRECOND_DIST_BACKEND`` wins when set; otherwise, without a GPU-like
    device, the backend becomes ``gloo`` (NCCL needs CUDA).  Nothing changes
    for ``launcher='none'``.

    Args:
        cfg: The config; ``cfg.env_cfg.dist_cfg.backend`` is updated.
    """
    if cfg.get('launcher', 'none') == 'none':
        return
    backend = os.environ.get(DIST_BACKEND_ENV)
    if not backend and get_device() in ('cpu', 'mps'):
        backend = 'gloo'
    if not backend:
        return
    # (Config.setdefault returns the plain dict, not the stored ConfigDict)
    if cfg.get('env_cfg') is None:
        cfg.env_cfg = dict()
    if cfg.env_cfg.get('dist_cfg') is None:
        cfg.env_cfg.dist_cfg = dict()
    dist_cfg = cfg.env_cfg.dist_cfg
    if dist_cfg.get('backend') != backend:
        print_log(
            f'Using the {backend!r} distributed backend (config: '
            f'{dist_cfg.get("backend")!r}; device: {get_device()}; '
            f'override with ${DIST_BACKEND_ENV}).',
            logger='current')
        dist_cfg['backend'] = backend


def build_runner(cfg: Config) -> Runner:
    """Build ``Runner`` or the config's ``runner_type``."""
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def print_metrics(metrics: Optional[Dict[str, Any]], title: str) -> None:
    """Print ``key: value`` lines on rank 0 (``bbox_mAP: 0.4120`` style).

    Args:
        metrics: Metric name -> value, e.g. ``{'coco/bbox_mAP': 0.41}``.
        title: A heading line printed first.
    """
    rank, _ = get_dist_info()
    if rank != 0:
        return
    if not metrics:
        print(f'{title}: no metrics were computed', flush=True)
        return
    lines = [f'{title}:']
    for key, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, float):
            value = f'{value:.4f}'
        lines.append(f'{key}: {value}')
    print('\n'.join(lines), flush=True)

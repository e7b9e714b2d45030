# Copyright (c) mmprecond contributors. All rights reserved.
"""Train an MMDetection or MMPretrain model with MMEngine's runner.

The config's ``default_scope`` decides which package's modules are
registered; ``mmprecond`` is always imported, so its optimizers, its
optim-wrapper constructor and its compatibility fixes are available.

Examples::

    python tools/train.py configs/demo/faster-rcnn_r18-tiny_fpn_adamw_synthetic.py
    python tools/train.py CONFIG --resume                  # latest in work_dir
    python tools/train.py CONFIG --cfg-options train_cfg.max_iters=10
    bash tools/dist_train.sh CONFIG 2                      # 2 processes

After training, the metrics of the last validation are printed one per
line, e.g. ``coco/bbox_mAP: 0.4120``.
"""
import argparse
from typing import Any, Dict, Optional

from mmengine.config import Config
from mmengine.device import get_device
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.runner import Runner
from runner_setup import add_common_args, build_runner, load_config, print_metrics


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--amp',
        action='store_true',
        help='automatic mixed precision (fp16 with dynamic loss scaling); '
        'needs a GPU')
    parser.add_argument(
        '--auto-scale-lr',
        action='store_true',
        help='scale the learning rate by total batch size / '
        'auto_scale_lr.base_batch_size')
    parser.add_argument(
        '--resume',
        nargs='?',
        type=str,
        const='auto',
        help='resume from CHECKPOINT, or without a value from the latest '
        'checkpoint in the work dir')
    add_common_args(parser)
    return parser.parse_args(argv)


def enable_amp(cfg: Config) -> None:
    """Switch ``cfg.optim_wrapper`` to MMEngine's ``AmpOptimWrapper``.

    ``AmpOptimWrapper`` asserts that a CUDA/NPU/MLU device is present, and
    CPU autocast would need another wrapper, so ``--amp`` on a CPU-only
    machine stops with an explanation instead of a failed assertion deep in
    the runner.  Only the plain ``OptimWrapper`` type is switched; an
    ``AmpOptimWrapper`` config is kept as it is.

    Args:
        cfg: The config to modify in place.

    Raises:
        SystemExit: Without an accelerator.
        ValueError: If the config uses another optim-wrapper type.
    """
    if get_device() in ('cpu', 'mps'):
        raise SystemExit(
            '--amp needs a GPU (or NPU/MLU): MMEngine\'s AmpOptimWrapper '
            f'refuses to run on the {get_device()!r} device. Train without '
            '--amp here.')
    wrapper_type = cfg.optim_wrapper.get('type', 'OptimWrapper')
    if wrapper_type == 'AmpOptimWrapper':
        print_log('AMP is already enabled in the config.', logger='current')
        return
    if wrapper_type != 'OptimWrapper':
        raise ValueError(
            '--amp only switches the plain OptimWrapper to AmpOptimWrapper, '
            f'but the config uses {wrapper_type!r}.')
    cfg.optim_wrapper.type = 'AmpOptimWrapper'
    cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')


def enable_auto_scale_lr(cfg: Config) -> None:
    """Turn on ``auto_scale_lr``; the config must give ``base_batch_size``."""
    auto_scale_lr = cfg.get('auto_scale_lr') or {}
    if 'base_batch_size' not in auto_scale_lr:
        raise ValueError(
            '--auto-scale-lr needs `auto_scale_lr = dict(enable=False, '
            'base_batch_size=...)` in the config.')
    cfg.auto_scale_lr = dict(auto_scale_lr, enable=True)


def set_resume(cfg: Config, resume: Optional[str]) -> None:
    """Map ``--resume [CHECKPOINT]`` onto ``cfg.resume``/``cfg.load_from``."""
    if resume == 'auto':
        cfg.resume = True
        cfg.load_from = None
    elif resume is not None:
        cfg.resume = True
        cfg.load_from = resume


class LastValMetricsHook(Hook):
    """Keeps the metrics of the most recent validation run."""

    priority = 'LOWEST'

    def __init__(self) -> None:
        self.metrics: Optional[Dict[str, Any]] = None
        self.iter: Optional[int] = None

    def after_val_epoch(self,
                        runner: Runner,
                        metrics: Optional[Dict[str, Any]] = None) -> None:
        self.metrics = dict(metrics or {})
        self.iter = runner.iter


def main(argv: Optional[list] = None) -> None:
    """Train with the config given on the command line."""
    args = parse_args(argv)
    cfg = load_config(args)
    if args.amp:
        enable_amp(cfg)
    if args.auto_scale_lr:
        enable_auto_scale_lr(cfg)
    set_resume(cfg, args.resume)

    runner = build_runner(cfg)
    last_val = LastValMetricsHook()
    runner.register_hook(last_val)
    runner.train()
    if runner.val_loop is not None:
        print_metrics(last_val.metrics,
                      f'Final val metrics (iter {last_val.iter})')


if __name__ == '__main__':
    main()

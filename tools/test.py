# Copyright (c) mmprecond contributors. All rights reserved.
"""Evaluate a checkpoint of an MMDetection or MMPretrain model.

The config's ``default_scope`` decides which package's modules are
registered; ``mmprecond`` is always imported.

Examples::

    python tools/test.py CONFIG work_dirs/NAME/iter_1000.pth
    python tools/test.py CONFIG CKPT --out results.pkl --show-dir vis
    bash tools/dist_test.sh CONFIG CKPT 2

The test metrics are printed one per line at the end, e.g.
``coco/bbox_mAP: 0.4120``.
"""
import argparse
import os.path as osp
from typing import Optional

from mmengine.config import Config, ConfigDict
from runner_setup import add_common_args, build_runner, load_config, print_metrics


def parse_args(argv: Optional[list] = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--out',
        help='dump the raw predictions to this pickle file (.pkl)')
    parser.add_argument(
        '--show-dir',
        help='save images with drawn predictions under <work_dir>/'
        '<timestamp>/<show_dir> (mmdet) or <work_dir>/<show_dir> (mmpretrain)')
    add_common_args(parser)
    return parser.parse_args(argv)


def add_dump_metric(cfg: Config, out: str) -> None:
    """Append a metric that pickles every prediction to ``out``.

    MMDetection's ``DumpDetResults`` drops the heavy mask tensors that the
    generic ``DumpResults`` would keep; other scopes use the generic one.
    """
    if not out.endswith(('.pkl', '.pickle')):
        raise ValueError(f'--out must be a .pkl file, got {out!r}')
    dump_type = ('DumpDetResults'
                 if cfg.get('default_scope') == 'mmdet' else 'DumpResults')
    evaluators = cfg.test_evaluator
    if isinstance(evaluators, (dict, ConfigDict)):
        evaluators = [evaluators]
    cfg.test_evaluator = list(evaluators) + [
        dict(type=dump_type, out_file_path=out)
    ]


def enable_visualization(cfg: Config, show_dir: str) -> None:
    """Make the config's visualization hook draw every test prediction.

    MMDetection's ``DetVisualizationHook`` takes ``draw``/``test_out_dir``
    (and writes under ``<work_dir>/<timestamp>/``); MMPretrain's
    ``VisualizationHook`` takes ``enable``/``out_dir``/``interval`` (and
    writes where it is told, so it is given ``<work_dir>/<show_dir>``).
    """
    hook = cfg.get('default_hooks', {}).get('visualization')
    if hook is None:
        raise ValueError('--show-dir needs `default_hooks.visualization` in '
                         'the config.')
    if 'DetVisualizationHook' in str(hook.get('type')):
        hook.update(draw=True, interval=1, test_out_dir=show_dir)
    else:
        hook.update(
            enable=True, interval=1, out_dir=osp.join(cfg.work_dir, show_dir))


def main(argv: Optional[list] = None) -> None:
    """Evaluate the checkpoint given on the command line."""
    args = parse_args(argv)
    if '://' not in args.checkpoint and not osp.isfile(args.checkpoint):
        raise SystemExit(f'checkpoint not found: {args.checkpoint}')
    cfg = load_config(args)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    if args.out is not None:
        add_dump_metric(cfg, args.out)
    if args.show_dir is not None:
        enable_visualization(cfg, args.show_dir)

    runner = build_runner(cfg)
    metrics = runner.test()
    print_metrics(metrics, 'Test metrics')


if __name__ == '__main__':
    main()

# Copyright (c) mmprecond contributors. All rights reserved.
"""The config handling of ``tools/train.py`` and ``tools/test.py``."""
import sys

import pytest
import torch
from conftest import DEMO_DET_CONFIG, TOOLS_DIR
from mmengine.config import Config

sys.path.insert(0, str(TOOLS_DIR))
import runner_setup  # noqa: E402
import train as train_tool  # noqa: E402

sys.path.remove(str(TOOLS_DIR))


def demo_args(*extra: str):
    return train_tool.parse_args([str(DEMO_DET_CONFIG), *extra])


def test_load_config_applies_common_args(tmp_path, monkeypatch) -> None:
    pytest.importorskip('mmdet')
    monkeypatch.setenv('LOCAL_RANK', '0')  # restored afterwards
    args = demo_args('--work-dir', str(tmp_path), '--cfg-options',
                     'train_cfg.max_iters=7', 'model.backbone.depth=34')
    cfg = runner_setup.load_config(args)
    assert cfg.work_dir == str(tmp_path)
    assert cfg.launcher == 'none'
    assert cfg.train_cfg.max_iters == 7
    assert cfg.model.backbone.depth == 34
    # register_all_modules ran for the config's default_scope
    from mmdet.registry import MODELS
    assert MODELS.get('FasterRCNN') is not None


def test_default_work_dir_is_named_after_config(monkeypatch) -> None:
    pytest.importorskip('mmdet')
    monkeypatch.setenv('LOCAL_RANK', '0')
    cfg = runner_setup.load_config(demo_args())
    assert cfg.work_dir == ('./work_dirs/'
                            'faster-rcnn_r18-tiny_fpn_adamw_synthetic')


def test_unknown_scope_gives_install_hint() -> None:
    with pytest.raises(ImportError, match='default_scope is .no_such_pkg.'):
        runner_setup.register_scope_modules('no_such_pkg')
    runner_setup.register_scope_modules(None)
    runner_setup.register_scope_modules('mmengine')


@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU-only behaviour')
def test_launched_cpu_runs_use_gloo(monkeypatch) -> None:
    monkeypatch.delenv(runner_setup.DIST_BACKEND_ENV, raising=False)
    cfg = Config(dict(launcher='pytorch',
                      env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    runner_setup.set_dist_backend(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    # no env_cfg at all
    cfg = Config(dict(launcher='slurm'))
    runner_setup.set_dist_backend(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'gloo'
    # not launched: untouched
    cfg = Config(dict(launcher='none',
                      env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    runner_setup.set_dist_backend(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'nccl'


def test_dist_backend_env_override(monkeypatch) -> None:
    monkeypatch.setenv(runner_setup.DIST_BACKEND_ENV, 'mpi')
    cfg = Config(dict(launcher='pytorch',
                      env_cfg=dict(dist_cfg=dict(backend='nccl'))))
    runner_setup.set_dist_backend(cfg)
    assert cfg.env_cfg.dist_cfg.backend == 'mpi'


@pytest.mark.skipif(torch.cuda.is_available(), reason='CPU-only behaviour')
def test_amp_on_cpu_stops_with_explanation() -> None:
    cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper')))
    with pytest.raises(SystemExit, match='--amp needs a GPU'):
        train_tool.enable_amp(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_amp_switches_plain_optim_wrapper() -> None:
    cfg = Config(dict(optim_wrapper=dict(type='OptimWrapper')))
    train_tool.enable_amp(cfg)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    cfg = Config(dict(optim_wrapper=dict(type='MyWrapper')))
    with pytest.raises(ValueError, match='MyWrapper'):
        train_tool.enable_amp(cfg)


def test_resume_argument() -> None:
    assert demo_args().resume is None
    assert demo_args('--resume').resume == 'auto'
    assert demo_args('--resume', 'a.pth').resume == 'a.pth'
    for value, resume, load_from in ((None, False, None),
                                     ('auto', True, None),
                                     ('a.pth', True, 'a.pth')):
        cfg = Config(dict(resume=False, load_from=None))
        train_tool.set_resume(cfg, value)
        assert (cfg.resume, cfg.load_from) == (resume, load_from)


def test_auto_scale_lr_needs_base_batch_size() -> None:
    cfg = Config(dict(auto_scale_lr=dict(enable=False, base_batch_size=16)))
    train_tool.enable_auto_scale_lr(cfg)
    assert cfg.auto_scale_lr == dict(enable=True, base_batch_size=16)
    with pytest.raises(ValueError, match='base_batch_size'):
        train_tool.enable_auto_scale_lr(Config(dict()))


def test_local_rank_spellings() -> None:
    assert demo_args('--local_rank', '3').local_rank == 3
    assert demo_args('--local-rank=2').local_rank == 2


def test_print_metrics(capsys) -> None:
    runner_setup.print_metrics(
        {'coco/bbox_mAP': 0.41234, 'coco/bbox_mAP_copypaste': '0.412 x'},
        'Final val metrics')
    assert capsys.readouterr().out.splitlines() == [
        'Final val metrics:', 'coco/bbox_mAP: 0.4123',
        'coco/bbox_mAP_copypaste: 0.412 x'
    ]

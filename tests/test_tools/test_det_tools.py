# Copyright (c) mmprecond contributors. All rights reserved.
"""End to end: the demo Faster R-CNN through dist_train.sh, test.py, resume.

A 2-process gloo run of ``tools/dist_train.sh`` trains the real demo config
for 3 iterations on a tiny synthetic COCO set, ``tools/test.py`` evaluates
its checkpoint, and ``tools/train.py --resume`` continues it.
"""
import json
import re
import socket
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import DEMO_DET_CONFIG, TOOLS_DIR, coco_cfg_options, run_command

pytest.importorskip('mmdet')
pytest.importorskip('mmcv.ops')

pytestmark = pytest.mark.slow

SHORT_RUN = [
    'train_cfg.max_iters=3',
    'train_cfg.val_interval=3',
    'default_hooks.checkpoint.interval=3',
    'default_hooks.logger.interval=1',
]

# Registered into MMEngine's root HOOKS, so the mmdet scope finds it.
RANK_PROBE = textwrap.dedent('''
    import json
    import os.path as osp

    from mmengine.dist import get_dist_info
    from mmengine.hooks import Hook
    from mmengine.registry import HOOKS


    @HOOKS.register_module()
    class RankProbeHook(Hook):
        """Each rank writes what it trained to <work_dir>/rank<N>.json."""

        def after_train(self, runner):
            rank, world_size = get_dist_info()
            model = getattr(runner.model, 'module', runner.model)
            checksum = sum(float(p.double().abs().sum())
                           for p in model.parameters())
            with open(osp.join(runner.work_dir, f'rank{rank}.json'), 'w') as f:
                json.dump(dict(rank=rank, world_size=world_size,
                               iter=runner.iter, checksum=checksum,
                               wrapper=type(runner.model).__name__), f)
''')


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture(scope='module')
def dist_trained(tiny_coco, tmp_path_factory) -> Path:
    """Work dir of a 2-rank, 3-iteration dist_train.sh run of the demo."""
    tmp = tmp_path_factory.mktemp('dist_train')
    (tmp / 'rank_probe.py').write_text(RANK_PROBE)
    config = tmp / 'demo_with_probe.py'
    config.write_text(
        f'_base_ = [{str(DEMO_DET_CONFIG)!r}]\n'
        "custom_imports = dict(imports=['mmprecond', 'rank_probe'], "
        'allow_failed_imports=False)\n'
        "custom_hooks = [dict(type='RankProbeHook')]\n")
    work_dir = tmp / 'work'
    run_command(
        ['bash', TOOLS_DIR / 'dist_train.sh', config, 2,
         '--work-dir', work_dir, '--cfg-options', *SHORT_RUN,
         *coco_cfg_options(tiny_coco)],
        env=dict(PORT=str(free_port()), PYTHONPATH=str(tmp)),
        timeout=600)
    return work_dir


def test_dist_train_runs_both_ranks(dist_trained: Path) -> None:
    probes = [
        json.loads((dist_trained / f'rank{r}.json').read_text())
        for r in (0, 1)
    ]
    for rank, probe in enumerate(probes):
        assert probe['rank'] == rank
        assert probe['world_size'] == 2
        assert probe['iter'] == 3
        assert probe['wrapper'] == 'MMDistributedDataParallel'
    # DDP kept the replicas identical
    assert probes[0]['checksum'] == pytest.approx(probes[1]['checksum'],
                                                  rel=1e-6)
    assert (dist_trained / 'iter_3.pth').is_file()


def test_test_tool_prints_bbox_map(dist_trained: Path, tiny_coco,
                                   tmp_path) -> None:
    out = tmp_path / 'preds.pkl'
    proc = run_command([
        sys.executable,
        TOOLS_DIR / 'test.py', DEMO_DET_CONFIG, dist_trained / 'iter_3.pth',
        '--work-dir', tmp_path / 'test', '--out', out,
        '--cfg-options', *coco_cfg_options(tiny_coco)
    ])
    match = re.search(r'^coco/bbox_mAP: (\d+\.\d+)$', proc.stdout, re.M)
    assert match, proc.stdout[-3000:]
    # test.py (1 process) on the checkpoint gives the AP that the 2-rank
    # training run's own validation logged for it
    logged = [
        json.loads(line) for f in dist_trained.glob('*/vis_data/scalars.json')
        for line in f.read_text().splitlines()
    ]
    val_ap = [r['coco/bbox_mAP'] for r in logged if 'coco/bbox_mAP' in r]
    assert len(val_ap) == 1
    assert float(match.group(1)) == pytest.approx(val_ap[0], abs=5e-5)
    assert out.is_file() and out.stat().st_size > 0


def test_train_tool_resumes(dist_trained: Path, tiny_coco) -> None:
    proc = run_command([
        sys.executable, TOOLS_DIR / 'train.py', DEMO_DET_CONFIG,
        '--work-dir', dist_trained, '--resume', '--cfg-options',
        *SHORT_RUN, 'train_cfg.max_iters=4', 'train_cfg.val_interval=4',
        *coco_cfg_options(tiny_coco)
    ])
    log = proc.stdout + proc.stderr
    assert 'resumed epoch: 0, iter: 3' in log, log[-3000:]
    assert re.search(r'^coco/bbox_mAP: \d+\.\d+$', proc.stdout, re.M)
    assert (dist_trained / 'iter_4.pth').is_file()

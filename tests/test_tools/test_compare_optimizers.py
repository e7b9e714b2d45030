# Copyright (c) mmprecond contributors. All rights reserved.
"""compare_optimizers.py and plot_scalars.py end to end on the demo detector."""
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import DEMO_DET_CONFIG, REPO_ROOT, TOOLS_DIR, run_command

pytest.importorskip('mmdet')
pytest.importorskip('mmcv.ops')

pytestmark = pytest.mark.slow

ANALYSIS = TOOLS_DIR / 'analysis_tools'
ADANKFAC = REPO_ROOT / 'configs' / 'demo' / (
    'faster-rcnn_r18-tiny_fpn_adankfac_synthetic.py')
SEEDS = (0, 1)
PLOTS = ('loss_vs_iter.png', 'loss_vs_time.png', 'metric_vs_iter.png',
         'phase_seconds.png', 'state_memory.png')


def compare(tiny_coco: Path, work: Path) -> str:
    proc = run_command([
        sys.executable, ANALYSIS / 'compare_optimizers.py', DEMO_DET_CONFIG,
        '--optimizers', 'adamw:', f'adankfac={ADANKFAC}',
        '--seeds', *SEEDS, '--max-iters', 4, '--log-interval', 2,
        '--data-root', tiny_coco, '--work-dir', work,
        '--cfg-options', 'train_dataloader.num_workers=0',
        'train_dataloader.persistent_workers=False',
        'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False'
    ], timeout=900)
    return proc.stdout


def logged(run_dir: Path) -> Dict[str, List[float]]:
    """Every value of every key of a run, read straight from scalars.json."""
    out: Dict[str, List[float]] = {}
    for file in sorted(run_dir.glob('*/vis_data/scalars.json')):
        for line in file.read_text().splitlines():
            record = json.loads(line)
            prefix = '' if 'lr' in record else 'val:'  # training lines
            for key, value in record.items():
                out.setdefault(prefix + key, []).append(value)
    return out


def table_row(table: str, name: str) -> List[str]:
    row = next(line for line in table.splitlines()
               if line.startswith(f'| {name} |'))
    return [cell.strip() for cell in row.strip('|').split('|')]


def mean_std(cell: str):
    mean, std = re.match(r'(-?[\d.]+) ± ([\d.]+)$', cell).groups()
    return float(mean), float(std)


@pytest.fixture(scope='module')
def compared(tiny_coco, tmp_path_factory):
    work = tmp_path_factory.mktemp('compare')
    return work, compare(tiny_coco, work)


def test_plots_decode(compared) -> None:
    from PIL import Image

    work, _ = compared
    for name in PLOTS:
        with Image.open(work / name) as img:
            img.load()  # decodes the whole PNG
            assert img.size[0] > 100 and img.size[1] > 100


def test_table_numbers_are_the_logged_ones(compared) -> None:
    work, stdout = compared
    table = (work / 'results.md').read_text()
    assert table in stdout
    header = [c.strip() for c in table.splitlines()[0].strip('|').split('|')]
    final = {}
    for name in ('adamw', 'adankfac'):
        runs = [logged(work / name / f'seed{s}') for s in SEEDS]
        losses = [r['loss'][-1] for r in runs]
        aps = [r['val:coco/bbox_mAP'][-1] for r in runs]
        row = dict(zip(header, table_row(table, name)))
        assert row['runs'] == '2'
        for column, values in (('final coco/bbox_mAP', aps),
                               ('final loss', losses)):
            mean, std = mean_std(row[column])
            assert mean == pytest.approx(statistics.fmean(values), abs=5e-5)
            assert std == pytest.approx(statistics.stdev(values), abs=5e-5)
        # s / iter: the logged mean iteration time integrated over the run
        secs = [sum(t * 2 for t in r['time']) / 4 for r in runs]
        assert mean_std(row['s / iter'])[0] == pytest.approx(
            statistics.fmean(secs), abs=5e-4)
        state = [r['precond/state_mb'][-1] for r in runs]
        assert mean_std(row['state MB'])[0] == pytest.approx(
            statistics.fmean(state), abs=0.05)
        final[name] = row
        assert losses[0] != losses[1]  # the seeds differ
    assert final['adamw']['time vs adamw'] == '1.00'
    # AdaNKFAC keeps Kronecker factors: far more state than AdamW
    assert (mean_std(final['adankfac']['state MB'])[0]
            > 5 * mean_std(final['adamw']['state MB'])[0])


def test_rerun_skips_finished_and_resumes_interrupted(compared,
                                                      tiny_coco) -> None:
    work, _ = compared
    stamps = sorted(work.glob('*/seed*/2*'))
    (work / 'adankfac' / 'seed1' / 'done.json').unlink()  # "interrupted"
    stdout = compare(tiny_coco, work)
    assert '4 runs, 3 already finished' in stdout
    out = (work / 'adankfac' / 'seed1.out').read_text()
    assert 'resumed epoch: 0, iter: 4' in out
    new = sorted(set(work.glob('*/seed*/2*')) - set(stamps))
    assert [p.parent.name for p in new] == ['seed1']  # only the resumed run


def test_plot_scalars_reads_the_runs(compared, tmp_path) -> None:
    from PIL import Image

    work, _ = compared
    out = tmp_path / 'loss.png'
    run_command([
        sys.executable, ANALYSIS / 'plot_scalars.py', work / 'adamw' / 'seed0',
        work / 'adankfac' / 'seed0', '--keys', 'loss', 'precond/step_s',
        '--x', 'time', '--legend', 'AdamW', 'AdaNKFAC', '--out', out
    ])
    with Image.open(out) as img:
        img.load()
        assert img.size == (1100, 400)

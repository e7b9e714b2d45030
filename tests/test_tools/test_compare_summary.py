# Copyright (c) mmprecond contributors. All rights reserved.
"""compare_optimizers.py's loss summaries against hand-computed values."""
import importlib.util

import pytest
from conftest import TOOLS_DIR

pytest.importorskip('matplotlib')


def load_tool():
    path = TOOLS_DIR / 'analysis_tools' / 'compare_optimizers.py'
    spec = importlib.util.spec_from_file_location('compare_optimizers', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tool = load_tool()
#: (iteration, mean loss of the iterations since the previous entry)
CURVE = [(5, 4.0), (10, 3.0), (15, 2.0), (20, 1.0)]


def test_trailing_mean_weights_the_intervals_inside_the_window():
    assert tool.trailing_mean(CURVE, 20, 10) == pytest.approx(1.5)
    # 3 iterations of the (10, 15] interval and all 5 of (15, 20]
    assert tool.trailing_mean(CURVE, 20, 8) == pytest.approx((2 * 3 + 1 * 5) / 8)
    assert tool.trailing_mean(CURVE, 10, 10) == pytest.approx(3.5)
    assert tool.trailing_mean(CURVE, 5, 10) is None  # no full window yet


def test_reach_needs_the_window_mean_to_stay_below():
    clock = {5: 1.0, 10: 2.0, 15: 3.0, 20: 4.0}
    run = dict(loss_curve=CURVE, clock=clock, loss_window=10)
    assert tool.reach(run, 2.5) == (15, 3.0)
    assert tool.reach(run, 1.4) == (None, None)
    # a single low value early on does not count as reaching the target
    dip = dict(loss_curve=[(5, 0.5), (10, 3.0), (15, 3.0), (20, 3.0)],
               clock=clock, loss_window=10)
    assert tool.reach(dip, 1.0) == (None, None)
    # below, above again (a detector's loss does this), then below for good
    wave = dict(loss_curve=[(5, 1.0), (10, 1.0), (15, 3.0), (20, 3.0),
                            (25, 1.0), (30, 1.0)],
                clock={5: 1.0, 10: 2.0, 15: 3.0, 20: 4.0, 25: 5.0, 30: 6.0},
                loss_window=10)
    assert tool.trailing_mean(wave['loss_curve'], 10, 10) == 1.0
    assert tool.reach(wave, 1.0) == (30, 6.0)

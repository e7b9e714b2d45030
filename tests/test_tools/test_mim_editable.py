# Copyright (c) mmprecond contributors. All rights reserved.
"""A plain editable install is enough for ``mim train mmprecond CONFIG``.

``tools/ci/mim_editable_check.sh`` installs this checkout editable into a new
venv layered on the test interpreter's environment and trains the demo
detector for 2 iterations through ``mim train``; see the script's header.
"""
import pytest
from conftest import REPO_ROOT, run_command

SCRIPT = REPO_ROOT / 'tools' / 'ci' / 'mim_editable_check.sh'


# .ci/run runs the script once more after the suites; here it is part of
# make test-zoo, outside make test's time budget
@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize('installer', ['pip', 'mim'])
def test_editable_install_serves_mim_train(installer: str, tmp_path) -> None:
    """``<installer> install -e .`` then ``mim train`` by config name."""
    pytest.importorskip('mim')
    pytest.importorskip('mmdet')
    # run_command sets $PYTHON (the script's base interpreter) to this one
    proc = run_command(['bash', SCRIPT, installer],
                       env={'TMPDIR': str(tmp_path)},
                       timeout=600)
    assert f'[mim_editable] OK ({installer} install -e' in proc.stdout
    assert f'will use {REPO_ROOT.resolve()}/configs/demo/' in proc.stdout

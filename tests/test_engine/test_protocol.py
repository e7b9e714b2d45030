# Copyright (c) mmprecond contributors. All rights reserved.
"""The engine protocol: engine/ probes nothing, each family logs its own
diagnostic (checked against closed forms and in a real MMEngine run)."""
import math
import re
from pathlib import Path

import pytest
import torch

from mmprecond.optim.diagnostics import (
    basis_drift,
    basis_offdiagonal,
    root_diagnostics,
    root_residual,
)
from mmprecond.protocol import EngineProtocol

ENGINE = Path(__file__).resolve().parents[2] / 'mmprecond' / 'engine'
#: The only imports from mmprecond.optim left in engine/ (the merger moves
#: check_keywords and PEER_PACKAGES out of optim/ after merging).
ALLOWED_OPTIM_IMPORTS = {
    ('constructor.py', 'from ..optim.checks import check_keywords'),
    ('constructor.py', 'from ..optim.peers import PEER_PACKAGES'),
}
#: The only attribute probes left: of the model (DDP or a custom wrapper),
#: never of an optimizer.
ALLOWED_PROBES = {('constructor.py', "hasattr(model, 'module')"),
                  ('time_budget.py', "getattr(runner, 'val_loop', None)")}
PROBE = re.compile(r'\b(?:hasattr|getattr)\([^)]*\)')
OPTIM_IMPORT = re.compile(
    r'^\s*(?:from|import)\s+(?:\.\.optim\b|mmprecond\.optim\b).*$', re.M)


def test_engine_imports_no_optimizer_and_probes_none() -> None:
    imports, probes = set(), set()
    for path in sorted(ENGINE.glob('*.py')):
        text = path.read_text()
        imports |= {(path.name, m.group(0).strip())
                    for m in OPTIM_IMPORT.finditer(text)}
        probes |= {(path.name, m.group(0)) for m in PROBE.finditer(text)}
    assert imports == ALLOWED_OPTIM_IMPORTS
    assert probes == ALLOWED_PROBES


def test_every_registered_mmprecond_optimizer_declares_the_protocol() -> None:
    import mmprecond.optim as optim
    from mmprecond.optim.peers import PeerSINGD
    classes = [getattr(optim, n) for n in optim.__all__
               if isinstance(getattr(optim, n), type)
               and issubclass(getattr(optim, n), torch.optim.Optimizer)]
    assert len(classes) >= 19
    for cls in classes + [PeerSINGD]:
        assert issubclass(cls, EngineProtocol), cls.__name__


@pytest.mark.parametrize('p', [2, 4])
def test_root_residual_closed_form(p: int) -> None:
    eig = torch.tensor([0.5, 1., 3., 10.], dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(1)))
    a = q @ torch.diag(eig) @ q.T
    exact = q @ torch.diag(eig**(-1 / p)) @ q.T
    assert float(root_residual(a, exact, p)) < 1e-12
    # R = c A^{-1/p}: R^p A - I = (c^p - 1) I, whatever the probes
    c = 1.05
    assert float(root_residual(a, c * exact, p)) == pytest.approx(c**p - 1, rel=1e-10)
    # a root exact in one eigen-direction only: many probes approach the
    # exact ||R^p A - I||_F / sqrt(n)
    bad = q @ torch.diag(eig**(-1 / p) * torch.tensor(
        [1., 1., 1., 1.2], dtype=torch.float64)) @ q.T
    want = abs(1.2**p - 1) / math.sqrt(4)
    got = root_residual(a, bad, p, probes=20000,
                        generator=torch.Generator().manual_seed(0))
    assert float(got) == pytest.approx(want, rel=0.05)


def test_root_diagnostics_rebuilds_the_damped_factor() -> None:
    s = torch.diag(torch.tensor([1., 2., 4.]))
    eps = 0.1
    for relative, shift in ((True, eps * 4.), (False, eps)):
        exact = torch.diag((torch.tensor([1., 2., 4.]) + shift)**-0.5)
        out = root_diagnostics(dict(fc=dict(L=s, L_root=exact)), 2, eps, relative)
        assert float(out['root_error']) < 1e-5
        assert float(out['damping']) == pytest.approx(shift, rel=1e-5)
        assert float(out['lambda_max']) == pytest.approx(4., rel=1e-5)
        out = root_diagnostics(dict(fc=dict(L=s, L_root=1.1 * exact)), 2, eps,
                               relative)
        assert float(out['root_error']) == pytest.approx(0.21, rel=1e-4)
        assert 'newton_residual' not in out


def test_basis_drift_closed_form() -> None:
    a, b, c = 3., 0.5, 1.
    s = torch.tensor([[a, b], [b, c]])
    want = math.sqrt(2) * b / math.sqrt(a * a + 2 * b * b + c * c)
    assert float(basis_offdiagonal(s, torch.eye(2))) == pytest.approx(want, rel=1e-6)
    _, q = torch.linalg.eigh(s.double())
    assert float(basis_offdiagonal(s, q.float())) < 1e-6
    out = basis_drift(dict(fc=dict(L=s, U1=torch.eye(2), R=s, U2=q.float())),
                      (('L', 'U1'), ('R', 'U2')))
    assert float(out['basis_drift']) == pytest.approx(want, rel=1e-6)


ROOT = dict(stat_interval=1, refresh_interval=2)
RUNS = [
    (dict(type='SGDM_BK', lr=0.01, momentum=0.9, **ROOT), 'root_error'),
    (dict(type='AdamW_BK', lr=1e-4, weight_decay=0.05, **ROOT), 'root_error'),
    (dict(type='Shampoo', lr=0.01, momentum=0.9, **ROOT), 'root_error'),
    (dict(type='AdamR', lr=1e-4, weight_decay=0.05, stat_interval=1,
          refresh_interval=2), 'basis_drift'),
]


@pytest.mark.slow
@pytest.mark.parametrize('optimizer, key', RUNS, ids=[r[0]['type'] for r in RUNS])
def test_stats_hook_logs_the_familys_own_diagnostic(tiny_coco, tmp_path,
                                                    optimizer, key) -> None:
    pytest.importorskip('mmdet')
    pytest.importorskip('mmcv.ops')
    from test_hooks import Reference, demo_cfg, printed_log, train
    cfg = demo_cfg(tiny_coco, tmp_path, optimizer, iters=4, interval=2)
    cfg.default_hooks.checkpoint.interval = 4
    train(cfg, Reference(2))
    log = printed_log(tmp_path)
    assert sorted(log) == [2, 4]
    last = log[4]
    assert f'precond/{key}' in last, sorted(last)
    assert 'precond/newton_residual' not in last
    assert all('precond/newton_residual' not in v for v in log.values())
    assert math.isfinite(last[f'precond/{key}']) and last[f'precond/{key}'] >= 0
    if key == 'basis_drift':
        assert last[f'precond/{key}'] <= 1
    else:
        # Shampoo's absolute damping prints as 0.0000
        assert 0 <= last['precond/damping'] < last['precond/lambda_max']

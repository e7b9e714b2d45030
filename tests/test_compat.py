# Copyright (c) mmprecond contributors. All rights reserved.
"""Tests for :mod:`mmprecond.compat`, each on a real MMEngine ``Runner``.

A toy regression model and in-memory dataset keep every run to a few
iterations on the CPU.  Running this file with ``MMPRECOND_DISABLE_COMPAT=1``
reproduces the upstream failures the fixes address.
"""
import os
import pickle
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner import checkpoint as mmengine_checkpoint
from torch import nn
from torch.utils.data import Dataset

from mmprecond import compat

TORCH_HAS_WEIGHTS_ONLY_DEFAULT = compat._version_tuple(torch.__version__) >= (2, 6)


class ToyDataset(Dataset):
    """A fixed linear-regression problem: 16 samples of 4 features."""

    def __init__(self, num: int = 16) -> None:
        gen = torch.Generator().manual_seed(0)
        self.inputs = torch.randn(num, 4, generator=gen)
        self.targets = self.inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        return dict(inputs=self.inputs[idx], targets=self.targets[idx])


class ToyModel(BaseModel):
    """One linear layer trained with a mean squared error."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self,
                inputs: torch.Tensor,
                targets: Optional[torch.Tensor] = None,
                mode: str = 'tensor'):
        pred = self.linear(inputs).squeeze(-1)
        if mode == 'loss':
            return dict(loss=((pred - targets)**2).mean())
        return pred


class ProbeHook(Hook):
    """Records the iteration and parameters the train loop starts from."""

    def __init__(self) -> None:
        self.start_iter: Optional[int] = None
        self.start_params: Optional[List[torch.Tensor]] = None

    def before_train(self, runner: Runner) -> None:
        self.start_iter = runner.iter
        self.start_params = params_of(runner)


def params_of(runner: Runner) -> List[torch.Tensor]:
    """Detached copies of the (unwrapped) model's parameters."""
    model = getattr(runner.model, 'module', runner.model)
    return [p.detach().clone() for p in model.parameters()]


def build_toy_runner(work_dir: str,
                     max_iters: int,
                     name: str,
                     batch_size: int = 4,
                     resume: bool = False,
                     launcher: str = 'none',
                     hooks: Optional[list] = None) -> Runner:
    """A ``Runner`` for the toy problem with SGD + momentum.

    Momentum makes the optimizer state part of what a resume must restore;
    the logger hook fills the message hub with ``HistoryBuffer`` objects.
    """
    torch.manual_seed(0)
    return Runner(
        model=ToyModel(),
        work_dir=work_dir,
        experiment_name=name,
        train_dataloader=dict(
            dataset=ToyDataset(),
            sampler=dict(type='DefaultSampler', shuffle=False),
            batch_size=batch_size,
            num_workers=0,
            collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(
            optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(
            checkpoint=dict(
                type='CheckpointHook', interval=2, by_epoch=False),
            logger=dict(type='LoggerHook', interval=1)),
        custom_hooks=hooks,
        log_processor=dict(by_epoch=False),
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        launcher=launcher,
        resume=resume,
        default_scope='mmengine')


@pytest.fixture(scope='module')
def two_iter_checkpoint(tmp_path_factory) -> Dict[str, object]:
    """Train the toy runner for 2 iterations and keep its checkpoint."""
    work_dir = tmp_path_factory.mktemp('toy_resume')
    runner = build_toy_runner(str(work_dir), max_iters=2, name='toy_first')
    runner.train()
    ckpt = work_dir / 'iter_2.pth'
    assert ckpt.is_file()
    return dict(work_dir=work_dir, ckpt=ckpt, params=params_of(runner))


def test_fixes_are_active() -> None:
    """Importing mmprecond applied every fix this environment needs."""
    assert compat.APPLIED['cpu_distributed']
    assert compat.APPLIED['external_configs']
    assert compat.APPLIED['checkpoint_weights_only'] == (
        TORCH_HAS_WEIGHTS_ONLY_DEFAULT)


def test_apply_all_is_idempotent() -> None:
    torch_view = mmengine_checkpoint.torch
    from mmengine.dist import utils as dist_utils
    init_dist_pytorch = dist_utils._init_dist_pytorch
    first = dict(compat.apply_all(force=True))
    assert compat.apply_all(force=True) == first
    assert mmengine_checkpoint.torch is torch_view
    assert dist_utils._init_dist_pytorch is init_dist_pytorch


def test_version_tuple() -> None:
    assert compat._version_tuple('2.13.0+cpu') == (2, 13, 0)
    assert compat._version_tuple('2.6.0a0+git1234') == (2, 6, 0)
    assert compat._version_tuple('1.13.1') == (1, 13, 1)


needs_safe_load = pytest.mark.skipif(
    not TORCH_HAS_WEIGHTS_ONLY_DEFAULT,
    reason='torch<2.6 loads full pickles by default')


@needs_safe_load
def test_checkpoint_needs_the_allow_list(two_iter_checkpoint) -> None:
    """The runner's checkpoint really holds non-tensor objects.

    Plain ``torch.load`` (which the fix leaves alone) refuses it; MMEngine's
    loader reads it with ``weights_only=True`` and the allow-list only.
    """
    ckpt = two_iter_checkpoint['ckpt']
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(ckpt)
    assert any(g.endswith('HistoryBuffer') for g in unsafe)
    allowed = {g[1] if isinstance(g, tuple) else
               f'{g.__module__}.{g.__qualname__}'
               for g in compat.checkpoint_safe_globals()}
    assert set(unsafe) <= allowed, set(unsafe) - allowed
    full = mmengine_checkpoint._load_checkpoint(str(ckpt))
    assert type(full['message_hub']['log_scalars']['train/loss']).__name__ \
        == 'HistoryBuffer'
    # the allow-list was scoped to MMEngine's loader
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt)


class _WritesMarker:
    """Pickles to ``open(marker, 'w')``: code that runs when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, 'w'))


@pytest.fixture
def malicious_checkpoint(tmp_path) -> Dict[str, Path]:
    """A checkpoint with real weights whose ``meta`` would run code."""
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save(dict(state_dict=ToyModel().state_dict(),
                    meta=dict(payload=_WritesMarker(marker))), path)
    return dict(path=path, marker=marker)


@needs_safe_load
@pytest.mark.parametrize('how', ['load_from', 'resume', 'load_checkpoint',
                                 'file_url'])
def test_code_in_checkpoint_is_refused(malicious_checkpoint, how,
                                       tmp_path) -> None:
    """Every MMEngine loading path refuses the payload before it runs."""
    path, marker = malicious_checkpoint['path'], malicious_checkpoint['marker']
    with pytest.raises(pickle.UnpicklingError) as info:
        if how == 'load_checkpoint':
            mmengine_checkpoint.load_checkpoint(ToyModel(), str(path))
        elif how == 'file_url':  # the http(s)/torchvision loader
            mmengine_checkpoint.load_url(
                path.as_uri(), model_dir=str(tmp_path / 'hub'))
        else:
            runner = build_toy_runner(str(tmp_path / how), max_iters=1,
                                      name=how)
            if how == 'load_from':
                runner.load_checkpoint(str(path))
            else:
                runner.resume(str(path))
    message = str(info.value)
    assert 'mmprecond refused to load checkpoint' in message
    assert 'open' in message  # the offending global is named
    assert 'add_safe_globals' in message
    assert not marker.exists()
    # the allow-list did not leak into the process
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    assert not marker.exists()


def test_resume_equals_uninterrupted(two_iter_checkpoint, tmp_path) -> None:
    """2 iterations + ``resume=True`` + 2 more == 4 uninterrupted iterations."""
    probe = ProbeHook()
    resumed = build_toy_runner(
        str(two_iter_checkpoint['work_dir']),
        max_iters=4,
        name='toy_resumed',
        resume=True,
        hooks=[probe])
    resumed.train()

    # The resume restored the iteration counter and the parameters ...
    assert probe.start_iter == 2
    for got, want in zip(probe.start_params, two_iter_checkpoint['params']):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert resumed.iter == 4
    # ... and the optimizer state and data position: the continued run
    # ends exactly where an uninterrupted 4-iteration run ends.
    straight = build_toy_runner(
        str(tmp_path / 'straight'), max_iters=4, name='toy_straight')
    straight.train()
    for got, want in zip(params_of(resumed), params_of(straight)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # and training did something.
    assert not torch.equal(params_of(straight)[0],
                           two_iter_checkpoint['params'][0])


DDP_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    sys.path.insert(0, {tests_dir!r})
    from test_compat import build_toy_runner, params_of

    runner = build_toy_runner({work_dir!r}, max_iters=3, name='toy_ddp',
                              launcher='pytorch')
    runner.train()
    assert type(runner.model).__name__ == 'MMDistributedDataParallel'
    assert torch.distributed.get_world_size() == 2
    rank = torch.distributed.get_rank()
    torch.save(params_of(runner), os.path.join({work_dir!r}, f'rank{{rank}}.pt'))
""")


def test_cpu_ddp_equals_single_process(tmp_path) -> None:
    """``launcher='pytorch'`` with gloo trains on CPU (2 ranks x batch 4).

    With an unshuffled ``DefaultSampler`` the two ranks together see the
    same 8 samples per step as one process with batch 8, so DDP's gradient
    averaging must give that process's parameters on both ranks.
    """
    script = tmp_path / 'ddp_toy.py'
    script.write_text(
        DDP_SCRIPT.format(
            tests_dir=str(Path(__file__).parent), work_dir=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS='1')
    port = _free_port()
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1',
         '--nproc_per_node=2', '--master_addr=127.0.0.1',
         f'--master_port={port}', str(script)],
        env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    single = build_toy_runner(
        str(tmp_path / 'single'), max_iters=3, name='toy_single',
        batch_size=8)
    single.train()
    rank_params = [torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1)]
    for p0, p1, want in zip(*rank_params, params_of(single)):
        torch.testing.assert_close(p0, p1, rtol=0, atol=0)
        torch.testing.assert_close(p0, want, rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_mmprecond_base_configs_resolve(tmp_path) -> None:
    """``_base_ = 'mmprecond::...'`` reads from the package's ``.mim``."""
    from mmengine.config import Config

    cfg_file = tmp_path / 'child.py'
    cfg_file.write_text(
        "_base_ = 'mmprecond::_base_/datasets/synthetic_coco_detection.py'\n"
        'train_dataloader = dict(batch_size=2)\n')
    cfg = Config.fromfile(str(cfg_file))
    assert cfg.dataset_type == 'CocoDataset'
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.train_dataloader.num_workers == 2  # from the base


def test_installed_path_falls_back_to_import_system(tmp_path) -> None:
    """PEP 660 editable installs: the computed directory does not exist."""
    import mmprecond

    missing = str(tmp_path / 'site-packages' / 'mmprecond')
    get_path = compat._import_aware_installed_path(lambda package: missing)
    assert get_path('mmprecond') == os.path.dirname(mmprecond.__file__)
    existing = str(tmp_path)
    assert compat._import_aware_installed_path(
        lambda package: existing)('mmprecond') == existing


@needs_safe_load
def test_runner_checkpoint_loads_in_a_fresh_process(two_iter_checkpoint):
    """Before any HistoryBuffer exists (its statistics registry is empty)."""
    code = ('import mmprecond, sys\n'
            'from mmengine.runner.checkpoint import _load_checkpoint\n'
            'from mmengine.logging import HistoryBuffer\n'
            'assert not HistoryBuffer._statistics_methods\n'
            'ckpt = _load_checkpoint(sys.argv[1])\n'
            "buf = ckpt['message_hub']['log_scalars']['train/loss']\n"
            "print(buf.statistics('mean'))\n")
    proc = subprocess.run(
        [sys.executable, '-c', code, str(two_iter_checkpoint['ckpt'])],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) > 0

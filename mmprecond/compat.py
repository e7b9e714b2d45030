# Copyright (c) mmprecond contributors. All rights reserved.
"""Compatibility fixes for MMEngine 0.10.x on current PyTorch builds.

``mmprecond/__init__.py`` imports this module before anything else, so every
entry point that imports the package (``tools/train.py``, ``mim train``, a
config's ``custom_imports=dict(imports=['mmprecond'])``) gets the fixes.  Each
fix is applied by :func:`apply_all` (called at import), is idempotent, is
gated on the versions/conditions that actually need it and never edits files
in ``site-packages``.  :data:`APPLIED` records which fixes are active.

1. **Resume on torch >= 2.6** (``checkpoint_weights_only``).  PyTorch 2.6
   switched ``torch.load`` to ``weights_only=True``.  MMEngine 0.10.7 (the
   latest release) calls ``torch.load(filename, map_location=...)`` without the
   argument, so ``--resume`` dies on the ``HistoryBuffer`` objects and NumPy
   arrays that the runner stores under ``message_hub`` (open-mmlab/mmengine
   #1655; fixed upstream after 0.10.7 by passing ``weights_only=False``).

   The fix gives ``mmengine.runner.checkpoint`` its own view of ``torch``
   whose ``load`` defaults to ``weights_only=False``; all other attributes are
   the real module's.  This is what upstream does, and it is confined to
   MMEngine's checkpoint loaders (local files, ``open-mmlab://`` files in the
   MMEngine home, ``s3://``/``petrel://``, ``pavi://``): ``torch.load``
   elsewhere keeps PyTorch's safe default, and downloads through
   ``mmengine.utils.dl_utils.load_url`` (plain pretrained state dicts) stay
   ``weights_only=True``.  A caller that passes ``weights_only`` explicitly is
   honoured.

   Registering safe globals (``torch.serialization.add_safe_globals``) was
   rejected: the checkpoint holds arbitrary picklable objects, not a fixed
   set of types - ``HistoryBuffer``, NumPy arrays, dtypes and scalars (whose
   pickle reconstructors moved from ``numpy.core`` to ``numpy._core`` in NumPy
   2), the ``dataset_meta`` and metric values under ``meta``, and whatever a
   hook puts into the ``runtime_info``.  An allow-list would break on the
   next such object and would loosen ``torch.load`` for the whole process.
   As with any pickle, load only checkpoints you trust (the contract MMEngine
   had before torch 2.6).

   Gate: torch >= 2.6 and the installed MMEngine's checkpoint module does not
   already pass ``weights_only``.

2. **Distributed training on CPU-only machines** (``cpu_distributed``).
   MMEngine assumes CUDA once a launcher is used:

   * ``mmengine.dist.utils._init_dist_pytorch`` calls
     ``torch.cuda.set_device(local_rank)`` unconditionally, which raises
     ``AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'``
     on CPU builds of torch (and an error on any machine without a GPU);
   * ``Runner.wrap_model`` builds ``MMDistributedDataParallel`` with
     ``device_ids=[LOCAL_RANK]``, which ``DistributedDataParallel`` rejects
     for a module that lives on the CPU.

   The fix initialises the process group without touching CUDA when no GPU,
   NPU, MLU or MUSA device is present, and drops ``device_ids`` when the
   wrapped module's parameters are on the CPU.  Both only act in situations
   that raise an error without them.  Use the ``gloo`` backend on CPU
   (``tools/train.py`` selects it automatically).

3. **``_base_ = 'mmprecond::...'``** (``external_configs``).  MMEngine only
   resolves ``pkg::path`` for the packages listed in
   ``mmengine.config.utils.MODULE2PACKAGE``; ``mmprecond`` is added there.
   The config is then read from ``<package dir>/.mim/configs/path``, where
   MMEngine computes the package directory from the distribution's
   location.  For a PEP 660 editable install (``pip install -e .`` with
   setuptools >= 64; legacy ``setup.py develop`` installs are gone from
   setuptools 80) that location is ``site-packages``, which holds no
   ``mmprecond/`` directory.  The config loader's ``get_installed_path`` is
   wrapped to fall back to the directory the import system uses when the
   computed one does not exist.  (``mim`` runs in its own process and does
   not see this; ``tools/install_env.sh`` links the package directory into
   ``site-packages`` for it.)  This fix needs ``import mmprecond`` before
   ``Config.fromfile``, as ``tools/train.py`` and ``tools/test.py`` do.

Set ``MMPRECOND_DISABLE_COMPAT=1`` in the environment to skip every fix at
import (to reproduce the upstream failures); ``apply_all(force=True)`` still
applies them.
"""
import functools
import importlib.util
import inspect
import os
import os.path as osp
from typing import Any, Callable, Dict

import torch

__all__ = ['APPLIED', 'apply_all', 'patch_checkpoint_weights_only',
           'patch_cpu_distributed', 'patch_external_configs']

#: Name of each fix -> whether it is active in this process.
APPLIED: Dict[str, bool] = {}

_MARK = '_mmprecond_compat'


def _version_tuple(version: str) -> tuple:
    """Turn ``'2.13.0+cpu'`` into ``(2, 13, 0)`` (numeric fields only)."""
    parts = []
    for field in version.split('+')[0].split('.')[:3]:
        digits = ''.join(ch for ch in field if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


class _TrustedLoadTorch:
    """Stand-in for the ``torch`` module inside one MMEngine module.

    Every attribute is looked up on the real ``torch`` module, except
    :meth:`load`, whose ``weights_only`` defaults to ``False``.

    Args:
        torch_module: The real ``torch`` module.
    """

    def __init__(self, torch_module: Any) -> None:
        object.__setattr__(self, '_torch', torch_module)
        object.__setattr__(self, _MARK, True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def __repr__(self) -> str:
        return f'<mmprecond trusted-load view of {self._torch!r}>'

    def load(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        """``torch.load`` with ``weights_only=False`` unless given."""
        kwargs.setdefault('weights_only', False)
        return self._torch.load(f, *args, **kwargs)


def patch_checkpoint_weights_only() -> bool:
    """Let MMEngine's checkpoint loaders unpickle full checkpoints again.

    Returns:
        bool: Whether the fix is active after the call.
    """
    from mmengine.runner import checkpoint as ckpt_module

    if getattr(ckpt_module.torch, _MARK, False):
        return True
    if _version_tuple(torch.__version__) < (2, 6):
        return False
    try:
        source = inspect.getsource(ckpt_module)
    except (OSError, TypeError):
        source = ''
    if 'weights_only' in source:
        # This MMEngine already chooses ``weights_only`` itself.
        return False
    ckpt_module.torch = _TrustedLoadTorch(torch)
    return True


def _has_accelerator() -> bool:
    """Whether MMEngine would bind the process to a GPU-like device."""
    from mmengine.device import get_device

    return get_device() not in ('cpu', 'mps')


def _cpu_aware_init_dist_pytorch(original: Callable) -> Callable:
    """Wrap ``_init_dist_pytorch`` so it skips CUDA on CPU-only machines."""

    @functools.wraps(original)
    def init_dist_pytorch(backend: str,
                          init_backend: str = 'torch',
                          **kwargs: Any) -> None:
        if init_backend != 'torch' or _has_accelerator():
            return original(backend, init_backend=init_backend, **kwargs)
        # Same as MMEngine's CUDA branch minus ``torch.cuda.set_device``:
        # RANK, WORLD_SIZE and MASTER_* come from the launcher's env.
        torch.distributed.init_process_group(backend=backend, **kwargs)

    setattr(init_dist_pytorch, _MARK, True)
    return init_dist_pytorch


def _cpu_aware_ddp_init(original: Callable) -> Callable:
    """Wrap ``MMDistributedDataParallel.__init__`` to accept CPU modules."""

    @functools.wraps(original)
    def __init__(self: Any, module: torch.nn.Module, *args: Any,
                 **kwargs: Any) -> None:
        devices = {p.device.type for p in module.parameters()}
        if kwargs.get('device_ids') is not None and devices == {'cpu'}:
            # DDP needs ``device_ids=None`` for CPU modules.
            kwargs['device_ids'] = None
            kwargs.pop('output_device', None)
        original(self, module, *args, **kwargs)

    setattr(__init__, _MARK, True)
    return __init__


def patch_cpu_distributed() -> bool:
    """Make MMEngine's ``pytorch`` launcher and DDP wrapper work on CPU.

    Returns:
        bool: Whether the fix is active after the call.
    """
    from mmengine.dist import utils as dist_utils
    from mmengine.model.wrappers import distributed as ddp_module

    if not getattr(dist_utils._init_dist_pytorch, _MARK, False):
        dist_utils._init_dist_pytorch = _cpu_aware_init_dist_pytorch(
            dist_utils._init_dist_pytorch)
    wrapper_cls = ddp_module.MMDistributedDataParallel
    if not getattr(wrapper_cls.__init__, _MARK, False):
        wrapper_cls.__init__ = _cpu_aware_ddp_init(wrapper_cls.__init__)
    return True


def _import_aware_installed_path(original: Callable) -> Callable:
    """Wrap ``get_installed_path`` to handle PEP 660 editable installs."""

    @functools.wraps(original)
    def get_installed_path(package: str) -> str:
        path = original(package)
        if osp.isdir(path):
            return path
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            return list(spec.submodule_search_locations)[0]
        return path

    setattr(get_installed_path, _MARK, True)
    return get_installed_path


def patch_external_configs() -> bool:
    """Make ``_base_ = 'mmprecond::<path under configs/>'`` resolve.

    Returns:
        bool: Whether the fix is active after the call.
    """
    from mmengine.config import config as config_module
    from mmengine.config import utils as config_utils

    config_utils.MODULE2PACKAGE.setdefault('mmprecond', 'mmprecond')
    if not getattr(config_module.get_installed_path, _MARK, False):
        config_module.get_installed_path = _import_aware_installed_path(
            config_module.get_installed_path)
    return True


_FIXES: Dict[str, Callable[[], bool]] = {
    'checkpoint_weights_only': patch_checkpoint_weights_only,
    'cpu_distributed': patch_cpu_distributed,
    'external_configs': patch_external_configs,
}


def apply_all(force: bool = False) -> Dict[str, bool]:
    """Apply every compatibility fix that this environment needs.

    Args:
        force: Apply even when ``MMPRECOND_DISABLE_COMPAT`` is set.

    Returns:
        dict: :data:`APPLIED`, fix name -> whether it is active.
    """
    if not force and os.environ.get('MMPRECOND_DISABLE_COMPAT', '') not in (
            '', '0'):
        return APPLIED
    for name, fix in _FIXES.items():
        APPLIED[name] = fix()
    return APPLIED


apply_all()

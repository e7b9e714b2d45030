# Copyright (c) mmprecond contributors. All rights reserved.
"""Compatibility fixes for MMEngine 0.10.x on current PyTorch builds.

``mmprecond/__init__.py`` imports this module before anything else, so every
entry point that imports the package (``tools/train.py``, ``mim train``, a
config's ``custom_imports=dict(imports=['mmprecond'])``) gets the fixes.  Each
fix is applied by :func:`apply_all` (called at import), is idempotent, is
gated on the versions/conditions that actually need it and never edits files
in ``site-packages``.  :data:`APPLIED` records which fixes are active.

1. **Safe checkpoint loading on torch >= 2.6** (``checkpoint_weights_only``).
   PyTorch 2.6 switched ``torch.load`` to ``weights_only=True``, which only
   rebuilds tensors, containers and primitive types (and the types
   registered as safe) and never runs code from the file.  MMEngine 0.10.7
   (the latest release) calls ``torch.load(filename, map_location=...)``
   without the argument, so ``--resume`` dies on the ``HistoryBuffer``
   objects and NumPy arrays the runner stores under ``message_hub``
   (open-mmlab/mmengine#1655).  Upstream MMEngine answers with
   ``weights_only=False``, which lets any checkpoint - a ``load_from`` file
   downloaded from anywhere included - run code when it is loaded.

   This fix keeps ``weights_only=True`` and allows, only while one of
   MMEngine's checkpoint loaders runs, exactly the extra types MMEngine and
   OpenMMLab checkpoints hold (:data:`CHECKPOINT_SAFE_GLOBALS`):
   ``mmengine.logging.HistoryBuffer`` and the NumPy array, scalar and dtype
   reconstructors (for non-object dtypes).  ``mmengine.runner.checkpoint``
   gets its own view of ``torch`` whose ``load`` always passes
   ``weights_only=True`` inside :func:`torch.serialization.safe_globals`,
   and its ``load_url`` (``http(s)://``, ``torchvision://``,
   ``open-mmlab://`` downloads; ``torch.hub`` defaults those to
   ``weights_only=False``) is wrapped the same way.  A checkpoint that
   pickles anything else is refused with an
   :class:`pickle.UnpicklingError` that names the offending globals and what
   to do.  ``torch.load`` elsewhere in the process is untouched.

   Gate: torch >= 2.6 (earlier releases load full pickles by default and
   have no scoped allow-list).

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

4. **A first-order optimizer resumed from a preconditioned checkpoint**
   (``foreign_optimizer_state``).  ``torch.optim`` optimizers ignore state
   dict keys they do not know, so ``AdamW`` resumed from an ``AdaNKFAC``
   checkpoint silently takes over the Adam moments of preconditioned
   gradients.  MMEngine's optimizer wrappers log one warning naming the
   ignored keys and the fix (``load_from`` without ``resume``).

Set ``MMPRECOND_DISABLE_COMPAT=1`` in the environment to skip every fix at
import (to reproduce the upstream failures); ``apply_all(force=True)`` still
applies them.
"""
import functools
import importlib.util
import os
import os.path as osp
import pickle
import re
from typing import Any, Callable, Dict, List

import torch

__all__ = ['APPLIED', 'CHECKPOINT_SAFE_GLOBALS', 'CorruptCheckpointError',
           'apply_all',
           'checkpoint_safe_globals', 'safe_checkpoint_load',
           'patch_checkpoint_weights_only',
           'patch_cpu_distributed', 'patch_external_configs',
           'patch_foreign_optimizer_state']

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


def _numpy_globals() -> List[Any]:
    """NumPy callables/classes that non-object arrays and scalars pickle to."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy < 2
        from numpy.core import multiarray
    found: List[Any] = [multiarray._reconstruct, multiarray.scalar,
                        np.ndarray, np.dtype]
    dtypes = getattr(np, 'dtypes', None)  # NumPy >= 1.25: one class per dtype
    for name in dir(dtypes) if dtypes is not None else ():
        cls = getattr(dtypes, name)
        if (isinstance(cls, type) and name.endswith('DType')
                and name not in ('ObjectDType', 'VoidDType')):
            found.append(cls)
    return found


def checkpoint_safe_globals() -> List[Any]:
    """The types MMEngine / OpenMMLab checkpoints hold beyond plain data.

    ``weights_only=True`` already rebuilds tensors, ``dict``/``OrderedDict``,
    lists, tuples, sets, strings and numbers.  A runner checkpoint adds the
    message hub's :class:`~mmengine.logging.HistoryBuffer` objects (NumPy
    ``float64`` arrays inside) and NumPy scalars in the runtime info.
    Object arrays are not allowed: their elements could be anything.

    Returns:
        list: Classes and functions for :func:`torch.serialization.safe_globals`.
    """
    from mmengine.logging import HistoryBuffer

    return [HistoryBuffer, (_history_buffer_getattr, 'builtins.getattr')
            ] + _numpy_globals()


_HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def _history_buffer_getattr(obj: Any, name: str) -> Any:
    """The one ``getattr`` a HistoryBuffer pickle needs, and nothing more.

    A ``HistoryBuffer`` pickles its ``_statistics_methods`` (``min``,
    ``max``, ``current``, ``mean`` and any registered with
    ``HistoryBuffer.register_statistics``) as ``getattr(HistoryBuffer,
    'min')``; a general ``getattr`` would let a pickle reach any attribute.
    """
    from mmengine.logging import HistoryBuffer

    # ``_statistics_methods`` only fills in when a first buffer is created.
    allowed = set(_HISTORY_BUFFER_STATISTICS) | {
        n for n, m in HistoryBuffer._statistics_methods.items() if callable(m)}
    if obj is HistoryBuffer and name in allowed:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'getattr({obj!r}, {name!r}) is not allowed in a checkpoint (only '
        'HistoryBuffer statistics methods are)')


#: Filled at the first checkpoint load (see :func:`checkpoint_safe_globals`).
CHECKPOINT_SAFE_GLOBALS: List[Any] = []

REFUSED_CHECKPOINT_MSG = (
    'mmprecond refused to load checkpoint {source}: it pickles objects that '
    'MMEngine checkpoints do not hold ({globals}), and unpickling them could '
    'run code. MMEngine checkpoints are loaded with torch.load(weights_only='
    'True) plus an allow-list of the types MMEngine stores (HistoryBuffer, '
    'NumPy arrays/scalars; see mmprecond/compat.py). If you made this file '
    'yourself and trust it, either allow its extra types before loading: '
    'torch.serialization.add_safe_globals([...]), or convert it once: '
    "ckpt = torch.load(path, weights_only=False); torch.save(dict(state_dict="
    "ckpt['state_dict']), new_path). PyTorch said: {error}")


def _describe_source(source: Any) -> str:
    return repr(source) if isinstance(source, (str, os.PathLike)) else (
        f'<{type(source).__name__}>')


def safe_checkpoint_load(load: Callable, source: Any, *args: Any,
                         **kwargs: Any) -> Any:
    """Call ``load`` (``torch.load`` or a URL loader) safely.

    ``weights_only=True`` is always passed, the MMEngine types in
    :data:`CHECKPOINT_SAFE_GLOBALS` are allowed for the duration of the call
    only, and a refusal is re-raised with a message saying what to do.

    Args:
        load (Callable): ``torch.load`` or ``torch.hub``'s ``load_url``.
        source: The file, buffer or URL; passed on unchanged.

    Returns:
        The loaded checkpoint.

    Raises:
        pickle.UnpicklingError: If the file pickles anything else.
    """
    if not CHECKPOINT_SAFE_GLOBALS:
        CHECKPOINT_SAFE_GLOBALS.extend(checkpoint_safe_globals())
    kwargs['weights_only'] = True
    with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
        try:
            return load(source, *args, **kwargs)
        except pickle.UnpicklingError as err:
            if _is_refusal(source, err):
                raise pickle.UnpicklingError(
                    _refusal_message(source, err)) from err
            raise CorruptCheckpointError(
                _corrupt_message(source, err)) from err
        except (UnicodeDecodeError, EOFError) as err:
            raise CorruptCheckpointError(
                _corrupt_message(source, err)) from err
        except RuntimeError as err:
            if 'PytorchStreamReader' not in str(err):
                raise
            raise CorruptCheckpointError(
                _corrupt_message(source, err)) from err


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read: truncated or overwritten bytes.

    Raised by :func:`safe_checkpoint_load` instead of the bare
    ``UnicodeDecodeError``, ``EOFError``, ``PytorchStreamReader`` error or
    unknown pickle opcode that ``torch.load`` gives for such a file; the
    message names the file and what to do.
    """


CORRUPT_CHECKPOINT_MSG = (
    'Cannot read checkpoint {source}: the file is damaged ({size}; torch.load '
    'said {kind}: {error}). It was probably cut short or overwritten while it '
    'was written or copied (a killed job, a full disk, an interrupted '
    'download). Use an intact checkpoint instead: an earlier iter_*.pth / '
    'epoch_*.pth from the same work dir with --resume PATH (or resume=True, '
    'load_from=PATH in the config; --resume alone reads the path in the work '
    "dir's last_checkpoint file), or download the file again.")


def _corrupt_message(source: Any, err: Exception) -> str:
    """:data:`CORRUPT_CHECKPOINT_MSG` for ``source`` and torch's error."""
    size = 'size unknown'
    if isinstance(source, (str, os.PathLike)) and osp.isfile(source):
        size = f'{osp.getsize(source)} bytes'
    first = _unpickler_reason(err)
    return CORRUPT_CHECKPOINT_MSG.format(
        source=_describe_source(source), size=size,
        kind=type(err).__name__, error=first)


def _is_refusal(source: Any, err: Exception) -> bool:
    """Whether ``err`` is the allow-list refusing a global (not bad bytes).

    ``weights_only`` loading reports an unknown opcode (``Unsupported
    operand 255``), which is what damaged bytes decode to, as an
    ``UnpicklingError`` as well; only an error whose reason names a global
    (or a file in which torch finds globals outside the allow-list) is a
    refusal.
    """
    if 'global' in _unpickler_reason(err).lower():
        return True
    if isinstance(source, (str, os.PathLike)) and osp.isfile(source):
        try:
            return bool(
                torch.serialization.get_unsafe_globals_in_checkpoint(source))
        except Exception:  # noqa: BLE001 - an unreadable file is not a refusal
            return False
    return False


def _unpickler_reason(err: Exception) -> str:
    """The line of torch's ``weights_only`` error that says what failed."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    at = next((i for i, ln in enumerate(lines) if 'WeightsUnpickler' in ln),
              None)
    reason = lines[0] if lines else ''
    if at is not None:  # the error, on that line or the next one
        reason = lines[at] if not lines[at].endswith(':') or at + 1 == len(
            lines) else lines[at + 1]
    return reason


def _refusal_message(source: Any, err: Exception) -> str:
    """:data:`REFUSED_CHECKPOINT_MSG` filled in from torch's error."""
    reason = _unpickler_reason(err)
    unsafe = re.findall(r'GLOBAL ([\w.]+)', reason)
    if isinstance(source, (str, os.PathLike)) and osp.isfile(source):
        try:
            unsafe = sorted(
                torch.serialization.get_unsafe_globals_in_checkpoint(source))
        except Exception:  # noqa: BLE001 - best effort, for the message only
            pass
    return REFUSED_CHECKPOINT_MSG.format(
        source=_describe_source(source), globals=', '.join(unsafe) or reason,
        error=reason)


class _SafeLoadTorch:
    """Stand-in for the ``torch`` module inside one MMEngine module.

    Every attribute is looked up on the real ``torch`` module, except
    :meth:`load`, which goes through :func:`safe_checkpoint_load`.

    Args:
        torch_module: The real ``torch`` module.
    """

    def __init__(self, torch_module: Any) -> None:
        object.__setattr__(self, '_torch', torch_module)
        object.__setattr__(self, _MARK, True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def __repr__(self) -> str:
        return f'<mmprecond safe-load view of {self._torch!r}>'

    def load(self, f: Any, *args: Any, **kwargs: Any) -> Any:
        """``torch.load(weights_only=True)`` with MMEngine's types allowed."""
        return safe_checkpoint_load(self._torch.load, f, *args, **kwargs)


def _safe_load_url(original: Callable) -> Callable:
    """Wrap a ``load_url`` so that it never unpickles code."""

    @functools.wraps(original)
    def load_url(url: str, *args: Any, **kwargs: Any) -> Any:
        return safe_checkpoint_load(original, url, *args, **kwargs)

    setattr(load_url, _MARK, True)
    return load_url


def patch_checkpoint_weights_only() -> bool:
    """Load MMEngine checkpoints with ``weights_only=True`` and an allow-list.

    Returns:
        bool: Whether the fix is active after the call.
    """
    from mmengine.runner import checkpoint as ckpt_module

    if getattr(ckpt_module.torch, _MARK, False):
        return True
    if (_version_tuple(torch.__version__) < (2, 6)
            or not hasattr(torch.serialization, 'safe_globals')):
        return False
    ckpt_module.torch = _SafeLoadTorch(torch)
    if not getattr(ckpt_module.load_url, _MARK, False):
        ckpt_module.load_url = _safe_load_url(ckpt_module.load_url)
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


#: Top-level keys of an optimizer-wrapper state dict that a plain
#: ``torch.optim`` optimizer (or MMEngine's wrappers) reads.
_TORCH_OPTIMIZER_KEYS = ('state', 'param_groups', 'loss_scaler',
                         'base_param_settings')

FOREIGN_OPTIMIZER_STATE_MSG = (
    'The checkpoint being resumed holds optimizer state that {optimizer} does '
    'not read ({keys}): it was written by a different optimizer, most likely '
    'one of mmprecond\'s preconditioned ones. {optimizer} ignores that part '
    'and takes over the per-parameter state as it is ({state}), i.e. moments '
    'of preconditioned gradients, whose scale has nothing to do with '
    '{optimizer}\'s own; the first steps after the resume can be far off. To '
    'start {optimizer} afresh from these weights, train with load_from=CKPT '
    'and resume=False (weights only, a new schedule); to continue the run, '
    'resume it with the optimizer it was written with.')


def _warn_foreign_optimizer_state(wrapper: Any, state_dict: Any) -> None:
    """Log once if a plain torch optimizer is about to drop part of a state.

    The opposite case (a preconditioned optimizer resumed from a first-order
    checkpoint) is counted and logged by the optimizer itself
    (``missing_preconditioner_state``).
    """
    optimizer = getattr(wrapper, 'optimizer', None)
    if not isinstance(state_dict, dict) or not isinstance(
            optimizer, torch.optim.Optimizer):
        return
    if (type(optimizer).load_state_dict
            is not torch.optim.Optimizer.load_state_dict):
        return  # it reads its own extra keys
    extra = sorted(k for k in state_dict if k not in _TORCH_OPTIMIZER_KEYS)
    if not extra:
        return
    from mmengine.logging import print_log

    names = sorted({k for st in state_dict.get('state', {}).values()
                    if isinstance(st, dict) for k in st})
    print_log(FOREIGN_OPTIMIZER_STATE_MSG.format(
        optimizer=type(optimizer).__name__,
        keys=', '.join(map(repr, extra)),
        state=', '.join(names) or 'none'), logger='current', level=30)


def _checked_load_state_dict(original: Callable) -> Callable:
    """Wrap an optimizer wrapper's ``load_state_dict`` with the warning."""

    @functools.wraps(original)
    def load_state_dict(self: Any, state_dict: dict) -> None:
        _warn_foreign_optimizer_state(self, state_dict)
        return original(self, state_dict)

    setattr(load_state_dict, _MARK, True)
    return load_state_dict


def patch_foreign_optimizer_state() -> bool:
    """Warn when a first-order optimizer resumes a preconditioned checkpoint.

    ``torch.optim.Optimizer.load_state_dict`` ignores top-level keys it does
    not know, so ``AdamW`` resumed from an ``AdaNKFAC`` checkpoint silently
    keeps the Adam moments of the preconditioned gradients.  MMEngine's
    ``BaseOptimWrapper`` (``OptimWrapper``'s) and ``AmpOptimWrapper`` (which
    does not call its parent's) ``load_state_dict`` get a check that names
    the ignored keys and the fix.

    Returns:
        bool: Whether the fix is active after the call.
    """
    from mmengine.optim import AmpOptimWrapper
    from mmengine.optim.optimizer.base import BaseOptimWrapper

    for cls in (BaseOptimWrapper, AmpOptimWrapper):
        method = cls.__dict__.get('load_state_dict')
        if method is not None and not getattr(method, _MARK, False):
            cls.load_state_dict = _checked_load_state_dict(method)
    return True


_FIXES: Dict[str, Callable[[], bool]] = {
    'checkpoint_weights_only': patch_checkpoint_weights_only,
    'cpu_distributed': patch_cpu_distributed,
    'external_configs': patch_external_configs,
    'foreign_optimizer_state': patch_foreign_optimizer_state,
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

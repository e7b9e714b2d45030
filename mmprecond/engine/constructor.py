# Copyright (c) mmprecond contributors. All rights reserved.
"""MMEngine optim-wrapper constructor that hands the model to the optimizer."""
import inspect
from typing import List, Optional

import torch.nn as nn
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class PrecondOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """Build an optim wrapper whose optimizer may need the model.

    Behaves exactly like MMEngine's ``DefaultOptimWrapperConstructor``
    (``paramwise_cfg`` with ``custom_keys``, ``bias_decay_mult``,
    ``norm_decay_mult``, ... ; DDP unwrapping; ``type='OptimWrapper'`` or
    ``'AmpOptimWrapper'``), and in addition:

    * if the optimizer class declares ``requires_model = True`` (every
      preconditioned optimizer of mmprecond), the unwrapped model is passed
      as the ``model`` keyword, so it can hook the layers it preconditions;
    * for ``AmpOptimWrapper`` the wrapper's loss scaler is attached to the
      optimizer (``attach_grad_scaler``) so gradient statistics are unscaled.

    Plain optimizers (``SGD``, ``AdamW``, ...) are built unchanged, so going
    back to a first-order baseline is a one-field edit.

    Example:
        >>> optim_wrapper = dict(
        ...     type='OptimWrapper',
        ...     constructor='PrecondOptimWrapperConstructor',
        ...     optimizer=dict(type='AdaNKFAC', lr=1e-4, weight_decay=0.2),
        ...     paramwise_cfg=dict(norm_decay_mult=0.))
    """

    def __call__(self, model: nn.Module) -> OptimWrapper:
        if hasattr(model, 'module'):
            model = model.module
        optim_wrapper_cfg = self.optim_wrapper_cfg.copy()
        optim_wrapper_cfg.setdefault('type', 'OptimWrapper')
        optimizer_cfg = self.optimizer_cfg.copy()
        optimizer_cls = optimizer_cfg['type']
        if isinstance(optimizer_cls, str):
            with OPTIMIZERS.switch_scope_and_registry(None) as registry:
                optimizer_cls = registry.get(optimizer_cls)
            if optimizer_cls is None:
                raise KeyError(f"optimizer type '{optimizer_cfg['type']}' is not "
                               'registered (did you add custom_imports='
                               "dict(imports=['mmprecond'])?)")
        first_arg = next(iter(inspect.signature(optimizer_cls).parameters))
        if self.paramwise_cfg:
            params: List = []
            self.add_params(params, model)
            optimizer_cfg[first_arg] = params
        else:
            optimizer_cfg[first_arg] = model.parameters()
        if getattr(optimizer_cls, 'requires_model', False):
            optimizer_cfg['model'] = model
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        optim_wrapper = OPTIM_WRAPPERS.build(
            optim_wrapper_cfg, default_args=dict(optimizer=optimizer))
        attach_model = getattr(optim_wrapper, 'attach_model', None)
        if attach_model is not None:  # HessianOptimWrapper's companion
            attach_model(model)
        scaler: Optional[object] = getattr(optim_wrapper, 'loss_scaler', None)
        if scaler is not None and hasattr(optimizer, 'attach_grad_scaler'):
            optimizer.attach_grad_scaler(scaler)
        return optim_wrapper

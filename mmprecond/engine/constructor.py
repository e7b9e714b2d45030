# Copyright (c) mmprecond contributors. All rights reserved.
"""MMEngine optim-wrapper constructor that hands the model to the optimizer."""
import inspect
from typing import List, Optional, Union

import torch.nn as nn
from mmengine.optim import AmpOptimWrapper, DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS

from ..optim.checks import check_keywords
from ..optim.peers import PEER_PACKAGES
from ..protocol import EngineProtocol
from .hessian_wrapper import HessianOptimWrapper


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
      optimizer (``attach_grad_scaler``) so gradient statistics are unscaled;
    * ``base_constructor`` (a key of ``optim_wrapper``) names another
      constructor, e.g. mmpretrain's ``LearningRateDecayOptimWrapperConstructor``
      or mmdet's ``LearningRateDecayOptimizerConstructor``, whose
      ``add_params`` makes the parameter groups (layer-wise lr decay, ...);
      this constructor then builds the optimizer from those groups, so the
      two compose instead of one replacing the other;
    * the optimizer's keywords are checked before it is built: an unknown
      one fails with the list of keywords that exist.

    Plain optimizers (``SGD``, ``AdamW``, ...) are built unchanged, so going
    back to a first-order baseline is a one-field edit.

    Example:
        >>> optim_wrapper = dict(
        ...     type='OptimWrapper',
        ...     constructor='PrecondOptimWrapperConstructor',
        ...     optimizer=dict(type='AdaNKFAC', lr=1e-4, weight_decay=0.2),
        ...     paramwise_cfg=dict(norm_decay_mult=0.))
        >>> # with mmpretrain's layer-wise lr decay
        >>> optim_wrapper = dict(
        ...     constructor='PrecondOptimWrapperConstructor',
        ...     base_constructor='LearningRateDecayOptimWrapperConstructor',
        ...     optimizer=dict(type='AdamR', lr=1e-3, weight_decay=0.05),
        ...     paramwise_cfg=dict(layer_decay_rate=0.65))
    """

    def __init__(self, optim_wrapper_cfg: dict,
                 paramwise_cfg: Optional[dict] = None) -> None:
        optim_wrapper_cfg = dict(optim_wrapper_cfg)
        self.base_constructor: Optional[Union[str, type]] = (
            optim_wrapper_cfg.pop('base_constructor', None))
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        self._base: Optional[DefaultOptimWrapperConstructor] = None
        if self.base_constructor is not None:
            self._base = self._build_base_constructor(optim_wrapper_cfg,
                                                      paramwise_cfg)

    def _build_base_constructor(self, optim_wrapper_cfg: dict,
                                paramwise_cfg: Optional[dict]):
        base = self.base_constructor
        if base in ('PrecondOptimWrapperConstructor',
                    PrecondOptimWrapperConstructor):
            raise ValueError(
                'base_constructor cannot be PrecondOptimWrapperConstructor '
                'itself; name the constructor whose parameter groups you want '
                "(e.g. 'LearningRateDecayOptimWrapperConstructor').")
        built = OPTIM_WRAPPER_CONSTRUCTORS.build(
            dict(type=base, optim_wrapper_cfg=optim_wrapper_cfg,
                 paramwise_cfg=paramwise_cfg))
        if not isinstance(built, DefaultOptimWrapperConstructor):
            raise TypeError(
                f'base_constructor={base!r} has no add_params(params, module) '
                'method, so its parameter groups cannot be reused; it must be '
                'a DefaultOptimWrapperConstructor subclass.')
        return built

    def _param_groups(self, model: nn.Module):
        """The parameter groups (or plain parameters) the optimizer gets."""
        if self._base is not None:
            params: List = []
            self._base.add_params(params, model)
            return params
        if self.paramwise_cfg:
            params = []
            self.add_params(params, model)
            return params
        return model.parameters()

    def __call__(self, model: nn.Module) -> OptimWrapper:
        if hasattr(model, 'module'):  # DDP or any wrapper of the model
            model = model.module
        optim_wrapper_cfg = self.optim_wrapper_cfg.copy()
        optim_wrapper_cfg.setdefault('type', 'OptimWrapper')
        optimizer_cfg = self.optimizer_cfg.copy()
        optimizer_cls = optimizer_cfg['type']
        if isinstance(optimizer_cls, str):
            with OPTIMIZERS.switch_scope_and_registry(None) as registry:
                optimizer_cls = registry.get(optimizer_cls)
            if optimizer_cls is None and optimizer_cfg['type'] in PEER_PACKAGES:
                raise KeyError(f"optimizer type '{optimizer_cfg['type']}' "
                               'needs the peer packages: pip install '
                               '.[peers] (pytorch-optimizer, singd)')
            if optimizer_cls is None:
                raise KeyError(f"optimizer type '{optimizer_cfg['type']}' is not "
                               'registered (did you add custom_imports='
                               "dict(imports=['mmprecond'])?)")
        check_keywords(optimizer_cls, optimizer_cfg)
        first_arg = next(iter(inspect.signature(optimizer_cls).parameters))
        optimizer_cfg[first_arg] = self._param_groups(model)
        ours = (isinstance(optimizer_cls, type)
                and issubclass(optimizer_cls, EngineProtocol))
        if ours and optimizer_cls.requires_model:
            optimizer_cfg['model'] = model
        optimizer = OPTIMIZERS.build(optimizer_cfg)
        optim_wrapper = OPTIM_WRAPPERS.build(
            optim_wrapper_cfg, default_args=dict(optimizer=optimizer))
        if isinstance(optim_wrapper, HessianOptimWrapper):  # its companion
            optim_wrapper.attach_model(model)
        if (isinstance(optim_wrapper, AmpOptimWrapper)
                and isinstance(optimizer, EngineProtocol)):
            optimizer.attach_grad_scaler(optim_wrapper.loss_scaler)
        return optim_wrapper

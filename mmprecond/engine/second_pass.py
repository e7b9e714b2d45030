# Copyright (c) mmprecond contributors. All rights reserved.
"""Second forward/backward on the same minibatch inside MMEngine's loop."""
import copy
import random
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.optim import OptimWrapper, OptimWrapperDict
from mmengine.registry import HOOKS

from ..protocol import EngineProtocol


def wrapped_optimizer(optim_wrapper: Any) -> Optional[Any]:
    """The optimizer of a single ``OptimWrapper``; None for a dict of them."""
    if (isinstance(optim_wrapper, OptimWrapper)
            and not isinstance(optim_wrapper, OptimWrapperDict)):
        return optim_wrapper.optimizer
    return None


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (and initialised CUDA) RNG states."""
    state = dict(python=random.getstate(), numpy=np.random.get_state(),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state:
        torch.cuda.set_rng_state_all(state['cuda'])


def norm_buffers(model: nn.Module) -> List[torch.Tensor]:
    """Running statistics the second forward must not update twice."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            out += [b for b in (m.running_mean, m.running_var,
                                m.num_batches_tracked) if b is not None]
    return out


@HOOKS.register_module()
class SecondPassHook(Hook):
    """Re-run the loss on the same minibatch after the update (K-BFGS).

    K-BFGS (:class:`~mmprecond.optim.KBFGS`) builds its pre-activation
    secant pairs from a second forward/backward on the *same* minibatch after
    the parameter update, every ``curvature_interval`` iterations.  This hook
    does it inside MMEngine's train loop, with no change to the model or the
    loop:

    * ``before_train_iter`` (only before a curvature step): deep-copies the
      data batch (batch augmentations may edit it in place, e.g. mmdet's
      ``BatchSyncRandomResize`` rescales the boxes) and saves the Python,
      NumPy, torch and CUDA RNG states;
    * ``after_train_iter`` (after ``optimizer.step()``): restores those RNG
      states, so random crops, dropout masks and mmdet's RoI / anchor
      sampling draw the same numbers as in the first pass, runs the model's
      own ``data_preprocessor`` and ``forward(mode='loss')`` and
      ``parse_losses`` on the copy under the optim wrapper's context (AMP
      autocast included), and gives the loss to
      ``optimizer.second_pass``; then restores the RNG state of the main
      run and the BatchNorm running statistics, so the rest of training
      is not perturbed by the extra pass.

    Cost every ``T`` iterations: one forward and one backward (parameter
    ``.grad`` is not touched; the gradient is only taken to the layer
    outputs' hooks), one deep copy of the batch, and the first pass's layer
    inputs held until ``step()``.  With ``T = 20`` that is about 5-8 % more
    compute than the plain loop.  What cannot be repeated exactly: in a
    detector the proposals depend on the weights, so the sampled RoIs of the
    second pass differ even with the same random numbers; the secant pair of
    a RoI-head layer is then the difference of means over different rows.

    Models that cannot support it are refused in ``before_train`` with a
    message: several optim wrappers (``OptimWrapperDict``), gradient
    accumulation (the second pass would need every micro-batch), and models
    that override ``train_step`` (the hook cannot know what it does).

    Args:
        priority: Runs before the checkpoint and logger hooks, so a
            checkpoint never holds a pending curvature update.

    Example:
        >>> custom_hooks = [dict(type='SecondPassHook')]
    """

    priority = 'ABOVE_NORMAL'

    def __init__(self) -> None:
        self._batch: Optional[Any] = None
        self._rng: Optional[Dict[str, Any]] = None
        #: Loss of the latest second pass (detached), for inspection.
        self.last_loss: Optional[torch.Tensor] = None
        #: Number of second passes run.
        self.passes = 0

    @staticmethod
    def _optimizer(runner) -> Any:
        return wrapped_optimizer(runner.optim_wrapper)

    def before_train(self, runner) -> None:
        wrapper = runner.optim_wrapper
        if isinstance(wrapper, OptimWrapperDict):
            raise RuntimeError(
                'SecondPassHook supports a single optim wrapper, not '
                'OptimWrapperDict.')
        optimizer = self._optimizer(runner)
        if not (isinstance(optimizer, EngineProtocol)
                and optimizer.uses_second_pass):
            raise RuntimeError(
                f'SecondPassHook is for optimizers that need a second pass '
                f'(KBFGS, KBFGS_L, SMW_NG); {type(optimizer).__name__} does '
                'not.')
        if wrapper._accumulative_counts != 1:
            raise RuntimeError(
                'SecondPassHook cannot be combined with gradient accumulation '
                '(accumulative_counts > 1): the second pass would need all '
                'micro-batches of the step.')
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        if not isinstance(model, BaseModel) or \
                type(model).train_step is not BaseModel.train_step:
            raise RuntimeError(
                f'{type(model).__name__} overrides train_step (or is not an '
                'MMEngine BaseModel), so SecondPassHook cannot re-run its '
                'loss: it re-runs data_preprocessor + forward(mode="loss") + '
                'parse_losses, which is what BaseModel.train_step does.')

    def before_train_iter(self, runner, batch_idx: int,
                          data_batch: Optional[Any] = None) -> None:
        optimizer = self._optimizer(runner)
        self._batch = self._rng = None
        if optimizer.second_pass_due():
            self._batch = copy.deepcopy(data_batch)
            self._rng = rng_state()

    def after_train_iter(self, runner, batch_idx: int,
                         data_batch: Optional[Any] = None,
                         outputs: Optional[dict] = None) -> None:
        optimizer = self._optimizer(runner)
        if not optimizer.second_pass_pending():
            return
        if self._batch is None:
            raise RuntimeError('SecondPassHook: a curvature step was taken '
                               'but its batch was not saved')
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        batch, rng = self._batch, self._rng
        self._batch = self._rng = None
        main_rng = rng_state()
        buffers = norm_buffers(model)
        saved = [b.clone() for b in buffers]

        def closure() -> torch.Tensor:
            with runner.optim_wrapper.optim_context(model):
                data = model.data_preprocessor(batch, True)
                losses = model._run_forward(data, mode='loss')
            loss, _ = model.parse_losses(losses)
            self.last_loss = loss.detach()
            return loss

        set_rng_state(rng)
        try:
            first = outputs.get('loss') if isinstance(outputs, dict) else None
            optimizer.second_pass(closure, first_loss=first)
            self.passes += 1
        finally:
            with torch.no_grad():
                for b, v in zip(buffers, saved):
                    b.copy_(v)
            set_rng_state(main_rng)

# Copyright (c) mmprecond contributors. All rights reserved.
"""Warm start of curvature factors on the first N batches, before training."""
import torch
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..protocol import EngineProtocol
from .second_pass import norm_buffers, rng_state, set_rng_state, wrapped_optimizer


@HOOKS.register_module()
class WarmStartHook(Hook):
    """Fill an optimizer's warm-start statistics before the first iteration.

    Yi Ren's thesis initialises K-BFGS's input factor ``A`` and TNT's
    factors with statistics over the *whole* training set before training
    starts.  The practical alternative offered here: the optimizer's first
    ``warm_start_iters`` calls of ``step()`` only collect statistics (no
    parameter moves; see :class:`~mmprecond.optim.KBFGS` and
    :class:`~mmprecond.optim.TNT`), and this hook makes those calls in
    ``before_train`` on the first ``warm_start_iters`` batches of the train
    dataloader (a fresh iterator: the same batches epoch 0 starts with),
    through the model's own ``train_step``.  Afterwards the BatchNorm running
    statistics and the RNG states are restored, so training proper starts
    from exactly the state it would have had, and all of its iterations
    move the parameters.

    Cost: ``warm_start_iters`` forward/backward passes before training (the
    thesis' full pass costs one epoch).  After a resume the optimizer's
    step counter is past the warm start and the hook does nothing.  Without
    this hook the first ``warm_start_iters`` training iterations are the
    warm start.

    Example:
        >>> custom_hooks = [dict(type='WarmStartHook')]
    """

    priority = 'ABOVE_NORMAL'

    def before_train(self, runner) -> None:
        optimizer = wrapped_optimizer(runner.optim_wrapper)
        if (not isinstance(optimizer, EngineProtocol)
                or optimizer.warm_start_remaining() <= 0):
            return
        model = runner.model.module if is_model_wrapper(runner.model) \
            else runner.model
        buffers = norm_buffers(model)
        saved = [b.clone() for b in buffers]
        rng = rng_state()
        runner.model.train()
        loader = runner.train_dataloader
        batches = iter(loader)
        done = 0
        while optimizer.warm_start_remaining() > 0:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            runner.model.train_step(batch, optim_wrapper=runner.optim_wrapper)
            done += 1
        with torch.no_grad():
            for b, v in zip(buffers, saved):
                b.copy_(v)
        set_rng_state(rng)
        print_log(f'[WarmStartHook] warm-start statistics of '
                  f'{type(optimizer).__name__} from {done} batches',
                  logger='current')

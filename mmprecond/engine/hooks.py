# Copyright (c) mmprecond contributors. All rights reserved.
"""Training-log visibility for preconditioned optimizers."""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class PrecondStatsHook(Hook):
    """Put a preconditioned optimizer's counters into the training log.

    Every ``interval`` iterations it writes, through the runner's message
    hub (so ``LoggerHook`` prints them and visualisation backends record
    them), the optimizer's fallback counts (``precond/<kind>``: Newton
    fallbacks, eigh retries, non-finite statistics, excluded layers, ...)
    and its cumulative phase times in seconds (``precond/<phase>_s``).
    Does nothing for optimizers without those counters (SGD, AdamW).

    Args:
        interval (int): Logging interval in iterations. Defaults to 50.

    Example:
        >>> custom_hooks = [dict(type='PrecondStatsHook', interval=50)]
    """

    priority = 'BELOW_NORMAL'

    def __init__(self, interval: int = 50) -> None:
        self.interval = interval

    def after_train_iter(self,
                         runner,
                         batch_idx: int,
                         data_batch: Optional[dict] = None,
                         outputs: Optional[dict] = None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        optimizer = getattr(runner.optim_wrapper, 'optimizer', None)
        fallbacks = getattr(optimizer, 'fallbacks', None)
        if fallbacks is None:
            return
        hub = runner.message_hub
        for kind, count in fallbacks.counts.items():
            hub.update_scalar(f'train/precond/{kind}', count)
        for phase, seconds in optimizer.phase_seconds.items():
            hub.update_scalar(f'train/precond/{phase}_s', seconds)

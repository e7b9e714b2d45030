# Copyright (c) mmprecond contributors. All rights reserved.
"""A hook that SIGKILLs its own training process (interruption test only)."""
import os
import signal

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


@HOOKS.register_module()
class SigkillAfterIter(Hook):
    """``kill -9`` the process once ``after_iter`` training iterations ran.

    Runs at the lowest priority, so the checkpoint of that iteration (if
    one is due) has been written, as when a job is preempted right after a
    checkpoint; use an iteration past a checkpoint to lose work too.

    Args:
        after_iter (int): Number of finished iterations to kill at.
    """

    priority = 'LOWEST'

    def __init__(self, after_iter: int) -> None:
        self.after_iter = after_iter

    def after_train_iter(self, runner, batch_idx, data_batch=None,
                         outputs=None) -> None:
        if runner.iter + 1 >= self.after_iter:
            os.kill(os.getpid(), signal.SIGKILL)

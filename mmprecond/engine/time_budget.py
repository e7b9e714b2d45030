# Copyright (c) mmprecond contributors. All rights reserved.
"""Stop an iteration-based run once its training wall-clock budget is spent."""
import time
from typing import Optional

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.registry import HOOKS
from mmengine.runner import IterBasedTrainLoop


@HOOKS.register_module()
class TimeBudgetHook(Hook):
    """End training when its summed host seconds reach ``budget_s``.

    The clock is the one MMEngine's ``IterTimerHook`` logs as ``time``:
    every training iteration counts from the end of the previous one (its
    data loading included) to its ``after_train_iter``; validation is not
    counted (the clock restarts after each validation).  Only
    ``time.perf_counter`` is read, never a device value.

    Every ``interval`` iterations the hook compares the clock with the
    budget and stops at the check whose clock is nearest to it: when the
    next check, at the mean rate so far, would overshoot the budget by more
    than this one falls short of it.  With ``interval`` equal to the
    logger's interval the run stops at a logged step, so the logged training
    seconds end within half an interval of the budget.  Stopping sets
    ``runner.train_loop.stop_training`` (MMEngine's own flag, that of its
    ``EarlyStoppingHook``); the loop then ends after the current iteration
    and the hook runs the validation the loop would have run at its end, so
    every run ends validated.  One line is logged: the iterations run of the
    planned ones, and the seconds.

    Iteration-based loops only (``IterBasedTrainLoop``).  A resumed run
    starts its clock at zero (the budget is per process).

    Args:
        budget_s (float): Training seconds to spend.
        interval (int): Check every this many iterations. Defaults to 1.

    Example:
        >>> custom_hooks = [dict(type='TimeBudgetHook', budget_s=600.0,
        ...                      interval=50)]
    """

    priority = 'LOW'

    def __init__(self, budget_s: float, interval: int = 1) -> None:
        if not budget_s > 0:
            raise ValueError(f'budget_s must be > 0, got {budget_s}')
        if int(interval) != interval or interval < 1:
            raise ValueError(f'interval must be an integer >= 1, '
                             f'got {interval}')
        self.budget_s = float(budget_s)
        self.interval = int(interval)
        self.spent_s = 0.0
        self.iters = 0
        self.stopped = False
        self._t: Optional[float] = None

    def before_train(self, runner) -> None:
        if not isinstance(runner.train_loop, IterBasedTrainLoop):
            raise TypeError('TimeBudgetHook needs an IterBasedTrainLoop '
                            '(an epoch-based loop checks its stop flag only '
                            f'between epochs), got '
                            f'{type(runner.train_loop).__name__}')

    def before_train_epoch(self, runner) -> None:
        self._t = time.perf_counter()

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._t = time.perf_counter()  # validation is not training time

    def after_train_iter(self, runner, batch_idx: int, data_batch=None,
                         outputs=None) -> None:
        now = time.perf_counter()
        if self._t is not None:
            self.spent_s += now - self._t
        self._t = now
        self.iters += 1
        if self.stopped or (runner.iter + 1) % self.interval:
            return
        rate = self.spent_s / self.iters
        if self.spent_s + 0.5 * self.interval * rate >= self.budget_s:
            loop = runner.train_loop
            loop.stop_training = True
            self.stopped = True
            print_log(
                f'TimeBudgetHook: budget of {self.budget_s:.1f} s reached '
                f'after {runner.iter + 1} of {loop.max_iters} planned '
                f'iterations ({self.spent_s:.1f} s of training)',
                logger='current')

    def after_train_epoch(self, runner) -> None:
        """Validate a run the hook stopped, unless the loop just did."""
        loop = runner.train_loop
        if not self.stopped or getattr(runner, 'val_loop', None) is None:
            return
        n = runner.iter
        validated = n >= loop.val_begin and (
            n % loop.val_interval == 0 or n == loop.max_iters)
        if not validated:
            runner.val_loop.run()

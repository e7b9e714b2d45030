# Copyright (c) mmprecond contributors. All rights reserved.
"""Counting and once-only logging of numerical fallbacks."""
from collections import Counter
from typing import Dict

from mmengine.logging import print_log


class FallbackLog:
    """Counts fallback events by kind and logs the first of each kind.

    Every non-default path an optimizer takes (a Newton step that diverged, a
    failed ``eigh``, a layer left out, non-finite statistics) is recorded
    here, so nothing happens silently and a logger hook can read the totals
    from :attr:`counts`.

    Args:
        owner (str): Name used as a prefix in log messages.

    Example:
        >>> log = FallbackLog('NKFAC')
        >>> log.record('newton_fallback', 'residual grew')
        >>> log.counts['newton_fallback']
        1
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.counts: Dict[str, int] = Counter()

    def record(self, kind: str, message: str, n: int = 1) -> None:
        """Count ``n`` events of ``kind``; log ``message`` the first time."""
        first = self.counts[kind] == 0
        self.counts[kind] += n
        if first:
            print_log(
                f'[{self.owner}] {message} (first occurrence of '
                f"'{kind}'; later ones are only counted in "
                '`optimizer.fallbacks.counts`)',
                logger='current',
                level=30)

    def info(self, kind: str, message: str) -> None:
        """Log an informational ``message`` once per ``kind``."""
        if kind not in self.counts:
            self.counts[kind] = 0
            print_log(f'[{self.owner}] {message}', logger='current')

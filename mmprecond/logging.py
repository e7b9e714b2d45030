# Copyright (c) mmprecond contributors. All rights reserved.
"""Counting and once-only logging of numerical fallbacks."""
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import torch
from mmengine.logging import print_log
from torch import Tensor


class FallbackLog:
    """Counts fallback events by kind and logs the first of each kind.

    Every non-default path an optimizer takes (a Newton step that diverged, a
    failed ``eigh``, a layer left out, non-finite statistics) is recorded
    here, so nothing happens silently and a logger hook can read the totals
    from :attr:`counts`.

    Events decided on the host are counted at once with :meth:`record`.
    Events decided on the device (a non-finite preconditioned gradient, a
    non-finite statistic) are counted with :meth:`record_flags`, which only
    adds the per-item flags to a device tensor: the step that produced them
    never waits for the device.  They are read, added to :attr:`counts` and
    logged (naming the items concerned) when :attr:`counts` is next read.

    Args:
        owner (str): Name used as a prefix in log messages.

    Example:
        >>> import torch
        >>> log = FallbackLog('NKFAC')
        >>> log.record('newton_fallback', 'residual grew')  # doctest: +SKIP
        >>> log.counts['newton_fallback']  # doctest: +SKIP
        1
        >>> log.record_flags('nonfinite_direction', torch.tensor([False, True]),
        ...                  ('fc1', 'fc2'), 'not finite; raw gradient used')
        >>> log.counts['nonfinite_direction']  # read and logged now  # doctest: +SKIP
        1
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._counts: Dict[str, int] = Counter()
        # (kind, labels) -> [per-label int64 event counts on the device,
        # message]; read only by :attr:`counts`
        self._pending: Dict[Tuple[str, Tuple[str, ...]], List] = {}

    @property
    def counts(self) -> Dict[str, int]:
        """Event counts by kind (reads the device-side counters first)."""
        self._flush()
        return self._counts

    def record(self, kind: str, message: str, n: int = 1) -> None:
        """Count ``n`` events of ``kind``; log ``message`` the first time."""
        first = self._counts[kind] == 0
        self._counts[kind] += n
        if first:
            self._warn(kind, message)

    def record_flags(self, kind: str, flags: Tensor, labels: Sequence[str],
                     message: str) -> None:
        """Count, on the device, the items whose ``flags`` are set.

        Args:
            kind (str): Event kind.
            flags (Tensor): Boolean vector, one entry per item of ``labels``.
            labels (Sequence[str]): Names of the items (layers), used in the
                message when the counts are read.
            message (str): What happened to a flagged item.
        """
        key = (kind, tuple(labels))
        entry = self._pending.get(key)
        if entry is None:
            entry = self._pending[key] = [
                torch.zeros(len(key[1]), dtype=torch.int64,
                            device=flags.device), message
            ]
        entry[0].add_(flags)

    def _flush(self) -> None:
        pending, self._pending = self._pending, {}
        for (kind, labels), (per_item, message) in pending.items():
            per_item = per_item.tolist()  # the only device read
            total = sum(per_item)
            if total == 0:
                continue
            names = [n for n, c in zip(labels, per_item) if c]
            shown = ', '.join(names[:5]) + (', ...' if len(names) > 5 else '')
            self.record(kind, f'{message} ({total} time(s), in {shown})', total)

    def _warn(self, kind: str, message: str) -> None:
        print_log(
            f'[{self.owner}] {message} (first occurrence of '
            f"'{kind}'; later ones are only counted in "
            '`optimizer.fallbacks.counts`)',
            logger='current',
            level=30)

    def info(self, kind: str, message: str) -> None:
        """Log an informational ``message`` once per ``kind``."""
        if kind not in self._counts:
            self._counts[kind] = 0
            print_log(f'[{self.owner}] {message}', logger='current')

"""Problem reports that stay readable: one log line per cause, counters for the rest.

A damaged file or a buggy publisher repeats the same fault for every frame. Logging each one
buried the one line that mattered under hundreds of tracebacks; :class:`ProblemLog` logs the first
occurrence of each (scope, cause) at WARNING, counts the rest, and can summarise a scope (a run)
when it ends.
"""

from __future__ import annotations

import logging
import re
from collections import Counter, deque


class ProblemLog:
    """Counts problems by ``(scope, cause)``; logs each pair once.

    Parameters
    ----------
    logger
        Where the first occurrence of each cause goes.
    keep
        How many recent messages :attr:`recent` keeps (for reports and tests).
    max_scopes
        Scopes (runs) remembered; the oldest are forgotten so a long-lived listener stays small.
    """

    def __init__(self, logger: logging.Logger, *, keep: int = 1000, max_scopes: int = 256) -> None:
        self.log = logger
        self.recent: deque[str] = deque(maxlen=keep)
        self.total = 0
        self._counts: dict[str, Counter] = {}
        self._max_scopes = int(max_scopes)

    def report(self, scope: str, cause: str, message: str) -> bool:
        """Count one problem; returns True when it was logged (the cause's first time)."""
        self.total += 1
        self.recent.append(message)
        counts = self._counts.get(scope)
        if counts is None:
            counts = self._counts[scope] = Counter()
            while len(self._counts) > self._max_scopes:
                self._counts.pop(next(iter(self._counts)))
        counts[cause] += 1
        if counts[cause] == 1:
            self.log.warning("%s (further problems of this kind are counted, not logged)", message)
            return True
        return False

    def counts(self, scope: str) -> dict[str, int]:
        """``{cause: count}`` for one scope."""
        return dict(self._counts.get(scope, {}))

    def summarise(self, scope: str, *, forget: bool = True) -> dict[str, int]:
        """Log one summary line for a scope that saw repeated problems; return its counts."""
        counts = self._counts.pop(scope, Counter()) if forget else self._counts.get(scope, Counter())
        repeated = {cause: n for cause, n in counts.items() if n > 1}
        if repeated:
            self.log.warning("%s: %s", scope, "; ".join(f"{n} x {c}" for c, n in repeated.items()))
        return dict(counts)


_VARIABLE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"  # uids
    r"|'[^']*'|\"[^\"]*\"|[-+]?\d+(\.\d+)?(e[-+]?\d+)?"  # quoted values, numbers
)


def cause_of(message: str) -> str:
    """A message with its uids, quoted values and numbers blanked: what repeats is the cause."""
    return _VARIABLE.sub("#", message)[:160]

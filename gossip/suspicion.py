"""Lifeguard's dynamic suspicion timeout.

The timer starts long and shrinks as independent members confirm the suspicion, so a node that is
merely slow gets time to refute while a truly dead one is declared quickly once others agree.
"""

from __future__ import annotations

import math


class Suspicion:
    def __init__(self, from_: str, k: int, min_timeout: float, max_timeout: float, now: float):
        self.k = k
        self.min = min_timeout
        self.max = max_timeout
        self.start = now
        self.confirmations: set[str] = {from_}
        self.n = 0
        self.deadline = now + (max_timeout if k >= 1 else min_timeout)

    def confirm(self, from_: str) -> bool:
        """Count an independent confirmation; True when new (it should then be re-gossiped)."""
        if self.n >= self.k or from_ in self.confirmations:
            return False
        self.confirmations.add(from_)
        self.n += 1
        # A deadline already past fires on the next tick, as memberlist fires at once.
        self.deadline = self.start + remaining_timeout(self.n, self.k, self.min, self.max)
        return True


def remaining_timeout(n: int, k: int, min_timeout: float, max_timeout: float) -> float:
    """Total timeout after n of k expected confirmations (memberlist's remainingSuspicionTime)."""
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = max_timeout - frac * (max_timeout - min_timeout)
    timeout = math.floor(1000.0 * raw) / 1000.0
    return max(timeout, min_timeout)

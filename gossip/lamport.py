"""Lamport clocks, as Serf uses them to order intents, events and queries."""

from __future__ import annotations

MAX = 0xFFFFFFFFFFFFFFFF  # uint64 on the wire; wraps as Go's does


class LamportClock:
    def __init__(self) -> None:
        self.counter = 0

    def time(self) -> int:
        return self.counter

    def increment(self) -> int:
        self.counter = (self.counter + 1) & MAX
        return self.counter

    def witness(self, v: int) -> None:
        if v >= self.counter:
            self.counter = (v + 1) & MAX

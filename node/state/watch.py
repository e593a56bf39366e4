"""Waiting on table indexes, the primitive under blocking queries.

The store calls `notify(tables)` synchronously at the end of an apply; waiters on any of those
tables have their futures resolved right there, so they run in the next pass of the event loop.
`notify` must be called on the event loop's thread (the runtime applies committed entries on
the loop; a thread-pool applier would use `loop.call_soon_threadsafe(watch.notify, ...)`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable


class Watch:
    def __init__(self, index_of: Callable[[Iterable[str]], int]) -> None:
        self._index_of = index_of
        self._waiters: dict[str, set[asyncio.Future[None]]] = {}
        self._all: set[asyncio.Future[None]] = set()
        self.restores = 0

    async def wait(self, tables: Iterable[str], min_index: int, timeout: float) -> int:
        """Return the tables' index once it exceeds `min_index`, or the current one on timeout.

        Like Consul, a timeout is not an error: the caller answers with whatever is current.
        An empty `tables` waits on every table (any write).
        """
        names = frozenset(tables)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while True:
            current = self._index_of(names)
            if current > min_index:
                return current
            remaining = deadline - loop.time()
            if remaining <= 0:
                return current
            fut: asyncio.Future[None] = loop.create_future()
            if names:
                for t in names:
                    self._waiters.setdefault(t, set()).add(fut)
            else:
                self._all.add(fut)
            # A timer instead of wait_for: the waiter then resumes in the very next loop pass
            # after notify, with no intermediate wrapper task.
            timer = loop.call_later(remaining, _expire, fut)
            try:
                await fut
            finally:
                timer.cancel()
                self._forget(names, fut)

    def _forget(self, names: frozenset[str], fut: asyncio.Future[None]) -> None:
        self._all.discard(fut)
        for t in names:
            s = self._waiters.get(t)
            if s is not None:
                s.discard(fut)
                if not s:
                    del self._waiters[t]

    def notify(self, tables: Iterable[str]) -> None:
        """Wake the waiters of `tables` (and those waiting on everything)."""
        woken: set[asyncio.Future[None]] = set(self._all)
        for t in tables:
            woken.update(self._waiters.get(t, ()))
        for fut in woken:
            if not fut.done():
                fut.set_result(None)

    def notify_all(self) -> None:
        """A restore replaced the state: every waiter must re-run its query, and answer even
        if its result's index did not move (`restores` tells it so; Consul abandons every
        blocking query on a restore the same way)."""
        self.restores += 1
        self.notify(list(self._waiters))

    def waiting(self) -> int:
        """Number of pending waits (for tests and metrics)."""
        return len(self._all | {f for s in self._waiters.values() for f in s})


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)

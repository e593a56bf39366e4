"""Transmit-limited broadcast queue: each message is piggybacked a bounded number of times.

Messages sent fewest times first; a named message replaces a queued one with the same name (a
newer alive/suspect/dead about a node makes older news about it pointless).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass


@dataclass(slots=True)
class Broadcast:
    msg: bytes
    name: str | None
    transmits: int = 0
    id: int = 0


class BroadcastQueue:
    def __init__(self) -> None:
        self._items: dict[int, Broadcast] = {}
        self._by_name: dict[str, int] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._items)

    def queue(self, msg: bytes, name: str | None = None) -> None:
        if name is not None:
            old = self._by_name.pop(name, None)
            if old is not None:
                self._items.pop(old, None)
        b = Broadcast(msg=msg, name=name, id=next(self._ids))
        self._items[b.id] = b
        if name is not None:
            self._by_name[name] = b.id

    def has(self, name: str) -> bool:
        return name in self._by_name

    def get(self, overhead: int, limit: int, transmit_limit: int) -> list[bytes]:
        if not self._items:
            return []
        # fewest transmits first, then newest first (memberlist's ordering)
        order = sorted(self._items.values(), key=lambda b: (b.transmits, -b.id))
        out: list[bytes] = []
        used = 0
        for b in order:
            cost = overhead + len(b.msg)
            if used + cost > limit:
                continue
            used += cost
            out.append(b.msg)
            b.transmits += 1
            if b.transmits >= transmit_limit:
                self._remove(b)
            if limit - used <= overhead:
                break
        return out

    def _remove(self, b: Broadcast) -> None:
        self._items.pop(b.id, None)
        if b.name is not None and self._by_name.get(b.name) == b.id:
            del self._by_name[b.name]

    def reset(self) -> None:
        self._items.clear()
        self._by_name.clear()

"""Transmit-limited broadcast queue: each message is piggybacked a bounded number of times.

Messages sent fewest times first (newest first among equals); a named message replaces a queued
one with the same name (newer news about a node makes older news about it pointless). Items sit in
one bucket per transmit count, each kept ordered by age, so picking never sorts: gossip calls this
for every packet sent.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

MAX_MISSES = 8


@dataclass(slots=True)
class Broadcast:
    msg: bytes
    name: str | None
    id: int
    transmits: int = 0


class BroadcastQueue:
    def __init__(self) -> None:
        # bucket i: ids of the items sent i times, ascending (oldest first); items by id
        self._buckets: list[list[int]] = []
        self._items: dict[int, Broadcast] = {}
        self._by_name: dict[str, Broadcast] = {}
        self._count = 0
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return self._count

    def queue(self, msg: bytes, name: str | None = None) -> None:
        if name is not None:
            old = self._by_name.pop(name, None)
            if old is not None:
                self._remove(old)
        b = Broadcast(msg=msg, name=name, id=next(self._ids))
        self._bucket(0).append(b.id)  # ids only grow: appending keeps the order
        self._items[b.id] = b
        self._count += 1
        if name is not None:
            self._by_name[name] = b

    def has(self, name: str) -> bool:
        return name in self._by_name

    def get(
        self, overhead: int, limit: int, transmit_limit: int, first: str | None = None
    ) -> list[bytes]:
        """Messages for one packet; the one named `first`, if queued, goes in every packet."""
        if not self._count:
            return []
        out: list[bytes] = []
        picked: list[Broadcast] = []
        used = 0
        misses = 0  # stop scanning a long queue once the packet is nearly full
        head = self._by_name.get(first) if first is not None else None
        if head is not None and overhead + len(head.msg) <= limit:
            used = overhead + len(head.msg)
            picked.append(head)
            out.append(head.msg)
        for bucket in self._buckets:
            for bid in reversed(bucket):
                b = self._items[bid]
                if b is head:
                    continue
                cost = overhead + len(b.msg)
                if used + cost > limit:
                    misses += 1
                    if misses > MAX_MISSES:
                        break
                    continue
                used += cost
                picked.append(b)
                out.append(b.msg)
                if limit - used <= overhead:
                    break
            if limit - used <= overhead or misses > MAX_MISSES:
                break
        for b in picked:
            self._remove(b)
            b.transmits += 1
            if b.transmits < transmit_limit:
                bisect.insort(self._bucket(b.transmits), b.id)
                self._items[b.id] = b
                self._count += 1
            elif b.name is not None and self._by_name.get(b.name) is b:
                del self._by_name[b.name]
        return out

    def _bucket(self, i: int) -> list[int]:
        while len(self._buckets) <= i:
            self._buckets.append([])
        return self._buckets[i]

    def _remove(self, b: Broadcast) -> None:
        if self._items.pop(b.id, None) is None:
            return
        bucket = self._buckets[b.transmits]
        del bucket[bisect.bisect_left(bucket, b.id)]
        self._count -= 1

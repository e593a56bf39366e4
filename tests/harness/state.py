"""Drives a StateStore the way Raft would: commands at consecutive indexes."""

from __future__ import annotations

import msgpack

from node.state import StateStore


class StoreDriver:
    def __init__(self) -> None:
        self.store = StateStore()
        self.i = 0

    def apply(self, cmd: bytes) -> tuple[bool, object]:
        self.i += 1
        res = self.store.apply(self.i, cmd)
        return res.ok, (res.value if res.ok else res.error)

    def ok(self, cmd: bytes) -> object:
        good, v = self.apply(cmd)
        assert good, v
        return v

    def fails(self, cmd: bytes, text: str) -> None:
        """The command is rejected with `text` and leaves the stored data untouched."""
        before = stored_data(self.store)
        good, v = self.apply(cmd)
        assert not good and text in str(v), v
        assert stored_data(self.store) == before


def stored_data(store: StateStore) -> object:
    """Everything in the store but its index (a rejected command still advances that)."""
    obj = msgpack.unpackb(store.snapshot(), raw=False, strict_map_key=False)
    obj.pop("index")
    return obj

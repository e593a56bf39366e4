"""The KV table: Consul's set/cas/lock/unlock/delete semantics, tombstones and lock-delay.

Keys are kept in a sorted list beside the rows so prefix reads are a bisect, not a scan.
Deletes leave a tombstone (key -> index) so a prefix listing's index never slides backwards
until the leader reaps them, which is what lets blocking queries notice deletes.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NotRequired, TypedDict

from node.state.tables import MISSING, Env, JMap, OpError


class KVEntry(TypedDict):
    """Consul's DirEntry JSON shape; Value stays bytes (the HTTP layer base64s it)."""

    Key: str
    CreateIndex: int
    ModifyIndex: int
    LockIndex: int
    Flags: int
    Value: bytes | None
    Session: NotRequired[str]


@dataclass(frozen=True, slots=True)
class KVRow:
    key: str
    value: bytes
    flags: int
    session: str
    create_index: int
    modify_index: int
    lock_index: int

    def entry(self, with_value: bool = True) -> KVEntry:
        e: KVEntry = {
            "Key": self.key,
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
            "LockIndex": self.lock_index,
            "Flags": self.flags,
            "Value": self.value if with_value else None,
        }
        if self.session:
            e["Session"] = self.session
        return e

    def to_wire(self) -> list[Any]:
        return [
            self.key, self.value, self.flags, self.session,
            self.create_index, self.modify_index, self.lock_index,
        ]  # fmt: skip

    @classmethod
    def from_wire(cls, w: list[Any]) -> KVRow:
        return cls(str(w[0]), bytes(w[1]), int(w[2]), str(w[3]), int(w[4]), int(w[5]), int(w[6]))


def _prefix_end(keys: list[str], prefix: str) -> tuple[int, int]:
    lo = bisect.bisect_left(keys, prefix)
    if not prefix:
        return lo, len(keys)
    # Every key starting with `prefix` sorts before prefix + U+10FFFF.
    hi = bisect.bisect_left(keys, prefix + "\U0010ffff", lo)
    return lo, hi


class KVStore:
    TABLE = "kvs"
    TOMBSTONES = "tombstones"

    def __init__(self, env: Env, session_exists: Callable[[str], bool]) -> None:
        self.env = env
        self._session_exists = session_exists
        self._keys: list[str] = []
        self._by_session: dict[str, dict[str, None]] = {}
        self._tomb_keys: list[str] = []
        self.rows: JMap[str, KVRow] = JMap(env.journal, self._on_row)
        self.tombstones: JMap[str, int] = JMap(env.journal, self._on_tomb)
        self.lock_delays: JMap[str, float] = JMap(env.journal)

    # -- secondary indexes ----------------------------------------------------------------

    def _on_row(self, key: str, old: Any, new: Any) -> None:
        if old is MISSING and new is not MISSING:
            bisect.insort(self._keys, key)
        elif old is not MISSING and new is MISSING:
            i = bisect.bisect_left(self._keys, key)
            del self._keys[i]
        old_s = old.session if old is not MISSING else ""
        new_s = new.session if new is not MISSING else ""
        if old_s != new_s:
            if old_s:
                held = self._by_session[old_s]
                del held[key]
                if not held:
                    del self._by_session[old_s]
            if new_s:
                self._by_session.setdefault(new_s, {})[key] = None

    def _on_tomb(self, key: str, old: Any, new: Any) -> None:
        if old is MISSING and new is not MISSING:
            bisect.insort(self._tomb_keys, key)
        elif old is not MISSING and new is MISSING:
            del self._tomb_keys[bisect.bisect_left(self._tomb_keys, key)]

    # -- writes -----------------------------------------------------------------------------

    def _write(self, row: KVRow) -> KVRow:
        """Store a row at the current index unless nothing changed (Consul skips those)."""
        existing = self.rows.get(row.key)
        if existing is not None and (
            existing.value == row.value
            and existing.flags == row.flags
            and existing.session == row.session
            and existing.lock_index == row.lock_index
        ):
            return existing
        idx = self.env.index
        new = KVRow(
            row.key, row.value, row.flags, row.session,
            existing.create_index if existing is not None else idx, idx, row.lock_index,
        )  # fmt: skip
        self.rows.put(row.key, new)
        self.tombstones.delete(row.key)
        self.env.bump(self.TABLE)
        return new

    def set(self, key: str, value: bytes, flags: int) -> KVRow:
        """Plain PUT: overwrites even a locked key, keeps its Session and LockIndex."""
        existing = self.rows.get(key)
        session = existing.session if existing is not None else ""
        lock_index = existing.lock_index if existing is not None else 0
        return self._write(KVRow(key, value, flags, session, 0, 0, lock_index))

    def cas(self, key: str, value: bytes, flags: int, index: int) -> KVRow | None:
        existing = self.rows.get(key)
        if index == 0 and existing is not None:
            return None
        if index != 0 and (existing is None or existing.modify_index != index):
            return None
        return self.set(key, value, flags)

    def lock(self, key: str, value: bytes, flags: int, session: str) -> KVRow | None:
        """Acquire: None when another session holds it or lock-delay is running."""
        if not session:
            raise OpError("missing session")
        if not self._session_exists(session):
            raise OpError(f"invalid session {session!r}")
        until = self.lock_delays.get(key)
        if until is not None:
            if self.env.now < until:
                return None
            self.lock_delays.delete(key)  # expired: forget it so the map does not grow
        existing = self.rows.get(key)
        if existing is None:
            lock_index = 1
        elif existing.session == session:
            lock_index = existing.lock_index
        elif existing.session:
            return None
        else:
            lock_index = existing.lock_index + 1
        return self._write(KVRow(key, value, flags, session, 0, 0, lock_index))

    def unlock(self, key: str, value: bytes, flags: int, session: str) -> KVRow | None:
        if not session:
            raise OpError("missing session")
        existing = self.rows.get(key)
        if existing is None or existing.session != session:
            return None
        return self._write(KVRow(key, value, flags, "", 0, 0, existing.lock_index))

    def delete(self, key: str) -> None:
        if key not in self.rows:
            return
        self.rows.delete(key)
        self.tombstones.put(key, self.env.index)
        self.env.bump(self.TABLE)
        self.env.bump(self.TOMBSTONES)

    def delete_cas(self, key: str, index: int) -> bool:
        """Consul's rule: a missing key counts as deleted (true)."""
        existing = self.rows.get(key)
        if existing is None:
            return True
        if existing.modify_index != index:
            return False
        self.delete(key)
        return True

    def delete_tree(self, prefix: str) -> None:
        lo, hi = _prefix_end(self._keys, prefix)
        for key in self._keys[lo:hi]:  # a copy: delete() edits the list
            self.delete(key)

    def reap_tombstones(self, index: int) -> int:
        doomed = [k for k in self._tomb_keys if (self.tombstones.get(k) or 0) <= index]
        for k in doomed:
            self.tombstones.delete(k)
        if doomed:
            self.env.bump(self.TOMBSTONES)
        return len(doomed)

    def release_session(self, session: str, delete: bool, lock_delay_s: float) -> None:
        """A session ended: release or delete its keys, and start their lock-delay."""
        for key in sorted(self._by_session.get(session, {})):
            row = self.rows.get(key)
            assert row is not None
            if delete:
                self.delete(key)
            else:
                self._write(KVRow(key, row.value, row.flags, "", 0, 0, row.lock_index))
            if lock_delay_s > 0:
                self.lock_delays.put(key, self.env.now + lock_delay_s)

    # -- reads ------------------------------------------------------------------------------

    def get(self, key: str) -> KVEntry | None:
        row = self.rows.get(key)
        return None if row is None else row.entry()

    def row(self, key: str) -> KVRow | None:
        return self.rows.get(key)

    def list_prefix(self, prefix: str = "") -> list[KVEntry]:
        lo, hi = _prefix_end(self._keys, prefix)
        out = []
        for k in self._keys[lo:hi]:
            row = self.rows.get(k)
            assert row is not None
            out.append(row.entry())
        return out

    def keys(self, prefix: str = "", separator: str = "") -> list[str]:
        """Key names under `prefix`, collapsed at the first `separator` after it (?keys)."""
        lo, hi = _prefix_end(self._keys, prefix)
        if not separator:
            return self._keys[lo:hi]
        out: list[str] = []
        plen = len(prefix)
        for k in self._keys[lo:hi]:
            j = k.find(separator, plen)
            name = k if j < 0 else k[: j + len(separator)]
            if not out or out[-1] != name:
                out.append(name)
        return out

    def max_index(self) -> int:
        """Index of a single-key read (Consul's kvsMaxIndex: kvs and tombstones tables)."""
        return max(self.env.table_index(self.TABLE), self.env.table_index(self.TOMBSTONES))

    def list_index(self, prefix: str = "") -> int:
        """Index of a prefix read: the highest ModifyIndex or tombstone under the prefix."""
        if not prefix:
            return self.max_index()
        best = 0
        lo, hi = _prefix_end(self._keys, prefix)
        for k in self._keys[lo:hi]:
            row = self.rows.get(k)
            assert row is not None
            best = max(best, row.modify_index)
        lo, hi = _prefix_end(self._tomb_keys, prefix)
        for k in self._tomb_keys[lo:hi]:
            best = max(best, self.tombstones.get(k) or 0)
        return best or self.max_index()

    def lock_delay_until(self, key: str) -> float:
        """Wall-clock second until which `key` cannot be acquired (0 if none)."""
        return self.lock_delays.get(key) or 0.0

    def held_by(self, session: str) -> list[str]:
        return sorted(self._by_session.get(session, {}))

    # -- snapshot ---------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {
            "rows": [self.rows.get(k).to_wire() for k in self._keys],  # type: ignore[union-attr]
            "tombstones": [[k, self.tombstones.get(k)] for k in self._tomb_keys],
            "lock_delays": [[k, self.lock_delays.get(k)] for k in sorted(self.lock_delays)],
        }

    def load(self, obj: dict[str, Any]) -> None:
        self._keys = []
        self._by_session = {}
        self._tomb_keys = []
        rows = [KVRow.from_wire(w) for w in obj["rows"]]
        self.rows.load({r.key: r for r in rows})
        self.tombstones.load({str(k): int(v) for k, v in obj["tombstones"]})
        self.lock_delays.load({str(k): float(v) for k, v in obj["lock_delays"]})

"""Building blocks shared by every table of the state store, plus the generic id-keyed tables.

Every mutation goes through a `JMap`, which records the previous value in the apply's `Journal`;
a failed command or a rolled-back transaction replays the journal backwards, so a bad command
never leaves partial writes behind. Secondary indexes are kept by change hooks, which the undo
path calls as well, so they can never drift from the rows.

The generic tables (`ca_roots`, `ca_config`, `intentions`) hold Consul-shaped maps keyed by an
id, so the CA and intentions work can land later without touching the apply machinery.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class _Missing:
    """Marks "no row" in the journal (None can be a legitimate row value)."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Journal:
    """Undo log of one apply; empty between applies."""

    def __init__(self) -> None:
        self.entries: list[tuple[JMap[Any, Any], Any, Any]] = []

    def mark(self) -> int:
        return len(self.entries)

    def rollback(self, mark: int = 0) -> None:
        while len(self.entries) > mark:
            jmap, key, old = self.entries.pop()
            jmap.restore_raw(key, old)

    def clear(self) -> None:
        self.entries.clear()


Hook = Callable[[Any, Any, Any], None]  # (key, old | MISSING, new | MISSING)


class JMap(Generic[K, V]):
    """A dict whose writes are journaled and reported to a hook (for secondary indexes).

    Rows must be treated as immutable: replace them, never mutate them in place, or the
    journal cannot undo the change.
    """

    __slots__ = ("_d", "_hook", "_journal")

    def __init__(self, journal: Journal, hook: Hook | None = None) -> None:
        self._d: dict[K, V] = {}
        self._journal = journal
        self._hook = hook

    def get(self, key: K) -> V | None:
        return self._d.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self) -> Iterator[K]:
        return iter(self._d)

    def items(self) -> Iterator[tuple[K, V]]:
        return iter(self._d.items())

    def put(self, key: K, value: V) -> None:
        old = self._d.get(key, MISSING)
        self._journal.entries.append((self, key, old))
        self._d[key] = value
        if self._hook is not None:
            self._hook(key, old, value)

    def delete(self, key: K) -> None:
        if key not in self._d:
            return
        old = self._d.pop(key)
        self._journal.entries.append((self, key, old))
        if self._hook is not None:
            self._hook(key, old, MISSING)

    def restore_raw(self, key: K, old: Any) -> None:
        """Undo one journaled write (no journaling, hook still runs)."""
        cur = self._d.get(key, MISSING)
        if old is MISSING:
            self._d.pop(key, None)
        else:
            self._d[key] = old
        if self._hook is not None:
            self._hook(key, cur, old)

    def load(self, rows: dict[K, V]) -> None:
        """Replace everything (snapshot restore): not journaled, the hook sees each insert."""
        self._d = {}
        for k, v in rows.items():
            self._d[k] = v
            if self._hook is not None:
                self._hook(k, MISSING, v)


class Env:
    """What the tables share during an apply: the index being applied, the proposer's clock,
    the table indexes and the set of tables touched (to wake watchers)."""

    def __init__(self) -> None:
        self.journal = Journal()
        self.index = 0  # the Raft index being applied
        self.now = 0.0  # wall-clock seconds from the command (never read from a clock here)
        self.table_indexes: JMap[str, int] = JMap(self.journal)
        self.touched: set[str] = set()

    def bump(self, table: str) -> None:
        """Record a write to `table` at the current index (table indexes only move forward)."""
        if self.table_index(table) < self.index:
            self.table_indexes.put(table, self.index)
        self.touched.add(table)

    def drop(self, table: str) -> None:
        """Forget `table`'s index (a per-service index whose last instance went), still waking
        its watchers: they re-read and find whatever index now stands in for it."""
        self.table_indexes.delete(table)
        self.touched.add(table)

    def table_index(self, table: str) -> int:
        return self.table_indexes.get(table) or 0


class OpError(Exception):
    """A command that must fail as a whole; `kind` maps to an HTTP status later."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


def clone(value: Any) -> Any:
    """Copy a JSON-like value so readers cannot mutate stored rows."""
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clone(v) for v in value]
    if isinstance(value, (str, int, float, bool, bytes)) or value is None:
        return value
    return copy.deepcopy(value)


GENERIC_TABLES: tuple[str, ...] = ("ca_roots", "ca_config", "intentions")


class GenericTables:
    """Id-keyed tables of Consul-shaped maps with CreateIndex/ModifyIndex and CAS."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.rows: dict[str, JMap[str, dict[str, Any]]] = {
            name: JMap(env.journal) for name in GENERIC_TABLES
        }

    def _table(self, table: str) -> JMap[str, dict[str, Any]]:
        t = self.rows.get(table)
        if t is None:
            raise OpError(f"unknown table {table!r} (known: {', '.join(GENERIC_TABLES)})")
        return t

    def upsert(self, table: str, row_id: str, value: dict[str, Any], cas: int | None) -> bool:
        """Set a row; with `cas`, only if its ModifyIndex matches (0 = only if absent)."""
        t = self._table(table)
        existing = t.get(row_id)
        if cas is not None:
            if cas == 0 and existing is not None:
                return False
            if cas != 0 and (existing is None or existing["ModifyIndex"] != cas):
                return False
        row = dict(value)
        row["CreateIndex"] = existing["CreateIndex"] if existing is not None else self.env.index
        row["ModifyIndex"] = self.env.index
        t.put(row_id, row)
        self.env.bump(table)
        return True

    def delete(self, table: str, row_id: str, cas: int | None) -> bool:
        """Delete a row; with `cas`, only if its ModifyIndex matches."""
        t = self._table(table)
        existing = t.get(row_id)
        if existing is None:
            return cas is None or cas == 0
        if cas is not None and existing["ModifyIndex"] != cas:
            return False
        t.delete(row_id)
        self.env.bump(table)
        return True

    # -- reads ---------------------------------------------------------------------------

    def get(self, table: str, row_id: str) -> dict[str, Any] | None:
        row = self._table(table).get(row_id)
        return None if row is None else dict(clone(row))

    def list_rows(self, table: str) -> list[dict[str, Any]]:
        t = self._table(table)
        return [clone(t.get(k)) for k in sorted(t)]

    # -- snapshot ------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {name: [[k, t.get(k)] for k in sorted(t)] for name, t in self.rows.items()}

    def load(self, obj: dict[str, Any]) -> None:
        for name, t in self.rows.items():
            t.load({str(k): v for k, v in obj.get(name, [])})

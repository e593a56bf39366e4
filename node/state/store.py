"""The replicated state machine Raft applies: dispatch, atomicity, snapshot and restore.

`apply` is pure and deterministic: no clock, no I/O, no iteration over unordered sets. Each
apply runs against a journal; any error (a malformed command, a failed check, a transaction
whose ops fail) rolls every write of that entry back, so replicas agree and nothing partial
is ever visible. The Raft index always advances, even for a rejected command.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from node.golang import quote
from node.raft.types import Entry, EntryType
from node.state.catalog import SERVICE_INDEX_PREFIX, Catalog
from node.state.commands import Command, CommandError, decode
from node.state.kv import KVEntry, KVRow, KVStore
from node.state.sessions import SessionStore
from node.state.tables import Env, GenericTables, OpError
from node.state.watch import Watch

SNAPSHOT_VERSION = 1


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What apply returns to the proposer (through the runtime's future for that index).

    `kind` classifies errors for the HTTP layer: "invalid" (400/500), "too_large" (413),
    "conflict" (a rolled-back txn, 409; `value` then holds Consul's {"Results","Errors"}),
    "internal" (a bug; the entry is still rejected identically on every replica).
    """

    value: Any = None
    error: str | None = None
    kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_wire(self) -> list[Any]:
        """For a write forwarded from a follower: the leader sends the result back."""
        return [self.value, self.error, self.kind]

    @classmethod
    def from_wire(cls, w: Any) -> ApplyResult:
        if not isinstance(w, list) or len(w) != 3:
            raise ValueError("apply result must be [value, error, kind]")
        return cls(w[0], w[1], w[2])


class _Parts:
    """One complete state (swapped wholesale by restore)."""

    def __init__(self) -> None:
        self.env = Env()
        self.kv = KVStore(self.env, lambda sid: self.sessions.exists(sid))
        self.catalog = Catalog(
            self.env,
            invalidate_node=lambda n: self.sessions.invalidate_for_node(n),
            invalidate_check=lambda n, c: self.sessions.invalidate_for_check(n, c),
        )
        self.sessions = SessionStore(
            self.env, self.kv, self.catalog.node_exists, self.catalog.check_status
        )
        self.tables = GenericTables(self.env)


class StateStore:
    def __init__(self, notify: Callable[[frozenset[str]], None] | None = None) -> None:
        """`notify` overrides the default hook (waking `self.watch`) after each apply."""
        self._p = _Parts()
        self._index = 0
        self.watch = Watch(self.table_index)
        self._notify = notify if notify is not None else self.watch.notify

    # -- views --------------------------------------------------------------------------------

    @property
    def index(self) -> int:
        """Last applied Raft index (commands, no-ops and rejected commands alike)."""
        return self._index

    @property
    def kv(self) -> KVStore:
        return self._p.kv

    @property
    def catalog(self) -> Catalog:
        return self._p.catalog

    @property
    def sessions(self) -> SessionStore:
        return self._p.sessions

    @property
    def tables(self) -> GenericTables:
        return self._p.tables

    def table_index(self, tables: str | Iterable[str] = ()) -> int:
        """Max index of the named tables (all tables when none are named). O(len(tables)).

        "service.<name>" is a pseudo-table: the catalog's index for that service (Consul's
        maxIndexForService), so a blocking read of one service waits only on writes to it.
        """
        env = self._p.env
        if isinstance(tables, str):
            return self._one_index(tables)
        names = list(tables)
        if not names:
            return max((v for _, v in env.table_indexes.items()), default=0)
        return max(self._one_index(t) for t in names)

    def _one_index(self, table: str) -> int:
        if table.startswith(SERVICE_INDEX_PREFIX):
            return self._p.catalog.service_index(table[len(SERVICE_INDEX_PREFIX) :])
        return self._p.env.table_index(table)

    # -- apply --------------------------------------------------------------------------------

    def apply_noop(self, index: int) -> None:
        """CONFIG and NOOP entries: nothing to do but they are applied too."""
        self._advance(index)

    def apply_entry(self, entry: Entry) -> ApplyResult | None:
        """Apply one committed Raft entry; None for CONFIG/NOOP entries (no result to return)."""
        if entry.type == EntryType.NORMAL:
            return self.apply(entry.index, entry.data)
        self.apply_noop(entry.index)
        return None

    def apply(self, index: int, command: bytes) -> ApplyResult:
        """Apply one committed command. Never raises for a bad command."""
        self._check_index(index)
        env = self._p.env
        env.index = index
        env.now = 0.0
        env.touched = set()
        env.journal.clear()
        try:
            cmd = decode(command)
            if cmd.op == "state_restore":
                return self._restore_at(index, cmd.args["snapshot"])
            env.now = cmd.now
            result = self._dispatch(cmd)
        except CommandError as e:
            result = ApplyResult(error=str(e), kind=e.kind)
        except OpError as e:
            result = ApplyResult(error=str(e), kind=e.kind)
        except Exception as e:  # a bug must not split replicas: reject the entry everywhere
            result = ApplyResult(error=f"internal error: {type(e).__name__}: {e}", kind="internal")
        if not result.ok:
            env.journal.rollback()
            env.touched = set()
        env.journal.clear()
        self._index = index
        touched = frozenset(env.touched)
        env.touched = set()
        if touched:
            self._notify(touched)
        return result

    def _restore_at(self, index: int, snapshot: bytes) -> ApplyResult:
        """Restore, then move every table's index to this entry's so blocking readers wake."""
        try:
            self.restore(snapshot)
        except ValueError as e:
            self._index = index
            return ApplyResult(error=str(e), kind="invalid")
        env = self._p.env
        env.index = index
        for table in list(env.table_indexes):
            env.table_indexes.put(table, index)
        env.journal.clear()
        self._index = index
        self.watch.notify_all()
        return ApplyResult(True)

    def _check_index(self, index: int) -> None:
        if index <= self._index:
            raise ValueError(f"apply index {index} is not after the last applied {self._index}")

    def _advance(self, index: int) -> None:
        self._check_index(index)
        self._index = index

    def _dispatch(self, cmd: Command) -> ApplyResult:
        a = cmd.args
        p = self._p
        op = cmd.op
        if op == "kv_set":
            p.kv.set(a["key"], a["value"], a["flags"])
            return ApplyResult(True)
        if op == "kv_cas":
            return ApplyResult(p.kv.cas(a["key"], a["value"], a["flags"], a["index"]) is not None)
        if op == "kv_lock":
            row = p.kv.lock(a["key"], a["value"], a["flags"], a["session"])
            return ApplyResult(row is not None)
        if op == "kv_unlock":
            row = p.kv.unlock(a["key"], a["value"], a["flags"], a["session"])
            return ApplyResult(row is not None)
        if op == "kv_delete":
            p.kv.delete(a["key"])
            return ApplyResult(True)
        if op == "kv_delete_cas":
            return ApplyResult(p.kv.delete_cas(a["key"], a["index"]))
        if op == "kv_delete_tree":
            p.kv.delete_tree(a["prefix"])
            return ApplyResult(True)
        if op == "tombstone_reap":
            return ApplyResult(p.kv.reap_tombstones(a["index"]))
        if op == "txn":
            return self._txn(a["ops"])
        if op == "session_create":
            return ApplyResult(p.sessions.create(a))
        if op == "session_destroy":
            p.sessions.destroy(a["id"])
            return ApplyResult(True)
        if op == "register":
            p.catalog.register(a["node"], a["service"], a["checks"])
            return ApplyResult(True)
        if op == "deregister":
            p.catalog.deregister(a["node"], a["service_id"], a["check_id"])
            return ApplyResult(True)
        if op == "table_upsert":
            return ApplyResult(p.tables.upsert(a["table"], a["id"], a["value"], a["cas"]))
        if op == "table_delete":
            return ApplyResult(p.tables.delete(a["table"], a["id"], a["cas"]))
        raise CommandError(f"unknown command op {op!r}")  # decode() already refuses these

    # -- transactions -------------------------------------------------------------------------

    def _txn(self, ops: list[dict[str, Any]]) -> ApplyResult:
        """Consul's /v1/txn: run every op, collect per-op errors, roll back if any failed."""
        results: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for i, op in enumerate(ops):
            try:
                kind = op["kind"]
                if kind == "kv":
                    results.extend({"KV": e} for e in self._txn_kv(op))
                elif kind == "table":
                    results.extend({"Table": r} for r in self._txn_table(op))
                elif kind == "session":
                    self._p.sessions.destroy(op["id"])
                else:
                    results.extend(self._txn_catalog(op))
            except OpError as e:
                errors.append({"OpIndex": i, "What": str(e)})
        if errors:
            value = {"Results": None, "Errors": errors}
            return ApplyResult(value, error="transaction rolled back", kind="conflict")
        return ApplyResult({"Results": results or None, "Errors": None})

    def _txn_kv(self, op: dict[str, Any]) -> list[KVEntry]:
        kv = self._p.kv
        verb, key = op["verb"], op["key"]
        row: KVRow | None
        if verb == "set":
            return [kv.set(key, op["value"], op["flags"]).entry(with_value=False)]
        if verb == "cas":
            row = kv.cas(key, op["value"], op["flags"], op["index"])
            if row is None:
                raise OpError(f"failed to set key {quote(key)}, index is stale")
            return [row.entry(with_value=False)]
        if verb == "lock":
            row = kv.lock(key, op["value"], op["flags"], op["session"])
            if row is None:
                raise OpError(f"failed to lock key {quote(key)}, lock is already held")
            return [row.entry(with_value=False)]
        if verb == "unlock":
            row = kv.unlock(key, op["value"], op["flags"], op["session"])
            if row is None:
                raise OpError(
                    f"failed to unlock key {quote(key)}, lock isn't held, or is held by another "
                    "session"
                )
            return [row.entry(with_value=False)]
        if verb in ("get", "get-or-empty"):
            row = kv.row(key)
            if row is None:
                if verb == "get":
                    raise OpError(f"key {quote(key)} doesn't exist")
                return [KVRow(key, b"", 0, "", 0, 0, 0).entry(with_value=False)]
            return [row.entry()]
        if verb == "get-tree":
            return kv.list_prefix(key)
        if verb == "check-index":
            row = kv.row(key)
            if row is None:
                raise OpError(f"failed to check index, key {quote(key)} doesn't exist")
            if row.modify_index != op["index"]:
                raise OpError(
                    f"failed index check for key {quote(key)}, current modify index "
                    f"{row.modify_index} != {op['index']}"
                )
            return [row.entry(with_value=False)]
        if verb == "check-session":
            row = kv.row(key)
            if row is None:
                raise OpError(f"failed to check session, key {quote(key)} doesn't exist")
            if row.session != op["session"]:
                raise OpError(
                    f"failed session check for key {quote(key)}, current session "
                    f"{quote(row.session)} != {quote(op['session'])}"
                )
            return [row.entry(with_value=False)]
        if verb == "check-not-exists":
            if kv.row(key) is not None:
                raise OpError(f"failed to check not exists, key {quote(key)} exists")
            return []
        if verb == "delete":
            kv.delete(key)
            return []
        if verb == "delete-tree":
            kv.delete_tree(key)
            return []
        if verb == "delete-cas":
            if not kv.delete_cas(key, op["index"]):
                raise OpError(f"failed to delete key {quote(key)}, index is stale")
            return []
        raise OpError(f"unknown KV verb {quote(verb)}")

    def _txn_catalog(self, op: dict[str, Any]) -> list[dict[str, Any]]:
        """Node/Service/Check verbs with Consul's results and error texts."""
        cg = self._p.catalog
        kind, verb, index = op["kind"], op["verb"], op["index"]
        if kind == "node":
            name = op["name"]
            if op["node"] is not None and op["node"]["Node"] != name:
                raise OpError(f"node name {quote(op['node']['Node'])} != {quote(name)}")
            if verb == "set":
                cg.ensure_node(op["node"])
            elif verb == "cas" and not cg.cas_node(op["node"], index):
                raise OpError(f"failed to set node {quote(name)}, index is stale")
            elif verb == "delete":
                cg.delete_node(name)
            elif verb == "delete-cas" and not cg.delete_node_cas(name, index):
                raise OpError(f"failed to delete node {quote(name)}, index is stale")
            if verb.startswith("delete"):
                return []
            row = cg.node(name)
            if row is None:
                raise OpError(f"node {quote(name)} doesn't exist")
            return [{"Node": row}]
        node, oid = op["node"], op["id"]
        if kind == "service":
            svc = op["service"]
            if svc is not None and (svc["ID"] or svc["Service"]) != oid:
                raise OpError(f"service ID {quote(svc['ID'] or svc['Service'])} != {quote(oid)}")
            if verb == "set":
                cg.ensure_service(node, svc)
            elif verb == "cas" and not cg.cas_service(node, svc, index):
                raise OpError(f"failed to set service {quote(oid)} on node {quote(node)}, "
                              "index is stale")
            elif verb == "delete":
                cg.delete_service(node, oid)
            elif verb == "delete-cas" and not cg.delete_service_cas(node, oid, index):
                raise OpError(
                    f"failed to delete service {quote(oid)} on node {quote(node)}, index is stale"
                )
            if verb.startswith("delete"):
                return []
            row = cg.service(node, oid)
            if row is None:
                raise OpError(f"service {quote(oid)} on node {quote(node)} doesn't exist")
            return [{"Service": row}]
        chk = op["check"]
        if chk is not None and chk["CheckID"] != oid:
            raise OpError(f"check ID {quote(chk['CheckID'])} != {quote(oid)}")
        if verb == "set":
            cg.ensure_check(node, chk)
        elif verb == "cas" and not cg.cas_check(node, chk, index):
            raise OpError(f"failed to set check {quote(oid)} on node {quote(node)}, index is stale")
        elif verb == "delete":
            cg.delete_check(node, oid)
        elif verb == "delete-cas" and not cg.delete_check_cas(node, oid, index):
            raise OpError(f"failed to delete check {quote(oid)} on node {quote(node)}, "
                          "index is stale")
        if verb.startswith("delete"):
            return []
        row = cg.check(node, oid)
        if row is None:
            raise OpError(f"check {quote(oid)} on node {quote(node)} doesn't exist")
        return [{"Check": row}]

    def _txn_table(self, op: dict[str, Any]) -> list[dict[str, Any]]:
        tables = self._p.tables
        verb, table, row_id = op["verb"], op["table"], op["id"]

        def result() -> list[dict[str, Any]]:
            return [{"Table": table, "ID": row_id, "Value": tables.get(table, row_id)}]

        if verb in ("set", "cas"):
            cas = op["index"] if verb == "cas" else None
            if not tables.upsert(table, row_id, op["value"], cas):
                raise OpError(f"failed to set {table} {quote(row_id)}, index is stale")
            return result()
        if verb == "get":
            if tables.get(table, row_id) is None:
                raise OpError(f"{table} {quote(row_id)} doesn't exist")
            return result()
        if verb in ("delete", "delete-cas"):
            cas = op["index"] if verb == "delete-cas" else None
            if not tables.delete(table, row_id, cas):
                raise OpError(f"failed to delete {table} {quote(row_id)}, index is stale")
            return []
        raise OpError(f"unknown table verb {quote(verb)}")

    # -- snapshot -----------------------------------------------------------------------------

    @staticmethod
    def result_to_wire(result: Any) -> Any:
        return result.to_wire() if isinstance(result, ApplyResult) else None

    @staticmethod
    def result_from_wire(wire: Any) -> ApplyResult:
        return ApplyResult.from_wire(wire)

    def snapshot(self) -> bytes:
        """The whole state plus its index; identical states give identical bytes."""
        p = self._p
        obj = {
            "version": SNAPSHOT_VERSION,
            "index": self._index,
            "table_indexes": [[t, p.env.table_index(t)] for t in sorted(p.env.table_indexes)],
            "kv": p.kv.dump(),
            "sessions": p.sessions.dump(),
            "catalog": p.catalog.dump(),
            "tables": p.tables.dump(),
        }
        data: bytes = msgpack.packb(obj, use_bin_type=True)
        return data

    def restore(self, data: bytes) -> None:
        """Replace everything with a snapshot; on a bad snapshot the old state stays intact."""
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
            if not isinstance(obj, dict) or obj.get("version") != SNAPSHOT_VERSION:
                raise ValueError(f"unsupported snapshot version {obj.get('version')!r}")
            fresh = _Parts()
            fresh.env.table_indexes.load({str(t): int(i) for t, i in obj["table_indexes"]})
            fresh.kv.load(obj["kv"])
            fresh.sessions.load(obj["sessions"])
            fresh.catalog.load(obj["catalog"])
            fresh.tables.load(obj["tables"])
            index = int(obj["index"])
        except Exception as e:
            raise ValueError(f"corrupt state snapshot: {type(e).__name__}: {e}") from None
        self._p = fresh
        self._index = index
        self.watch.notify_all()

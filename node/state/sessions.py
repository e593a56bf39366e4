"""Sessions: creation checks, destroy (release or delete held keys, start lock-delay), and the
indexes the leader needs to decide invalidations.

The state machine never invalidates by itself on time: TTL expiry is the leader's decision and
arrives as a destroy command. Catalog changes that Consul treats as invalidations (a node
deregistered, a linked check deleted or turned critical) happen inside the same apply, because
they are deterministic functions of the command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypedDict

from node.golang import parse_duration
from node.state.commands import is_uuid
from node.state.kv import KVStore
from node.state.tables import MISSING, Env, JMap, OpError

SESSION_TTL_MIN_S = 10.0
SESSION_TTL_MAX_S = 86400.0

class SessionJSON(TypedDict):
    ID: str
    Name: str
    Node: str
    LockDelay: int  # nanoseconds, as Consul serializes it
    Behavior: str
    TTL: str
    NodeChecks: list[str]
    ServiceChecks: list[dict[str, str]]
    CreateIndex: int
    ModifyIndex: int


class SessionStore:
    TABLE = "sessions"

    def __init__(
        self,
        env: Env,
        kv: KVStore,
        node_exists: Callable[[str], bool],
        check_status: Callable[[str, str], str | None],
    ) -> None:
        self.env = env
        self.kv = kv
        self._node_exists = node_exists
        self._check_status = check_status
        self._by_node: dict[str, dict[str, None]] = {}
        self._by_check: dict[tuple[str, str], dict[str, None]] = {}
        self.rows: JMap[str, SessionJSON] = JMap(env.journal, self._on_row)

    def _on_row(self, sid: str, old: Any, new: Any) -> None:
        for row, add in ((old, False), (new, True)):
            if row is MISSING:
                continue
            links = [(row["Node"], c) for c in row["NodeChecks"]]
            links += [(row["Node"], c["ID"]) for c in row["ServiceChecks"]]
            if add:
                self._by_node.setdefault(row["Node"], {})[sid] = None
                for link in links:
                    self._by_check.setdefault(link, {})[sid] = None
            else:
                _discard(self._by_node, row["Node"], sid)
                for link in links:
                    _discard(self._by_check, link, sid)

    def exists(self, sid: str) -> bool:
        return sid in self.rows

    def create(self, args: dict[str, Any]) -> str:
        sid: str = args["id"]
        if not is_uuid(sid):
            raise OpError(f"Session ID {sid!r} is not a UUID")
        if sid in self.rows:
            raise OpError(f"Session {sid!r} already exists")
        ttl: str = args["ttl"]
        if ttl:
            try:
                secs = parse_duration(ttl)
            except ValueError as e:
                raise OpError(f"Session TTL: {e}") from None
            if not SESSION_TTL_MIN_S <= secs <= SESSION_TTL_MAX_S:
                raise OpError(
                    f"Invalid Session TTL {ttl!r}, must be between "
                    f"{SESSION_TTL_MIN_S:g}s and {SESSION_TTL_MAX_S:g}s"
                )
        node: str = args["node"]
        if not self._node_exists(node):
            raise OpError(f"Missing node registration {node!r}")
        for check in [*args["node_checks"], *args["service_checks"]]:
            status = self._check_status(node, check)
            if status is None:
                raise OpError(f"Missing check {check!r} registration")
            if status == "critical":
                raise OpError(f"Check {check!r} is in critical state")
        row: SessionJSON = {
            "ID": sid,
            "Name": args["name"],
            "Node": node,
            "LockDelay": args["lock_delay"],
            "Behavior": args["behavior"],
            "TTL": ttl,
            "NodeChecks": list(args["node_checks"]),
            "ServiceChecks": [{"ID": c, "Namespace": ""} for c in args["service_checks"]],
            "CreateIndex": self.env.index,
            "ModifyIndex": self.env.index,
        }
        self.rows.put(sid, row)
        self.env.bump(self.TABLE)
        return sid

    def destroy(self, sid: str) -> bool:
        """Idempotent (destroying an unknown session is fine, as in Consul)."""
        row = self.rows.get(sid)
        if row is None:
            return False
        self.kv.release_session(sid, row["Behavior"] == "delete", row["LockDelay"] / 1e9)
        self.rows.delete(sid)
        self.env.bump(self.TABLE)
        return True

    def invalidate_for_node(self, node: str) -> None:
        for sid in self.sessions_to_invalidate_for_node(node):
            self.destroy(sid)

    def invalidate_for_check(self, node: str, check_id: str) -> None:
        for sid in self.sessions_to_invalidate_for_check(node, check_id):
            self.destroy(sid)

    # -- reads ------------------------------------------------------------------------------

    def sessions_to_invalidate_for_node(self, node: str) -> list[str]:
        """Sessions tied to `node` (the leader destroys them when the node fails/leaves)."""
        return sorted(self._by_node.get(node, {}))

    def sessions_to_invalidate_for_check(self, node: str, check_id: str) -> list[str]:
        """Sessions linked to a node or service check (destroyed when it goes critical)."""
        return sorted(self._by_check.get((node, check_id), {}))

    def get(self, sid: str) -> SessionJSON | None:
        row = self.rows.get(sid)
        return None if row is None else _copy(row)

    def list_all(self) -> list[SessionJSON]:
        return [_copy(self.rows.get(s)) for s in sorted(self.rows)]  # type: ignore[arg-type]

    def for_node(self, node: str) -> list[SessionJSON]:
        return [_copy(self.rows.get(s)) for s in sorted(self._by_node.get(node, {}))]  # type: ignore[arg-type]

    def with_ttl(self) -> list[tuple[str, float]]:
        """(id, TTL seconds) of every TTL session, so a new leader can (re)arm its timers."""
        return [(s, parse_duration(r["TTL"])) for s, r in sorted(self.rows.items()) if r["TTL"]]

    # -- snapshot ---------------------------------------------------------------------------

    def dump(self) -> list[Any]:
        return [self.rows.get(s) for s in sorted(self.rows)]

    def load(self, rows: list[Any]) -> None:
        self._by_node = {}
        self._by_check = {}
        self.rows.load({str(r["ID"]): r for r in rows})


def _copy(row: SessionJSON) -> SessionJSON:
    out = dict(row)
    out["NodeChecks"] = list(row["NodeChecks"])
    out["ServiceChecks"] = [dict(c) for c in row["ServiceChecks"]]
    return out  # type: ignore[return-value]


def _discard(index: dict[Any, dict[str, None]], key: Any, sid: str) -> None:
    d = index.get(key)
    if d is not None:
        d.pop(sid, None)
        if not d:
            del index[key]

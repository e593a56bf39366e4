"""Commands of the replicated state machine: typed builders -> msgpack bytes, and decoding.

The HTTP layer only calls the builders, so no raw dict ever reaches the Raft log. Decoding
validates every field against a schema and raises `CommandError` with a message that names the
offending field; the store turns that into an error result (a replicated log may hold garbage
from an older or buggy proposer, and every replica must reject it the same way).

Commands that need time (lock-delay, session invalidation) carry `now`, the proposer's
wall-clock seconds, so applying stays deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

MAX_VALUE_SIZE = 512 * 1024  # Consul's default kv_max_value_size
MAX_TXN_OPS = 128
MAX_U64 = 2**64 - 1
DEFAULT_LOCK_DELAY_NS = 15_000_000_000
MAX_LOCK_DELAY_NS = 60_000_000_000  # Consul's structs.MaxLockDelay

KV_TXN_VERBS = (
    "set", "cas", "lock", "unlock", "get", "get-or-empty", "get-tree", "check-index",
    "check-session", "check-not-exists", "delete", "delete-tree", "delete-cas",
)  # fmt: skip
TABLE_TXN_VERBS = ("set", "cas", "get", "delete", "delete-cas")
CATALOG_TXN_VERBS = ("set", "cas", "get", "delete", "delete-cas")  # Node, Service, Check
SESSION_TXN_VERBS = ("delete",)

_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)


class CommandError(ValueError):
    """A malformed command. `kind` is "invalid" or "too_large" (413 in the HTTP layer)."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Command:
    """A validated command: `op` plus its fields with defaults filled in."""

    op: str
    args: dict[str, Any]
    now: float = 0.0


def is_uuid(s: str) -> bool:
    return bool(_UUID_RE.match(s))


# --- schema checking ---------------------------------------------------------------------

# field -> (kind, required, default). Kinds: str, bytes, u64, int, num, bool, strlist,
# strmap, map, map?, list.
Spec = dict[str, tuple[str, bool, Any]]


def _ok(kind: str, v: Any) -> bool:
    if kind == "str":
        return isinstance(v, str)
    if kind == "bytes":
        return isinstance(v, bytes)
    if kind == "u64":
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_U64
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool) and -(2**63) <= v < 2**63
    if kind == "num":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "strlist":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if kind == "strmap":
        return isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()
        )
    if kind == "map":
        return isinstance(v, dict) and all(isinstance(k, str) for k in v)
    if kind == "map?":
        return v is None or _ok("map", v)
    if kind == "list":
        return isinstance(v, list)
    raise AssertionError(kind)


def _check(spec: Spec, obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise CommandError(f"{where}: expected a map, got {type(obj).__name__}")
    for k in obj:
        if k not in spec:
            raise CommandError(f"{where}: unknown field {k!r}")
    out: dict[str, Any] = {}
    for name, (kind, required, default) in spec.items():
        if name not in obj:
            if required:
                raise CommandError(f"{where}: missing field {name!r}")
            out[name] = _copy_default(default)
            continue
        v = obj[name]
        if not _ok(kind, v):
            raise CommandError(f"{where}: field {name!r} must be {kind}, got {type(v).__name__}")
        out[name] = v
    return out


def _copy_default(d: Any) -> Any:
    if isinstance(d, (dict, list)):
        return type(d)(d)
    return d


def _value_size(v: bytes, where: str) -> None:
    if len(v) > MAX_VALUE_SIZE:
        raise CommandError(
            f"{where}: value of {len(v)} bytes exceeds the {MAX_VALUE_SIZE}-byte limit",
            "too_large",
        )


NODE_SPEC: Spec = {
    "Node": ("str", True, ""),
    "Address": ("str", True, ""),
    "ID": ("str", False, ""),
    "Datacenter": ("str", False, ""),
    "TaggedAddresses": ("strmap", False, {}),
    "NodeMeta": ("strmap", False, {}),
}

SERVICE_SPEC: Spec = {
    "ID": ("str", False, ""),
    "Service": ("str", True, ""),
    "Tags": ("strlist", False, []),
    "Address": ("str", False, ""),
    "TaggedAddresses": ("map", False, {}),
    "Port": ("int", False, 0),
    "SocketPath": ("str", False, ""),
    "Meta": ("strmap", False, {}),
    "Weights": ("map", False, {"Passing": 1, "Warning": 1}),
    "EnableTagOverride": ("bool", False, False),
    "Kind": ("str", False, ""),
    "Proxy": ("map?", False, None),
    "Connect": ("map?", False, None),
    "Locality": ("map?", False, None),
}

CHECK_SPEC: Spec = {
    "Node": ("str", False, ""),
    "CheckID": ("str", True, ""),
    "Name": ("str", False, ""),
    "Status": ("str", False, "critical"),
    "Notes": ("str", False, ""),
    "Output": ("str", False, ""),
    "ServiceID": ("str", False, ""),
    "ServiceName": ("str", False, ""),
    "ServiceTags": ("strlist", False, []),
    "Type": ("str", False, ""),
    "Definition": ("map", False, {}),
}

CHECK_STATUSES = ("passing", "warning", "critical", "maintenance")

_KV_TXN_SPEC: Spec = {
    "kind": ("str", True, ""),
    "verb": ("str", True, ""),
    "key": ("str", True, ""),
    "value": ("bytes", False, b""),
    "flags": ("u64", False, 0),
    "index": ("u64", False, 0),
    "session": ("str", False, ""),
}

_TABLE_TXN_SPEC: Spec = {
    "kind": ("str", True, ""),
    "verb": ("str", True, ""),
    "table": ("str", True, ""),
    "id": ("str", True, ""),
    "value": ("map", False, {}),
    "index": ("u64", False, 0),
}

_NODE_TXN_SPEC: Spec = {
    "kind": ("str", True, ""),
    "verb": ("str", True, ""),
    "name": ("str", True, ""),
    "node": ("map?", False, None),  # the full node, for set/cas
    "index": ("u64", False, 0),
}

_SERVICE_TXN_SPEC: Spec = {
    "kind": ("str", True, ""),
    "verb": ("str", True, ""),
    "node": ("str", True, ""),
    "id": ("str", True, ""),
    "service": ("map?", False, None),  # the full service, for set/cas
    "index": ("u64", False, 0),
}

_CHECK_TXN_SPEC: Spec = {
    "kind": ("str", True, ""),
    "verb": ("str", True, ""),
    "node": ("str", True, ""),
    "id": ("str", True, ""),
    "check": ("map?", False, None),  # the full check, for set/cas
    "index": ("u64", False, 0),
}

_SESSION_TXN_SPEC: Spec = {
    "kind": ("str", True, ""),
    "verb": ("str", True, ""),
    "id": ("str", True, ""),
}

# kind -> (spec, verbs, the nested map's field, its spec)
_TXN_KINDS: dict[str, tuple[Spec, tuple[str, ...], str, Spec | None]] = {
    "kv": (_KV_TXN_SPEC, KV_TXN_VERBS, "", None),
    "table": (_TABLE_TXN_SPEC, TABLE_TXN_VERBS, "", None),
    "node": (_NODE_TXN_SPEC, CATALOG_TXN_VERBS, "node", NODE_SPEC),
    "service": (_SERVICE_TXN_SPEC, CATALOG_TXN_VERBS, "service", SERVICE_SPEC),
    "check": (_CHECK_TXN_SPEC, CATALOG_TXN_VERBS, "check", CHECK_SPEC),
    "session": (_SESSION_TXN_SPEC, SESSION_TXN_VERBS, "", None),
}

_KIND_NAMES = {"kv": "KV", "table": "table", "node": "Node", "service": "Service",
               "check": "Check", "session": "Session"}  # fmt: skip

SPECS: dict[str, Spec] = {
    "kv_set": {"key": ("str", True, ""), "value": ("bytes", True, b""), "flags": ("u64", False, 0)},
    "kv_cas": {
        "key": ("str", True, ""),
        "value": ("bytes", True, b""),
        "flags": ("u64", False, 0),
        "index": ("u64", True, 0),
    },
    "kv_lock": {
        "key": ("str", True, ""),
        "value": ("bytes", True, b""),
        "flags": ("u64", False, 0),
        "session": ("str", True, ""),
    },
    "kv_unlock": {
        "key": ("str", True, ""),
        "value": ("bytes", True, b""),
        "flags": ("u64", False, 0),
        "session": ("str", True, ""),
    },
    "kv_delete": {"key": ("str", True, "")},
    "kv_delete_cas": {"key": ("str", True, ""), "index": ("u64", True, 0)},
    "kv_delete_tree": {"prefix": ("str", True, "")},
    "tombstone_reap": {"index": ("u64", True, 0)},
    "state_restore": {"snapshot": ("bytes", True, b"")},
    "txn": {"ops": ("list", True, [])},
    "session_create": {
        "id": ("str", True, ""),
        "node": ("str", True, ""),
        "name": ("str", False, ""),
        "node_checks": ("strlist", False, ["serfHealth"]),
        "service_checks": ("strlist", False, []),
        "lock_delay": ("int", False, DEFAULT_LOCK_DELAY_NS),
        "behavior": ("str", False, "release"),
        "ttl": ("str", False, ""),
    },
    "session_destroy": {"id": ("str", True, "")},
    "register": {
        "node": ("map", True, {}),
        "service": ("map?", False, None),
        "checks": ("list", False, []),
    },
    "deregister": {
        "node": ("str", True, ""),
        "service_id": ("str", False, ""),
        "check_id": ("str", False, ""),
    },
    "table_upsert": {
        "table": ("str", True, ""),
        "id": ("str", True, ""),
        "value": ("map", True, {}),
        "cas": ("u64", False, None),
    },
    "table_delete": {
        "table": ("str", True, ""),
        "id": ("str", True, ""),
        "cas": ("u64", False, None),
    },
}


def _validate(op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Deep checks beyond field types: value sizes, nested maps, enumerations."""
    if "value" in args and isinstance(args["value"], bytes):
        _value_size(args["value"], op)
    if op == "txn":
        ops = args["ops"]
        if len(ops) > MAX_TXN_OPS:
            raise CommandError(
                f"txn: {len(ops)} operations exceed the limit of {MAX_TXN_OPS}", "too_large"
            )
        args["ops"] = [_validate_txn_op(i, o) for i, o in enumerate(ops)]
    elif op == "register":
        args["node"] = _check(NODE_SPEC, args["node"], "register.node")
        if args["service"] is not None:
            args["service"] = _check(SERVICE_SPEC, args["service"], "register.service")
        args["checks"] = [
            _check_check(c, f"register.checks[{i}]") for i, c in enumerate(args["checks"])
        ]
    elif op == "session_create":
        if args["behavior"] not in ("release", "delete"):
            raise CommandError(f"Invalid session behavior setting {args['behavior']!r}")
        if not 0 <= args["lock_delay"] <= MAX_LOCK_DELAY_NS:
            raise CommandError(
                f"Lock delay must be between 0 and {MAX_LOCK_DELAY_NS // 10**9}s, "
                f"got {args['lock_delay']} ns"
            )
    return args


def _check_check(obj: Any, where: str) -> dict[str, Any]:
    chk = _check(CHECK_SPEC, obj, where)
    if chk["Status"] not in CHECK_STATUSES:
        raise CommandError(
            f"{where}: Status must be one of {', '.join(CHECK_STATUSES)}, got {chk['Status']!r}"
        )
    return chk


def _validate_txn_op(i: int, o: Any) -> dict[str, Any]:
    where = f"txn.ops[{i}]"
    kind = o.get("kind") if isinstance(o, dict) else None
    entry = _TXN_KINDS.get(kind) if isinstance(kind, str) else None
    if entry is None:
        raise CommandError(f"{where}: unknown operation kind {kind!r}")
    spec, verbs, nested, nested_spec = entry
    op = _check(spec, o, where)
    if op["verb"] not in verbs:
        raise CommandError(f"{where}: unknown {_KIND_NAMES[str(kind)]} verb {op['verb']!r}")
    if kind == "kv":
        _value_size(op["value"], where)
    if nested and nested_spec is not None:
        if op["verb"] in ("set", "cas"):
            if op[nested] is None:
                raise CommandError(f"{where}: {kind} {op['verb']} needs the full {nested!r}")
            if kind == "check":
                op[nested] = _check_check(op[nested], f"{where}.{nested}")
            else:
                op[nested] = _check(nested_spec, op[nested], f"{where}.{nested}")
        elif op[nested] is not None:
            raise CommandError(f"{where}: {kind} {op['verb']} takes no {nested!r}")
    return op


def decode(data: bytes) -> Command:
    """Parse and validate one command; raises CommandError."""
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as e:
        raise CommandError(f"undecodable command: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise CommandError(f"command must be a map, got {type(obj).__name__}")
    op = obj.get("op")
    if not isinstance(op, str) or op not in SPECS:
        raise CommandError(f"unknown command op {op!r}")
    now = obj.get("now", 0.0)
    if not _ok("num", now):
        raise CommandError(f"{op}: field 'now' must be a number")
    fields = {k: v for k, v in obj.items() if k not in ("op", "now")}
    args = _check(SPECS[op], fields, op)
    return Command(op, _validate(op, args), float(now))


def _encode(op: str, now: float | None = None, **fields: Any) -> bytes:
    obj: dict[str, Any] = {"op": op}
    if now is not None:
        obj["now"] = float(now)
    obj.update({k: v for k, v in fields.items() if v is not None})
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True)
    except (OverflowError, TypeError, ValueError) as e:
        raise CommandError(f"{op}: unencodable field: {e}") from None
    decode(data)  # fail at the proposer, with the same message the store would give
    return data


# --- KV ----------------------------------------------------------------------------------


def kv_set(key: str, value: bytes, *, flags: int = 0) -> bytes:
    return _encode("kv_set", key=key, value=value, flags=flags)


def kv_cas(key: str, value: bytes, index: int, *, flags: int = 0) -> bytes:
    """Set only if the key's ModifyIndex is `index`; 0 means create-only."""
    return _encode("kv_cas", key=key, value=value, flags=flags, index=index)


def kv_lock(key: str, value: bytes, session: str, *, now: float, flags: int = 0) -> bytes:
    """Acquire (PUT ?acquire=); `now` is checked against the key's lock-delay."""
    return _encode("kv_lock", now, key=key, value=value, flags=flags, session=session)


def kv_unlock(key: str, value: bytes, session: str, *, flags: int = 0) -> bytes:
    """Release (PUT ?release=)."""
    return _encode("kv_unlock", key=key, value=value, flags=flags, session=session)


def kv_delete(key: str) -> bytes:
    return _encode("kv_delete", key=key)


def kv_delete_cas(key: str, index: int) -> bytes:
    return _encode("kv_delete_cas", key=key, index=index)


def kv_delete_tree(prefix: str) -> bytes:
    return _encode("kv_delete_tree", prefix=prefix)


def state_restore(snapshot: bytes) -> bytes:
    """Replace the whole state with a snapshot taken by `StateStore.snapshot` (an operator's
    `meshnode snapshot restore`): through the log, so every replica restores at one index."""
    return _encode("state_restore", snapshot=snapshot)


def tombstone_reap(index: int) -> bytes:
    """Forget KV tombstones at or below `index` (the leader's tombstone GC)."""
    return _encode("tombstone_reap", index=index)


# --- transactions ------------------------------------------------------------------------


def txn_kv(
    verb: str,
    key: str,
    *,
    value: bytes = b"",
    flags: int = 0,
    index: int = 0,
    session: str = "",
) -> dict[str, Any]:
    """One KV operation of a txn, with Consul's verbs (set, cas, lock, get-tree, ...)."""
    return {
        "kind": "kv",
        "verb": verb,
        "key": key,
        "value": value,
        "flags": flags,
        "index": index,
        "session": session,
    }


def txn_table(
    verb: str, table: str, row_id: str, *, value: Mapping[str, Any] | None = None, index: int = 0
) -> dict[str, Any]:
    """One generic-table operation of a txn (set, cas, get, delete, delete-cas)."""
    return {
        "kind": "table",
        "verb": verb,
        "table": table,
        "id": row_id,
        "value": dict(value or {}),
        "index": index,
    }


def txn_node(
    verb: str,
    node: str,
    *,
    address: str = "",
    node_id: str = "",
    datacenter: str = "",
    tagged_addresses: Mapping[str, str] | None = None,
    node_meta: Mapping[str, str] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    """One Node operation of a txn; set/cas send the whole node (Consul's TxnNodeOp)."""
    full = None
    if verb in ("set", "cas"):
        full = {
            "Node": node,
            "Address": address,
            "ID": node_id,
            "Datacenter": datacenter,
            "TaggedAddresses": dict(tagged_addresses or {}),
            "NodeMeta": dict(node_meta or {}),
        }
    return {"kind": "node", "verb": verb, "name": node, "node": full, "index": index}


def txn_service(
    verb: str,
    node: str,
    service: Mapping[str, Any] | None = None,
    *,
    service_id: str = "",
    index: int = 0,
) -> dict[str, Any]:
    """One Service operation; set/cas take the service map, get/delete just its ID."""
    sid = service_id
    if service is not None and not sid:
        sid = str(service.get("ID") or service.get("Service") or "")
    full = dict(service) if service is not None else None
    return {"kind": "service", "verb": verb, "node": node, "id": sid, "service": full,
            "index": index}  # fmt: skip


def txn_check(
    verb: str,
    node: str,
    check: Mapping[str, Any] | None = None,
    *,
    check_id: str = "",
    index: int = 0,
) -> dict[str, Any]:
    """One Check operation; set/cas take the check map, get/delete just its ID."""
    cid = check_id or (str(check.get("CheckID", "")) if check is not None else "")
    full = dict(check) if check is not None else None
    return {"kind": "check", "verb": verb, "node": node, "id": cid, "check": full,
            "index": index}  # fmt: skip


def txn_session(verb: str, session_id: str) -> dict[str, Any]:
    """Session operation of a txn (Consul only has "delete")."""
    return {"kind": "session", "verb": verb, "id": session_id}


def txn(ops: Sequence[Mapping[str, Any]], *, now: float) -> bytes:
    """All-or-nothing list of operations (Consul's /v1/txn), as one Raft entry.

    `now` is required: a lock op checks lock-delay against it, and a check set to critical
    starts the lock-delay of the sessions it invalidates.
    """
    return _encode("txn", now, ops=[dict(o) for o in ops])


# --- sessions ----------------------------------------------------------------------------


def session_create(
    session_id: str,
    node: str,
    *,
    name: str = "",
    node_checks: Sequence[str] | None = None,
    service_checks: Sequence[str] = (),
    lock_delay_ns: int = DEFAULT_LOCK_DELAY_NS,
    behavior: str = "release",
    ttl: str = "",
) -> bytes:
    """The proposer picks the UUID so that every replica creates the same session."""
    return _encode(
        "session_create",
        id=session_id,
        node=node,
        name=name,
        node_checks=list(node_checks) if node_checks is not None else ["serfHealth"],
        service_checks=list(service_checks),
        lock_delay=lock_delay_ns,
        behavior=behavior,
        ttl=ttl,
    )


def session_destroy(session_id: str, *, now: float) -> bytes:
    """Destroy/invalidate; `now` starts the lock-delay of the keys it held."""
    return _encode("session_destroy", now, id=session_id)


# --- catalog -----------------------------------------------------------------------------


def register(
    node: str,
    address: str,
    *,
    node_id: str = "",
    datacenter: str = "",
    tagged_addresses: Mapping[str, str] | None = None,
    node_meta: Mapping[str, str] | None = None,
    service: Mapping[str, Any] | None = None,
    checks: Sequence[Mapping[str, Any]] = (),
    now: float,
) -> bytes:
    """Catalog register: the node, optionally one service (Consul field names) and checks.

    `now` matters when a check turns critical and invalidates sessions (lock-delay).
    """
    node_obj: dict[str, Any] = {
        "Node": node,
        "Address": address,
        "ID": node_id,
        "Datacenter": datacenter,
        "TaggedAddresses": dict(tagged_addresses or {}),
        "NodeMeta": dict(node_meta or {}),
    }
    return _encode(
        "register",
        now,
        node=node_obj,
        service=dict(service) if service is not None else None,
        checks=[dict(c) for c in checks],
    )


def deregister(node: str, *, service_id: str = "", check_id: str = "", now: float) -> bytes:
    """Remove a check, a service (with its checks) or, with neither, the whole node."""
    return _encode("deregister", now, node=node, service_id=service_id, check_id=check_id)


# --- generic tables ----------------------------------------------------------------------


def table_upsert(
    table: str, row_id: str, value: Mapping[str, Any], *, cas: int | None = None
) -> bytes:
    return _encode("table_upsert", table=table, id=row_id, value=dict(value), cas=cas)


def table_delete(table: str, row_id: str, *, cas: int | None = None) -> bytes:
    return _encode("table_delete", table=table, id=row_id, cas=cas)

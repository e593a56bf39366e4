"""PUT /v1/txn: Consul's all-or-nothing transaction over KV, catalog and session operations.

Every transaction is one Raft entry (read-only ones too: they are then linearizable), and the
state machine either applies all its operations or none (409 with per-operation errors).
"""

from __future__ import annotations

import base64
import binascii
import time
from typing import Any

from aiohttp import web

from node.api.catalog import canonical
from node.api.common import (
    Handler,
    check_dc,
    decode_json,
    json_response,
    propose,
    text_error,
)
from node.api.kv import entry_json
from node.golang import fold
from node.state import commands as cmd
from node.state.commands import CHECK_SPEC, MAX_TXN_OPS, NODE_SPEC, SERVICE_SPEC

__all__ = ["ROUTES", "parse_ops"]


def _kv_op(o: dict[str, Any]) -> dict[str, Any]:
    f = canonical(o, ["Verb", "Key", "Value", "Flags", "Index", "Session"], "KV")
    try:
        value = base64.b64decode(f.get("Value") or "", validate=True)
    except (binascii.Error, TypeError) as e:
        raise ValueError(f"KV Value must be base64: {e}") from None
    return cmd.txn_kv(str(f.get("Verb") or ""), str(f.get("Key") or ""), value=value,
                      flags=int(f.get("Flags") or 0), index=int(f.get("Index") or 0),
                      session=str(f.get("Session") or ""))  # fmt: skip


def _node_op(o: dict[str, Any]) -> dict[str, Any]:
    f = canonical(o, ["Verb", "Node"], "Node")
    node = canonical(f.get("Node") or {}, [*NODE_SPEC, "ModifyIndex", "Meta"], "Node.Node")
    return cmd.txn_node(
        str(f.get("Verb") or ""), str(node.get("Node") or ""),
        address=str(node.get("Address") or ""), node_id=str(node.get("ID") or ""),
        datacenter=str(node.get("Datacenter") or ""),
        tagged_addresses=node.get("TaggedAddresses") or {},
        node_meta=node.get("NodeMeta") or node.get("Meta") or {},
        index=int(node.get("ModifyIndex") or 0),
    )  # fmt: skip


def _service_op(o: dict[str, Any]) -> dict[str, Any]:
    f = canonical(o, ["Verb", "Node", "Service"], "Service")
    svc = canonical(f.get("Service") or {}, [*SERVICE_SPEC, "ModifyIndex"], "Service.Service")
    index = int(svc.pop("ModifyIndex", 0) or 0)
    verb = str(f.get("Verb") or "")
    full = svc if verb in ("set", "cas") else None
    return cmd.txn_service(verb, str(f.get("Node") or ""), full,
                           service_id=str(svc.get("ID") or ""), index=index)  # fmt: skip


def _check_op(o: dict[str, Any]) -> dict[str, Any]:
    f = canonical(o, ["Verb", "Check"], "Check")
    chk = canonical(f.get("Check") or {}, [*CHECK_SPEC, "ModifyIndex"], "Check.Check")
    index = int(chk.pop("ModifyIndex", 0) or 0)
    verb = str(f.get("Verb") or "")
    full = chk if verb in ("set", "cas") else None
    return cmd.txn_check(verb, str(chk.get("Node") or ""), full,
                         check_id=str(chk.get("CheckID") or ""), index=index)  # fmt: skip


def _session_op(o: dict[str, Any]) -> dict[str, Any]:
    f = canonical(o, ["Verb", "Session"], "Session")
    session = canonical(f.get("Session") or {}, ["ID"], "Session.Session")
    return cmd.txn_session(str(f.get("Verb") or ""), str(session.get("ID") or ""))


_KINDS = {"kv": _kv_op, "node": _node_op, "service": _service_op, "check": _check_op,
          "session": _session_op}  # fmt: skip


def parse_ops(body: Any) -> list[dict[str, Any]]:
    """Consul's TxnOps JSON into state-machine txn ops; ValueError names the bad operation."""
    if not isinstance(body, list):
        raise ValueError("expected a JSON array of operations")
    ops = []
    for i, item in enumerate(body):
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(f"operation {i}: expected one of KV, Node, Service, Check, Session")
        ((kind, inner),) = item.items()
        parse = _KINDS.get(fold(kind))
        if parse is None or not isinstance(inner, dict):
            raise ValueError(f"operation {i}: unknown operation type {kind!r}")
        try:
            ops.append(parse(inner))
        except (ValueError, TypeError, OverflowError) as e:  # 1e999 is a float infinity
            raise ValueError(f"operation {i}: {e}") from None
    return ops


def _result_json(r: dict[str, Any]) -> dict[str, Any]:
    return {"KV": entry_json(r["KV"])} if "KV" in r else r


async def txn(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    try:
        body = decode_json(await request.read())
    except ValueError as e:
        return text_error(400, f"Failed to parse body: {e}")
    if isinstance(body, list) and len(body) > MAX_TXN_OPS:
        return text_error(413, f"Transaction contains too many operations "
                               f"({len(body)} > {MAX_TXN_OPS})")  # fmt: skip
    try:
        command = cmd.txn(parse_ops(body), now=time.time())
    except cmd.CommandError as e:  # a KV value over 512 KiB is a 413, as in Consul
        return text_error(413 if e.kind == "too_large" else 400, f"Failed to parse body: {e}")
    except ValueError as e:
        return text_error(400, f"Failed to parse body: {e}")
    # not write_command: a rolled-back txn is an answer (409 with its errors), not a failure
    result = await propose(request, command)
    if isinstance(result, web.Response):
        return result
    if result.kind == "conflict":
        return json_response(request, result.value, status=409)
    if not result.ok:
        return text_error(400 if result.kind == "invalid" else 500, result.error or "rejected")
    value = dict(result.value)
    if value.get("Results"):
        value["Results"] = [_result_json(r) for r in value["Results"]]
    return json_response(request, value)


ROUTES: list[tuple[str, str, Handler]] = [("PUT", "/v1/txn", txn)]

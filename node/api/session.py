"""/v1/session in Consul's shape: create, destroy, renew, info, list, node.

Sessions live in the replicated state; their TTL timers live on the leader (node/leader.py),
so a renew goes to the leader and a session not renewed within 2 x TTL is destroyed there.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from aiohttp import web

from node.api.common import (
    Handler,
    agent_of,
    blocking_read,
    check_dc,
    consensus_of,
    decode_json,
    json_response,
    text_error,
)
from node.api.common import write_command as propose
from node.golang import fold, parse_duration
from node.raft.runtime import NoLeader
from node.raft.transport import RPCError
from node.state import commands as cmd
from node.state.commands import DEFAULT_LOCK_DELAY_NS, MAX_LOCK_DELAY_NS, is_uuid

__all__ = ["ROUTES"]

SESSION_TABLES = ("sessions",)
#: Consul's FixupLockDelay: a bare number below this is seconds, otherwise nanoseconds
LOCK_DELAY_SECONDS_BELOW = 1000


def _lock_delay_ns(raw: Any) -> int:
    if isinstance(raw, str):
        ns = round(parse_duration(raw) * 1e9)
    elif isinstance(raw, int | float) and not isinstance(raw, bool):
        if not math.isfinite(raw):
            raise ValueError(f"LockDelay must be a finite duration, got {raw!r}")
        ns = round(raw * 1e9) if raw < LOCK_DELAY_SECONDS_BELOW else int(raw)
    else:
        raise ValueError(f"LockDelay must be a duration, got {raw!r}")
    if not 0 <= ns <= MAX_LOCK_DELAY_NS:
        raise ValueError(f"LockDelay must be between 0s and {MAX_LOCK_DELAY_NS // 10**9}s")
    return ns


def _str_list(raw: Any, field: str) -> list[str]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"{field} must be a list")
    out = []
    for item in raw:
        if isinstance(item, dict):  # ServiceChecks: [{"ID": ..., "Namespace": ...}]
            item = next((v for k, v in item.items() if fold(k) == "id"), None)
        if not isinstance(item, str) or not item:
            raise ValueError(f"{field} entries must be check IDs")
        out.append(item)
    return out


async def session_create(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    try:
        body = decode_json(await request.read())
    except ValueError as e:
        return text_error(400, f"Request decode failed: {e}")
    body = {} if body is None else body
    if not isinstance(body, dict):
        return text_error(400, "Request decode failed: expected a JSON object")
    args = {fold(k): v for k, v in body.items()}
    try:
        node = args.get("node") or agent_of(request).config.node
        if not isinstance(node, str):
            raise ValueError("Node must be a string")
        name = args.get("name") or ""
        behavior = args.get("behavior") or "release"
        ttl = args.get("ttl") or ""
        if not isinstance(name, str) or not isinstance(ttl, str):
            raise ValueError("Name and TTL must be strings")
        if behavior not in ("release", "delete"):
            raise ValueError(f"Invalid Behavior setting {behavior!r}")
        lock_delay = (
            _lock_delay_ns(args["lockdelay"]) if "lockdelay" in args else DEFAULT_LOCK_DELAY_NS
        )
        node_checks = _str_list(args.get("nodechecks"), "NodeChecks")
        node_checks += _str_list(args.get("checks"), "Checks")
        service_checks = _str_list(args.get("servicechecks"), "ServiceChecks")
    except ValueError as e:
        return text_error(400, f"Request decode failed: {e}")
    explicit = any(k in args for k in ("nodechecks", "checks", "servicechecks"))
    command = cmd.session_create(
        str(uuid.uuid4()),
        node,
        name=name,
        node_checks=node_checks if explicit else None,  # None: Consul's default serfHealth
        service_checks=service_checks,
        lock_delay_ns=lock_delay,
        behavior=behavior,
        ttl=ttl,
    )
    result = await propose(request, command)
    if isinstance(result, web.Response):
        return result
    return json_response(request, {"ID": result})


def _session_id(request: web.Request) -> str | web.Response:
    sid = request.match_info["id"]
    if not is_uuid(sid):
        return text_error(400, f"Session ID {sid!r} is not a UUID")
    return sid


async def session_destroy(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    sid = _session_id(request)
    if isinstance(sid, web.Response):
        return sid
    result = await propose(request, cmd.session_destroy(sid, now=time.time()))
    if isinstance(result, web.Response):
        return result
    return json_response(request, True)


async def session_renew(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    sid = request.match_info["id"]
    if not is_uuid(sid):  # Consul: any unknown ID, malformed or not, is a 404
        return text_error(404, f"Session id '{sid}' not found")
    try:
        session = await consensus_of(request).renew_session(sid)
    except (NoLeader, RPCError) as e:
        return text_error(500, str(e) or "No cluster leader")
    if session is None:
        return text_error(404, f"Session id '{sid}' not found")
    # the leader's copy: this agent's replica may not have applied the create yet
    return json_response(request, [session])


async def session_info(request: web.Request) -> web.StreamResponse:
    sid = request.match_info["id"]
    store = consensus_of(request).store

    def run() -> tuple[int, web.StreamResponse]:
        session = store.sessions.get(sid)
        return store.table_index("sessions"), json_response(
            request, [session] if session is not None else []
        )

    return await blocking_read(request, SESSION_TABLES, run)


async def session_list(request: web.Request) -> web.StreamResponse:
    store = consensus_of(request).store

    def run() -> tuple[int, web.StreamResponse]:
        return store.table_index("sessions"), json_response(request, store.sessions.list_all())

    return await blocking_read(request, SESSION_TABLES, run)


async def session_node(request: web.Request) -> web.StreamResponse:
    node = request.match_info["node"]
    store = consensus_of(request).store

    def run() -> tuple[int, web.StreamResponse]:
        return store.table_index("sessions"), json_response(request, store.sessions.for_node(node))

    return await blocking_read(request, SESSION_TABLES, run)


ROUTES: list[tuple[str, str, Handler]] = [
    ("PUT", "/v1/session/create", session_create),
    ("PUT", "/v1/session/destroy/{id}", session_destroy),
    ("PUT", "/v1/session/renew/{id}", session_renew),
    ("GET", "/v1/session/info/{id}", session_info),
    ("GET", "/v1/session/list", session_list),
    ("GET", "/v1/session/node/{node}", session_node),
]

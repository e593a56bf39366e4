"""/v1/kv in Consul's shape: GET (key, ?recurse, ?keys, ?raw, blocking, consistency modes),
PUT (?cas, ?flags, ?acquire, ?release) and DELETE (?recurse, ?cas)."""

from __future__ import annotations

import base64
import time
from typing import Any

from aiohttp import web

from node.api.common import (
    Handler,
    blocking_read,
    check_dc,
    consensus_of,
    flag,
    json_response,
    text_error,
    write_command,
)
from node.state import KVEntry
from node.state import commands as cmd
from node.state.commands import MAX_U64, MAX_VALUE_SIZE

__all__ = ["ROUTES", "entry_json"]

KV_TABLES = ("kvs", "tombstones")


def entry_json(e: KVEntry) -> dict[str, Any]:
    """Value as base64, null when empty (Consul stores no distinction between "" and null)."""
    out: dict[str, Any] = dict(e)
    value = e["Value"]
    out["Value"] = base64.b64encode(value).decode() if value else None
    return out


def _u64(request: web.Request, name: str, label: str) -> int | web.Response:
    try:
        v = int(request.query[name])
    except ValueError:
        return text_error(400, f"Invalid {label}")
    if not 0 <= v <= MAX_U64:
        return text_error(400, f"Invalid {label}")
    return v


async def kv_get(request: web.Request) -> web.StreamResponse:
    key = request.match_info["key"]
    store = consensus_of(request).store
    if flag(request, "keys"):
        separator = request.query.get("separator", "")

        def run() -> tuple[int, web.StreamResponse]:
            keys = store.kv.keys(key, separator)
            index = store.kv.list_index(key)
            return index, json_response(request, keys) if keys else web.Response(status=404)

    elif flag(request, "recurse"):

        def run() -> tuple[int, web.StreamResponse]:
            entries = store.kv.list_prefix(key)
            index = store.kv.list_index(key)
            if not entries:
                return index, web.Response(status=404)
            return index, json_response(request, [entry_json(e) for e in entries])

    else:
        raw = flag(request, "raw")

        def run() -> tuple[int, web.StreamResponse]:
            entry = store.kv.get(key)
            index = store.kv.max_index()
            if entry is None:
                return index, web.Response(status=404)
            if raw:  # never sniffed into HTML (CVE-2020-25864): always text/plain
                return index, web.Response(body=entry["Value"] or b"", content_type="text/plain")
            return index, json_response(request, [entry_json(entry)])

    return await blocking_read(request, KV_TABLES, run)


async def kv_put(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    key = request.match_info["key"]
    if not key:
        return text_error(400, "Missing key name")
    size = request.content_length
    if size is not None and size > MAX_VALUE_SIZE:
        return text_error(413, f"Request body({size} bytes) too large, max size: "
                               f"{MAX_VALUE_SIZE} bytes")  # fmt: skip
    value = await request.read()
    if len(value) > MAX_VALUE_SIZE:
        return text_error(413, f"Request body({len(value)} bytes) too large, max size: "
                               f"{MAX_VALUE_SIZE} bytes")  # fmt: skip
    flags = 0
    if "flags" in request.query:
        f = _u64(request, "flags", "flags")
        if isinstance(f, web.Response):
            return f
        flags = f
    q = request.query
    # Consul's precedence when several are given: release, then acquire, then cas
    if "release" in q:
        command = cmd.kv_unlock(key, value, q["release"], flags=flags)
    elif "acquire" in q:
        command = cmd.kv_lock(key, value, q["acquire"], now=time.time(), flags=flags)
    elif "cas" in q:
        index = _u64(request, "cas", "cas index")
        if isinstance(index, web.Response):
            return index
        command = cmd.kv_cas(key, value, index, flags=flags)
    else:
        command = cmd.kv_set(key, value, flags=flags)
    result = await write_command(request, command)
    if isinstance(result, web.Response):
        return result
    return json_response(request, bool(result))


async def kv_delete(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    key = request.match_info["key"]
    if flag(request, "recurse"):
        command = cmd.kv_delete_tree(key)
    elif not key:
        return text_error(400, "Missing key name")
    elif "cas" in request.query:
        index = _u64(request, "cas", "cas index")
        if isinstance(index, web.Response):
            return index
        command = cmd.kv_delete_cas(key, index)
    else:
        command = cmd.kv_delete(key)
    result = await write_command(request, command)
    if isinstance(result, web.Response):
        return result
    return json_response(request, bool(result))


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", r"/v1/kv/{key:[\s\S]*}", kv_get),
    ("PUT", r"/v1/kv/{key:[\s\S]*}", kv_put),
    ("DELETE", r"/v1/kv/{key:[\s\S]*}", kv_delete),
]

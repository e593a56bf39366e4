"""/v1/agent/service* and /v1/agent/check*: what this agent owns (node/local.py), in Consul's
shapes. Anti-entropy carries every change into the catalog."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from node.api.common import (
    Handler,
    agent_of,
    blocking_deadline,
    blocking_params,
    decode_json,
    flag,
    json_response,
    text_error,
)
from node.api.filter import AGENT_CHECK_SCHEMA, AGENT_SERVICE_SCHEMA, request_filter
from node.registration import RegistrationError

if TYPE_CHECKING:
    from node.local import LocalState

__all__ = ["ROUTES"]

STATUS_OF = {"pass": "passing", "warn": "warning", "fail": "critical"}


def _local(request: web.Request) -> LocalState:
    local = agent_of(request).local
    if local is None:
        raise web.HTTPInternalServerError(text="this agent keeps no local services")
    return local


async def _body(request: web.Request) -> Any:
    try:
        return decode_json(await request.read())
    except ValueError as e:
        raise web.HTTPBadRequest(text=f"Request decode failed: {e}") from None


#: fields Consul's AgentService leaves out when empty (`json:",omitempty"`)
OMIT_EMPTY = ("TaggedAddresses", "SocketPath", "Locality")


def _service_json(request: web.Request, svc: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in svc.items() if v or k not in OMIT_EMPTY}
    out["Datacenter"] = agent_of(request).config.datacenter
    return out


def _check_json(request: web.Request, local: LocalState, cid: str) -> dict[str, Any]:
    chk = local.checks[cid]
    service = local.services.get(chk.service_id, {})
    out = chk.catalog(agent_of(request).config.node, service.get("Service", ""))
    out["ServiceTags"] = list(service.get("Tags", []))
    out["Definition"] = {}
    return out


async def service_register(request: web.Request) -> web.StreamResponse:
    local = _local(request)
    try:
        local.add_service(await _body(request),
                          replace_checks=flag(request, "replace-existing-checks"))  # fmt: skip
    except RegistrationError as e:
        return text_error(400, str(e))
    return web.Response(status=200)


async def service_deregister(request: web.Request) -> web.StreamResponse:
    sid = request.match_info["id"]
    if not _local(request).remove_service(sid):
        return text_error(404, f'Unknown service ID "{sid}". Ensure that the service ID is '
                               "passed, not the service name.")  # fmt: skip
    return web.Response(status=200)


async def services(request: web.Request) -> web.StreamResponse:
    local, f = _local(request), request_filter(request, AGENT_SERVICE_SCHEMA)
    if isinstance(f, web.Response):
        return f
    everything = {k: _service_json(request, v) for k, v in sorted(local.services.items())}
    return json_response(request, f.select_values(everything))


def _content_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


async def service(request: web.Request) -> web.StreamResponse:
    """Consul's hash-based blocking: with ?hash= the answer waits (?wait=, 5 min by default, at
    most 10, plus up to wait/16 of jitter) until the service differs from that hash."""
    local, sid = _local(request), request.match_info["id"]
    params = blocking_params(request)
    if isinstance(params, web.Response):
        return params
    want, wait = request.query.get("hash", ""), params[1]
    loop = asyncio.get_running_loop()
    deadline = blocking_deadline(wait)
    while True:
        svc = local.services.get(sid)
        if svc is None:
            return text_error(404, f"unknown service ID: {sid}")
        body = _service_json(request, svc)
        digest = _content_hash(body)
        remaining = deadline - loop.time()
        if digest != want or remaining <= 0:
            resp = json_response(request, body)
            resp.headers["X-Consul-ContentHash"] = digest
            return resp
        await local.wait_changed(remaining)


async def checks(request: web.Request) -> web.StreamResponse:
    local, f = _local(request), request_filter(request, AGENT_CHECK_SCHEMA)
    if isinstance(f, web.Response):
        return f
    everything = {cid: _check_json(request, local, cid) for cid in sorted(local.checks)}
    return json_response(request, f.select_values(everything))


async def check_register(request: web.Request) -> web.StreamResponse:
    try:
        _local(request).add_check(await _body(request))
    except RegistrationError as e:
        return text_error(400, str(e))
    return web.Response(status=200)


async def check_deregister(request: web.Request) -> web.StreamResponse:
    cid = request.match_info["id"]
    if not _local(request).remove_check(cid):
        return text_error(404, f'Unknown check ID "{cid}"')
    return web.Response(status=200)


async def check_ttl(request: web.Request) -> web.StreamResponse:
    cid = request.match_info["id"]
    status = STATUS_OF[request.match_info["verb"]]
    return _update(request, cid, status, request.query.get("note", ""))


async def check_update(request: web.Request) -> web.StreamResponse:
    body = await _body(request)
    if not isinstance(body, dict):
        return text_error(400, "Request decode failed: expected an object with Status")
    fields = {k.lower(): v for k, v in body.items()}
    status, output = fields.get("status", ""), fields.get("output", "")
    if not isinstance(status, str) or not isinstance(output, str):
        return text_error(400, "Status and Output must be strings")
    return _update(request, request.match_info["id"], status, output)


def _update(request: web.Request, cid: str, status: str, output: str) -> web.Response:
    try:
        _local(request).update_check(cid, status, output)
    except KeyError:
        return text_error(404, f'Unknown check ID "{cid}"')
    except RegistrationError as e:
        return text_error(400, str(e))
    return web.Response(status=200)


ROUTES: list[tuple[str, str, Handler]] = [
    ("PUT", "/v1/agent/service/register", service_register),
    ("PUT", "/v1/agent/service/deregister/{id}", service_deregister),
    ("GET", "/v1/agent/services", services),
    ("GET", "/v1/agent/service/{id}", service),
    ("GET", "/v1/agent/checks", checks),
    ("PUT", "/v1/agent/check/register", check_register),
    ("PUT", "/v1/agent/check/deregister/{id}", check_deregister),
    ("PUT", "/v1/agent/check/{verb:pass|warn|fail}/{id}", check_ttl),
    ("PUT", "/v1/agent/check/update/{id}", check_update),
]

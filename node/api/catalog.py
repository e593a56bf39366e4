"""/v1/catalog and /v1/health in Consul's shapes, read from the replicated catalog.

Reads block on the catalog's table indexes (`?index=&wait=`) and honour the consistency modes
like every other read; writes (`/v1/catalog/register|deregister`) go through Raft. The reads of
one service (catalog/service, health/service, health/checks) wait only on that service's index,
so a write elsewhere in the catalog does not wake them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from node.api.common import (
    Handler,
    agent_of,
    blocking_read,
    check_dc,
    consensus_of,
    flag,
    fold_key,
    json_response,
    text_error,
    write_command,
)
from node.state import commands as cmd
from node.state.catalog import service_index_name
from node.state.commands import CHECK_SPEC, NODE_SPEC, SERVICE_SPEC

__all__ = ["ROUTES", "canonical"]

NODES, SERVICES, CHECKS = "nodes", "services", "checks"
CHECK_STATES = ("any", "passing", "warning", "critical", "maintenance")


def canonical(obj: Any, fields: Any, where: str) -> dict[str, Any]:
    """Consul's JSON field names for an object a client sent with any case or snake_case
    (Go's decoder matches names case-insensitively); unknown fields are ignored as Go does."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object")
    names = {fold_key(f): f for f in fields}
    return {names[fold_key(k)]: v for k, v in obj.items() if fold_key(k) in names}


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError as e:
        return text_error(400, f"Request decode failed: {e}")
    if not isinstance(body, dict):
        return text_error(400, "Request decode failed: expected a JSON object")
    return body


# ----- writes -----


async def catalog_register(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    top_fields = [*NODE_SPEC, "Service", "Check", "Checks", "SkipNodeUpdate"]
    try:
        req = canonical(body, top_fields, "the registration")
        node, address = req.get("Node"), req.get("Address")
        if not isinstance(node, str) or not node:
            raise ValueError("Must provide node")
        if not isinstance(address, str) or not address:
            raise ValueError("Must provide address")
        service = req.get("Service")
        if service is not None:
            service = canonical(service, SERVICE_SPEC, "Service")
        dc = req.get("Datacenter")
        if dc and dc != agent_of(request).config.datacenter:
            return text_error(500, "No path to datacenter")
        checks = [canonical(c, CHECK_SPEC, "Check") for c in req.get("Checks") or []]
        if req.get("Check") is not None:
            checks.insert(0, canonical(req["Check"], CHECK_SPEC, "Check"))
        for chk in checks:  # Consul: a check without an ID is named by its Name
            if not chk.get("CheckID") and isinstance(chk.get("Name"), str):
                chk["CheckID"] = chk["Name"]
        command = cmd.register(
            node,
            address,
            node_id=req.get("ID") or "",
            datacenter=req.get("Datacenter") or agent_of(request).config.datacenter,
            tagged_addresses=req.get("TaggedAddresses") or {},
            node_meta=req.get("NodeMeta") or {},
            service=service,
            checks=checks,
            now=time.time(),
        )
    except (ValueError, TypeError, cmd.CommandError) as e:
        return text_error(400, f"Invalid registration: {e}")
    result = await write_command(request, command)
    if isinstance(result, web.Response):
        return result
    return json_response(request, True)


async def catalog_deregister(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        req = canonical(body, ["Node", "ServiceID", "CheckID", "Datacenter"], "the request")
        dc = req.get("Datacenter")
        if dc and dc != agent_of(request).config.datacenter:
            return text_error(500, "No path to datacenter")
        node = req.get("Node")
        if not isinstance(node, str) or not node:
            raise ValueError("Must provide node")
        command = cmd.deregister(
            node,
            service_id=str(req.get("ServiceID") or ""),
            check_id=str(req.get("CheckID") or ""),
            now=time.time(),
        )
    except (ValueError, TypeError, cmd.CommandError) as e:
        return text_error(400, f"Invalid deregistration: {e}")
    result = await write_command(request, command)
    if isinstance(result, web.Response):
        return result
    return json_response(request, True)


# ----- reads -----


async def _read(
    request: web.Request,
    tables: tuple[str, ...],
    compute: Callable[[], Any],
    index: Callable[[], int] | None = None,
) -> web.StreamResponse:
    """A blocking read whose body is compute(), waiting on `tables`; its index is index(), or
    the tables' index without one. The read answers once index() passes ?index=; until then
    it waits for the tables' index to pass the larger of the two."""
    store = consensus_of(request).store

    def run() -> tuple[int, web.StreamResponse]:
        at = index() if index is not None else store.table_index(tables)
        return at, json_response(request, compute())

    return await blocking_read(request, tables, run)


async def catalog_datacenters(request: web.Request) -> web.StreamResponse:
    return json_response(request, [agent_of(request).config.datacenter])


async def catalog_nodes(request: web.Request) -> web.StreamResponse:
    catalog = consensus_of(request).store.catalog
    return await _read(request, (NODES,), catalog.list_nodes)


async def catalog_services(request: web.Request) -> web.StreamResponse:
    catalog = consensus_of(request).store.catalog
    return await _read(request, (SERVICES,), catalog.list_services)


def _tags(request: web.Request) -> list[str]:
    """Every ?tag= given: an instance must carry all of them (Consul 1.9+)."""
    return request.query.getall("tag", [])


def _with_tags(items: list[dict[str, Any]], tags: list[str], field: Callable[[Any], Any]) -> Any:
    return [i for i in items if all(t in field(i) for t in tags)]


async def catalog_service(request: web.Request) -> web.StreamResponse:
    name = request.match_info["service"]
    tags = _tags(request)
    catalog = consensus_of(request).store.catalog
    # Consul's ServiceNodes: maxIndexForService without checks (the pseudo-table's own index)
    return await _read(request, (service_index_name(name),), lambda: _with_tags(
        catalog.service_nodes(name, tags[0] if tags else None), tags,
        lambda i: i["ServiceTags"]))  # fmt: skip


async def catalog_node(request: web.Request) -> web.StreamResponse:
    name = request.match_info["node"]
    catalog = consensus_of(request).store.catalog
    # Consul answers null (200) for an unknown node
    return await _read(request, (NODES, SERVICES), lambda: catalog.node_services(name))


async def health_service(request: web.Request) -> web.StreamResponse:
    name = request.match_info["service"]
    tags = _tags(request)
    passing = flag(request, "passing") and request.query["passing"].lower() not in ("0", "false")
    catalog = consensus_of(request).store.catalog
    # Consul's CheckServiceNodes: maxIndexForService with checks (only its fallback differs)
    return await _read(request, (service_index_name(name),), lambda: _with_tags(
        catalog.health_service(name, tags[0] if tags else None, passing), tags,
        lambda i: i["Service"]["Tags"]),
        lambda: catalog.service_index(name, checks=True))  # fmt: skip


async def health_checks(request: web.Request) -> web.StreamResponse:
    name = request.match_info["service"]
    store = consensus_of(request).store
    # Consul's ServiceChecks answers with the checks table's index but wakes only for the
    # service's checks: wait on the service's index (which every change to them moves).
    return await _read(request, (service_index_name(name),),
                       lambda: store.catalog.service_checks(name),
                       lambda: store.table_index(CHECKS))  # fmt: skip


async def health_node(request: web.Request) -> web.StreamResponse:
    name = request.match_info["node"]
    catalog = consensus_of(request).store.catalog
    return await _read(request, (CHECKS,), lambda: catalog.node_checks(name))


async def health_state(request: web.Request) -> web.StreamResponse:
    state = request.match_info["state"]
    if state not in CHECK_STATES:
        return text_error(400, f"Invalid check state {state!r}: use one of "
                               f"{', '.join(CHECK_STATES)}")  # fmt: skip
    catalog = consensus_of(request).store.catalog
    return await _read(request, (CHECKS,), lambda: catalog.checks_in_state(state))


ROUTES: list[tuple[str, str, Handler]] = [
    ("PUT", "/v1/catalog/register", catalog_register),
    ("PUT", "/v1/catalog/deregister", catalog_deregister),
    ("GET", "/v1/catalog/datacenters", catalog_datacenters),
    ("GET", "/v1/catalog/nodes", catalog_nodes),
    ("GET", "/v1/catalog/services", catalog_services),
    ("GET", "/v1/catalog/service/{service}", catalog_service),
    ("GET", "/v1/catalog/node/{node}", catalog_node),
    ("GET", "/v1/health/service/{service}", health_service),
    ("GET", "/v1/health/checks/{service}", health_checks),
    ("GET", "/v1/health/node/{node}", health_node),
    ("GET", "/v1/health/state/{state}", health_state),
]

"""/v1/catalog and /v1/health in Consul's shapes, read from the replicated catalog.

Reads block on the catalog's table indexes (`?index=&wait=`) and honour the consistency modes
like every other read; writes (`/v1/catalog/register|deregister`) go through Raft. The reads of
one service (catalog/service, health/service, health/checks) wait only on that service's index,
so a write elsewhere in the catalog does not wake them.

As in Consul, service and node names in the path match in any case, `?tag=` compares in lower
case, `?node-meta=key:value` (repeatable) keeps what is on nodes with all those pairs, and
`?filter=` (node/api/filter.py) runs on each item of the answer; the index a read answers with
is the unfiltered data's, so a filtered watch wakes on any change to what it filters.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from aiohttp import web

from node.api.common import (
    Handler,
    agent_of,
    blocking_read,
    check_dc,
    consensus_of,
    json_response,
    text_error,
    write_command,
)
from node.api.filter import (
    CHECK_SERVICE_NODE_SCHEMA,
    HEALTH_CHECK_SCHEMA,
    NODE_SCHEMA,
    NODE_SERVICE_SCHEMA,
    SERVICE_NODE_SCHEMA,
    Filter,
    Schema,
    request_filter,
)
from node.golang import fold, parse_bool
from node.state import commands as cmd
from node.state.catalog import has_tag, meta_matches, service_index_name
from node.state.commands import CHECK_SPEC, NODE_SPEC, SERVICE_SPEC

__all__ = ["ROUTES", "canonical"]

NODES, SERVICES, CHECKS = "nodes", "services", "checks"
CHECK_STATES = ("any", "passing", "warning", "critical", "maintenance")


def canonical(obj: Any, fields: Any, where: str) -> dict[str, Any]:
    """Consul's JSON field names for an object a client sent with any case or snake_case
    (Go's decoder matches names case-insensitively); unknown fields are ignored as Go does."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object")
    names = {fold(f): f for f in fields}
    return {names[fold(k)]: v for k, v in obj.items() if fold(k) in names}


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


class _Query(NamedTuple):
    """A read's ?node-meta= pairs and ?filter=, checked before anything blocks."""

    meta: dict[str, str]
    filter: Filter

    @property
    def narrows(self) -> bool:
        return bool(self.meta) or not self.filter.everything


def _query(request: web.Request, schema: Schema, node_meta: bool = True) -> _Query | web.Response:
    if (err := check_dc(request)) is not None:  # Consul forwards (and fails) before filtering
        return err
    meta: dict[str, str] = {}
    if node_meta:  # Consul keeps the last value of a key given twice
        for raw in request.query.getall("node-meta", []):
            key, sep, value = raw.partition(":")
            if not sep or not key:
                return text_error(400, f"Invalid node-meta filter {json.dumps(raw)}: "
                                       "expected key:value")  # fmt: skip
            meta[key] = value
    flt = request_filter(request, schema)
    if isinstance(flt, web.Response):
        return flt
    return _Query(meta, flt)


def _on_meta_nodes(
    items: list[dict[str, Any]], meta: dict[str, str], node_meta: Callable[[Any], Any]
) -> list[dict[str, Any]]:
    if not meta:
        return items
    out = []
    for item in items:
        have = node_meta(item)
        if have is not None and meta_matches(have, meta):
            out.append(item)
    return out


async def catalog_nodes(request: web.Request) -> web.StreamResponse:
    q = _query(request, NODE_SCHEMA)
    if isinstance(q, web.Response):
        return q
    catalog = consensus_of(request).store.catalog

    def compute() -> list[dict[str, Any]]:
        nodes = _on_meta_nodes(catalog.list_nodes(), q.meta, lambda n: n["Meta"])
        return q.filter.select(nodes)

    return await _read(request, (NODES,), compute)


async def catalog_services(request: web.Request) -> web.StreamResponse:
    q = _query(request, SERVICE_NODE_SCHEMA)
    if isinstance(q, web.Response):
        return q
    catalog = consensus_of(request).store.catalog
    if not q.narrows:
        return await _read(request, (SERVICES,), catalog.list_services)

    def keep(instance: dict[str, Any]) -> bool:
        return meta_matches(instance["NodeMeta"], q.meta) and q.filter(instance)

    # node meta counts now: Consul's ServicesByNodeMeta answers with max(nodes, services)
    return await _read(request, (NODES, SERVICES), lambda: catalog.list_services(keep))


def _tags(request: web.Request) -> list[str]:
    """Every ?tag= given: an instance must carry all of them (Consul 1.9+), in any case."""
    return request.query.getall("tag", [])


def _with_tags(items: list[dict[str, Any]], tags: list[str], field: Callable[[Any], Any]) -> Any:
    return [i for i in items if all(has_tag(field(i), t) for t in tags)]


async def catalog_service(request: web.Request) -> web.StreamResponse:
    name = request.match_info["service"]
    tags = _tags(request)
    q = _query(request, SERVICE_NODE_SCHEMA)
    if isinstance(q, web.Response):
        return q
    catalog = consensus_of(request).store.catalog

    def compute() -> list[dict[str, Any]]:
        items = catalog.service_nodes(name, tags[0] if tags else None, any_case=True)
        items = _on_meta_nodes(_with_tags(items, tags, lambda i: i["ServiceTags"]), q.meta,
                               lambda i: i["NodeMeta"])  # fmt: skip
        return q.filter.select(items)

    # Consul's ServiceNodes: maxIndexForService without checks (the pseudo-table's own index)
    return await _read(request, (service_index_name(name),), compute)


async def catalog_node(request: web.Request) -> web.StreamResponse:
    name = request.match_info["node"]
    q = _query(request, NODE_SERVICE_SCHEMA, node_meta=False)
    if isinstance(q, web.Response):
        return q
    catalog = consensus_of(request).store.catalog

    def compute() -> dict[str, Any] | None:
        found = catalog.resolve_node(name)
        out = None if found is None else catalog.node_services(found)
        if out is not None:  # Consul filters the Services map, not the node
            out["Services"] = q.filter.select_values(out["Services"])
        return out  # Consul answers null (200) for an unknown node

    return await _read(request, (NODES, SERVICES), compute)


async def health_service(request: web.Request) -> web.StreamResponse:
    name = request.match_info["service"]
    tags = _tags(request)
    # Consul's getBoolQueryParam: present and empty is true, else strconv.ParseBool
    passing = request.query.get("passing")
    try:
        passing_only = passing is not None and (passing == "" or parse_bool(passing))
    except ValueError:
        return text_error(400, "Invalid value for ?passing")
    q = _query(request, CHECK_SERVICE_NODE_SCHEMA)
    if isinstance(q, web.Response):
        return q
    catalog = consensus_of(request).store.catalog

    def compute() -> list[dict[str, Any]]:
        items = catalog.health_service(name, tags[0] if tags else None, passing_only,
                                       any_case=True)  # fmt: skip
        items = _on_meta_nodes(_with_tags(items, tags, lambda i: i["Service"]["Tags"]), q.meta,
                               lambda i: i["Node"]["Meta"])  # fmt: skip
        return q.filter.select(items)

    # Consul's CheckServiceNodes: maxIndexForService with checks (only its fallback differs)
    return await _read(request, (service_index_name(name),), compute,
                       lambda: catalog.service_index(name, checks=True))  # fmt: skip


async def health_checks(request: web.Request) -> web.StreamResponse:
    name = request.match_info["service"]
    q = _query(request, HEALTH_CHECK_SCHEMA)
    if isinstance(q, web.Response):
        return q
    store = consensus_of(request).store
    catalog = store.catalog

    def compute() -> list[dict[str, Any]]:
        checks = catalog.service_checks(name, any_case=True)
        checks = _on_meta_nodes(checks, q.meta, lambda c: catalog.node_meta(c["Node"]))
        return q.filter.select(checks)

    # Consul's ServiceChecks answers with the checks table's index but wakes only for the
    # service's checks: wait on the service's index (which every change to them moves, and
    # every change to the nodes hosting it, whose meta ?node-meta= reads).
    index_tables = (NODES, CHECKS) if q.meta else (CHECKS,)
    return await _read(request, (service_index_name(name),), compute,
                       lambda: store.table_index(index_tables))  # fmt: skip


async def health_node(request: web.Request) -> web.StreamResponse:
    name = request.match_info["node"]
    q = _query(request, HEALTH_CHECK_SCHEMA, node_meta=False)
    if isinstance(q, web.Response):
        return q
    catalog = consensus_of(request).store.catalog

    def compute() -> list[dict[str, Any]]:
        found = catalog.resolve_node(name)
        return [] if found is None else q.filter.select(catalog.node_checks(found))

    return await _read(request, (CHECKS,), compute)


async def health_state(request: web.Request) -> web.StreamResponse:
    state = request.match_info["state"]
    if state not in CHECK_STATES:
        return text_error(400, f"Invalid check state {state!r}: use one of "
                               f"{', '.join(CHECK_STATES)}")  # fmt: skip
    q = _query(request, HEALTH_CHECK_SCHEMA)
    if isinstance(q, web.Response):
        return q
    catalog = consensus_of(request).store.catalog

    def compute() -> list[dict[str, Any]]:
        checks = catalog.checks_in_state(state)
        checks = _on_meta_nodes(checks, q.meta, lambda c: catalog.node_meta(c["Node"]))
        return q.filter.select(checks)

    # with ?node-meta= a node's meta changes the answer too (Consul adds the nodes table)
    return await _read(request, (NODES, CHECKS) if q.meta else (CHECKS,), compute)


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

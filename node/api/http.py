"""Consul-compatible HTTP API (aiohttp): the agent, event and keyring endpoints.

Response shapes, status codes and text error bodies follow Consul, because clients
(py-consul, the Go api package, consul-template) key on them. Routes live in one table
(`ROUTES`) so later layers (catalog, health, KV, /v1/agent/metrics) add rows, not plumbing.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gossip.keyring import KeyringError, parse_key
from gossip.member import KeyResponse, Member
from node.api import agent_services, catalog, kv, operator, session, txn
from node.api.common import (
    AGENT_KEY,
    Handler,
    agent_of,
    blocking_deadline,
    blocking_params,
    check_dc,
    decode_json,
    flag,
    json_response,
    text_error,
)
from node.config import CONSUL_COMPAT_VERSION, MESHNODE_VERSION

if TYPE_CHECKING:
    from node.agent import Agent

__all__ = ["ROUTES", "HTTPServer", "make_app", "member_json"]

log = structlog.get_logger("node.api.http")


def member_json(m: Member) -> dict[str, Any]:
    """A serf member as Consul's /v1/agent/members renders it."""
    return {
        "Name": m.name,
        "Addr": m.ip,
        "Port": m.port,
        "Tags": dict(m.tags),
        "Status": int(m.status),
        "ProtocolMin": m.protocol_min,
        "ProtocolMax": m.protocol_max,
        "ProtocolCur": m.protocol_cur,
        "DelegateMin": m.delegate_min,
        "DelegateMax": m.delegate_max,
        "DelegateCur": m.delegate_cur,
    }


# ----- /v1/agent -----


async def agent_members(request: web.Request) -> web.StreamResponse:
    """With ?wan, Consul lists its WAN pool: the servers, named `<node>.<dc>`. Without WAN
    federation, that is this datacenter's current Raft voters."""
    agent = agent_of(request)
    members = sorted(agent.runtime.members(), key=lambda m: m.name)
    if not flag(request, "wan"):
        return json_response(request, [member_json(m) for m in members])
    voters = set()
    if agent.consensus is not None and agent.consensus.raft is not None:
        voters = {s.node for s in agent.consensus.configuration().servers.values() if s.voter}
    dc = agent.config.datacenter
    return json_response(request, [member_json(m) | {"Name": f"{m.name}.{dc}"}
                                   for m in members if m.name in voters])  # fmt: skip


async def agent_self(request: web.Request) -> web.StreamResponse:
    agent = agent_of(request)
    c = agent.config
    body = {
        "Config": {
            "Datacenter": c.datacenter,
            "PrimaryDatacenter": c.datacenter,
            "NodeName": c.node,
            "NodeID": agent.node_id,
            "Partition": "",
            "Revision": f"meshnode-{MESHNODE_VERSION}",
            "Server": agent.consensus is not None and agent.consensus.is_voter(),
            "Version": CONSUL_COMPAT_VERSION,
            "BuildDate": "",
            "MeshnodeVersion": MESHNODE_VERSION,
        },
        "DebugConfig": agent.config.redacted(),
        "Coord": None,
        "Member": member_json(agent.runtime.local_member()),
        "Stats": agent.stats(),
        "Meta": {},
        "xDS": None,
    }
    return json_response(request, body)


async def agent_join(request: web.Request) -> web.StreamResponse:
    address = request.match_info["address"]
    if "wan" in request.query:
        return text_error(500, "Must be a server to join WAN cluster")
    try:
        n = await agent_of(request).runtime.join([address])
    except Exception as e:  # Consul reports any join failure as a 500 with the error text
        return text_error(500, str(e) or type(e).__name__)
    log.info("agent.http_join", address=address, nodes=n)
    return web.Response(status=200)


async def agent_leave(request: web.Request) -> web.StreamResponse:
    agent = agent_of(request)
    try:
        await agent.leave()
    except Exception as e:
        return text_error(500, f"leave failed: {e}")
    # Shut down only after this response is on its way (Consul answers, then exits).
    asyncio.get_running_loop().call_soon(agent.request_shutdown)
    return web.Response(status=200)


async def agent_metrics(request: web.Request) -> web.StreamResponse:
    metrics = agent_of(request).metrics
    if request.query.get("format") == "prometheus":
        return web.Response(body=metrics.prometheus(),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})  # fmt: skip
    return json_response(request, metrics.consul_json())


# ----- /v1/event -----


async def event_fire(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    name = request.match_info["name"]
    if not name:
        return text_error(400, "Missing name")
    payload = await request.read()
    q = request.query
    try:
        ev = await agent_of(request).fire_event(
            name,
            payload,
            node_filter=q.get("node", ""),
            service_filter=q.get("service", ""),
            tag_filter=q.get("tag", ""),
        )
    except ValueError as e:
        return text_error(400, str(e))
    return json_response(request, ev.to_json())


async def event_list(request: web.Request) -> web.StreamResponse:
    agent = agent_of(request)
    params = blocking_params(request)
    if isinstance(params, web.Response):
        return params
    min_index, wait = params
    name = request.query.get("name") or None
    loop = asyncio.get_running_loop()
    deadline = blocking_deadline(wait)
    while True:
        version = agent.events.version
        events = agent.events.matching(name)
        index = agent.events.index(events)
        # The index is a hash of the newest event ID, not monotonic: block only on equality.
        remaining = deadline - loop.time()
        if not min_index or index != min_index or remaining <= 0 or agent.shutting_down:
            break
        await agent.events.wait(version, remaining)
    resp = json_response(request, [e.to_json() for e in events])
    resp.headers["X-Consul-Index"] = str(index)
    return resp


# ----- /v1/operator/keyring -----


def _keyring_json(request: web.Request, resp: KeyResponse) -> list[dict[str, Any]]:
    body: dict[str, Any] = {
        "WAN": False,
        "Datacenter": agent_of(request).config.datacenter,
        "Segment": "",
        "Keys": dict(resp.keys),
        "PrimaryKeys": dict(resp.primary_keys),
        "NumNodes": resp.num_nodes,
    }
    if resp.messages:
        body["Messages"] = dict(resp.messages)
    return [body]


def _keyring_failure(request: web.Request, resp: KeyResponse) -> str | None:
    """Consul's keyringErrorsOrNil text when any node failed or did not answer."""
    if resp.num_err == 0 and resp.num_resp >= resp.num_nodes:
        return None
    pool = f"{agent_of(request).config.datacenter} (LAN)"
    if resp.num_err:
        lines = [f"{pool} error: {resp.num_err}/{resp.num_nodes} nodes reported failure"]
    else:
        lines = [f"{pool} error: {resp.num_resp}/{resp.num_nodes} nodes reported success"]
    lines += [f"{node}: {msg}" for node, msg in sorted(resp.messages.items())]
    return "\n".join(lines)


async def _key_from_body(request: web.Request) -> bytes | web.Response:
    try:
        body = decode_json(await request.read())
    except ValueError:
        return text_error(400, "Request decode failed: body is not valid JSON")
    if not isinstance(body, dict):
        return text_error(400, "Request decode failed: expected an object with a Key")
    # Go's encoding/json matches field names case-insensitively; so do we.
    key = next((v for k, v in body.items() if str(k).lower() == "key"), None)
    if not isinstance(key, str) or not key:
        return text_error(400, "Missing Key")
    try:
        return parse_key(key)
    except (KeyringError, ValueError) as e:
        return text_error(400, f"Invalid key: {e}")


async def keyring(request: web.Request) -> web.StreamResponse:
    agent = agent_of(request)
    if not agent.encryption_enabled:
        return text_error(
            500, "gossip encryption is not enabled on this agent (start it with --encrypt)"
        )
    rt = agent.runtime
    if request.method == "GET":
        return json_response(request, _keyring_json(request, await rt.list_keys()))
    key = await _key_from_body(request)
    if isinstance(key, web.Response):
        return key
    op = {"POST": rt.install_key, "PUT": rt.use_key, "DELETE": rt.remove_key}[request.method]
    resp = await op(key)
    failure = _keyring_failure(request, resp)
    if failure is not None:
        return text_error(500, failure)
    log.info("agent.keyring_changed", op=request.method.lower(), nodes=resp.num_nodes)
    return web.Response(status=200)


async def acl_disabled(request: web.Request) -> web.StreamResponse:
    """Consul without ACLs answers every /v1/acl/ call so; clients rely on it to tell an
    ACL-less cluster from a missing endpoint."""
    return text_error(401, "ACL support disabled")


#: (method, path, handler). aiohttp answers 405 for a known path with another method.
ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/v1/agent/members", agent_members),
    ("GET", "/v1/agent/self", agent_self),
    ("PUT", r"/v1/agent/join/{address:[\s\S]+}", agent_join),
    ("PUT", "/v1/agent/leave", agent_leave),
    ("PUT", r"/v1/event/fire/{name:[\s\S]*}", event_fire),
    ("GET", "/v1/event/list", event_list),
    ("GET", "/v1/operator/keyring", keyring),
    ("POST", "/v1/operator/keyring", keyring),
    ("PUT", "/v1/operator/keyring", keyring),
    ("DELETE", "/v1/operator/keyring", keyring),
    *kv.ROUTES,
    *operator.ROUTES,
    *session.ROUTES,
    *catalog.ROUTES,
    *agent_services.ROUTES,
    *txn.ROUTES,
    ("GET", "/v1/agent/metrics", agent_metrics),
    *[(m, r"/v1/acl/{tail:[\s\S]*}", acl_disabled) for m in ("GET", "PUT", "POST", "DELETE")],
]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Plain-text error bodies like Consul's; request logging at debug."""
    start = time.monotonic()
    try:
        resp = await handler(request)
    except web.HTTPMethodNotAllowed as e:
        resp = text_error(405, f"method {request.method} not allowed")
        resp.headers["Allow"] = ",".join(sorted(e.allowed_methods))
    except web.HTTPNotFound:
        resp = text_error(404, "404 page not found")
    except web.HTTPException as e:
        if e.status < 400:
            raise
        resp = text_error(e.status, e.text or e.reason)
    except Exception as e:
        log.exception("http.handler_failed", method=request.method, path=request.path)
        resp = text_error(500, str(e) or type(e).__name__)
    agent_of(request).metrics.http_requests.labels(request.method, str(resp.status)).inc()
    log.debug(
        "http.request",
        method=request.method,
        path=request.path_qs,
        status=resp.status,
        ms=round((time.monotonic() - start) * 1000, 2),
    )
    return resp


def make_app(agent: Agent) -> web.Application:
    # KV values are capped at 512 KiB by their handler; snapshot restores may be far larger
    app = web.Application(middlewares=[_errors], client_max_size=operator.MAX_SNAPSHOT_SIZE)
    app[AGENT_KEY] = agent
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app


class HTTPServer:
    """The agent component serving the API on --client:--http-port."""

    name = "http"

    def __init__(self, agent: Agent, host: str, port: int) -> None:
        self.agent = agent
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        runner = web.AppRunner(make_app(self.agent), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        if runner.addresses:
            self.port = int(runner.addresses[0][1])
        log.info("http.listening", addr=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

"""/v1/catalog and /v1/health on a one-node agent (fake gossip, real Raft and HTTP)."""

# ruff: noqa: F811 - pytest fixtures imported from test_kv_api are parameters here

from __future__ import annotations

import asyncio
import time

import aiohttp

from node.agent import Agent
from tests.test_kv_api import agent, get, http, wait_node_registered  # noqa: F401 - fixtures

WEB = {
    "Node": "box1",
    "Address": "10.1.0.1",
    "NodeMeta": {"rack": "r1"},
    "Service": {"ID": "web-1", "Service": "web", "Tags": ["v1", "blue"], "Port": 8080},
    "Check": {"CheckID": "service:web-1", "Name": "web alive", "Status": "passing",
              "ServiceID": "web-1"},
}  # fmt: skip


async def register(http: aiohttp.ClientSession, body: object) -> tuple[int, str]:
    async with http.put("/v1/catalog/register", json=body) as r:
        return r.status, await r.text()


async def test_register_then_read_every_view(agent: Agent, http: aiohttp.ClientSession) -> None:
    await wait_node_registered(agent)  # the leader put node1 (and its consul service) in
    assert await register(http, WEB) == (200, "true")
    # a second instance, registered with snake_case keys as some clients send them
    svc = {"id": "web-2", "service": "web", "tags": ["v2"], "port": 8081}
    other = {"node": "box2", "address": "10.1.0.2", "service": svc}
    assert (await register(http, other))[0] == 200

    assert (await get(http, "/v1/catalog/datacenters"))[1] == ["dc1"]
    _, services, headers = await get(http, "/v1/catalog/services")
    assert services == {"consul": [], "web": ["blue", "v1", "v2"]}
    assert int(headers["X-Consul-Index"]) > 0 and headers["X-Consul-KnownLeader"] == "true"
    _, nodes, _ = await get(http, "/v1/catalog/nodes")
    assert isinstance(nodes, list)
    assert [n["Node"] for n in nodes] == ["box1", "box2", "node1"]
    assert nodes[0]["Meta"] == {"rack": "r1"}

    _, inst, _ = await get(http, "/v1/catalog/service/web")
    assert isinstance(inst, list)
    assert [(i["Node"], i["ServiceID"], i["ServicePort"]) for i in inst] == [
        ("box1", "web-1", 8080), ("box2", "web-2", 8081),
    ]  # fmt: skip
    _, inst, _ = await get(http, "/v1/catalog/service/web?tag=v2")
    assert isinstance(inst, list) and [i["ServiceID"] for i in inst] == ["web-2"]
    _, node, _ = await get(http, "/v1/catalog/node/box1")
    assert isinstance(node, dict) and list(node["Services"]) == ["web-1"]
    assert (await get(http, "/v1/catalog/node/nowhere"))[1] is None

    _, health, _ = await get(http, "/v1/health/service/web")
    assert isinstance(health, list) and len(health) == 2
    assert [c["CheckID"] for c in health[0]["Checks"]] == ["service:web-1"]
    _, checks, _ = await get(http, "/v1/health/checks/web")
    assert isinstance(checks, list) and [c["CheckID"] for c in checks] == ["service:web-1"]
    _, node_checks, _ = await get(http, "/v1/health/node/node1")
    assert isinstance(node_checks, list) and [c["CheckID"] for c in node_checks] == ["serfHealth"]


async def test_passing_filter_and_check_states(agent: Agent, http: aiohttp.ClientSession) -> None:
    await wait_node_registered(agent)
    await register(http, WEB)
    failing = {**WEB, "Check": {**WEB["Check"], "Status": "critical"}}  # type: ignore[dict-item]
    assert (await register(http, failing))[0] == 200
    _, passing, _ = await get(http, "/v1/health/service/web?passing")
    assert passing == []
    _, every, _ = await get(http, "/v1/health/service/web?passing=false")
    assert isinstance(every, list) and len(every) == 1
    _, critical, _ = await get(http, "/v1/health/state/critical")
    assert isinstance(critical, list) and [c["CheckID"] for c in critical] == ["service:web-1"]
    _, anything, _ = await get(http, "/v1/health/state/any")
    assert isinstance(anything, list) and len(anything) == 2  # serfHealth of node1 too
    async with http.get("/v1/health/state/fine") as r:
        assert r.status == 400 and "Invalid check state" in await r.text()


async def test_blocking_health_query_wakes_on_a_check_change(
    agent: Agent,
    http: aiohttp.ClientSession,
) -> None:
    await wait_node_registered(agent)
    await register(http, WEB)
    _, _, headers = await get(http, "/v1/health/service/web")
    index = headers["X-Consul-Index"]

    async def fail_later() -> None:
        await asyncio.sleep(0.3)
        await register(http, {**WEB, "Check": {**WEB["Check"], "Status": "critical"}})  # type: ignore[dict-item]

    t0 = time.monotonic()
    task = asyncio.create_task(fail_later())
    _, body, headers = await get(http, f"/v1/health/service/web?index={index}&wait=10s")
    await task
    assert 0.25 <= time.monotonic() - t0 < 2.0
    assert int(headers["X-Consul-Index"]) > int(index)
    assert isinstance(body, list) and body[0]["Checks"][0]["Status"] == "critical"


async def test_deregister_and_bad_requests(agent: Agent, http: aiohttp.ClientSession) -> None:
    await wait_node_registered(agent)
    await register(http, WEB)
    async with http.put("/v1/catalog/deregister", json={"Node": "box1", "ServiceID": "web-1"}) as r:
        assert r.status == 200 and await r.json() is True
    assert (await get(http, "/v1/catalog/service/web"))[1] == []
    assert "web" not in (await get(http, "/v1/catalog/services"))[1]  # type: ignore[operator]
    for body, status, text in [
        (b"{oops", 400, "decode"),
        (b"[1]", 400, "object"),
        (b'{"Address": "10.0.0.1"}', 400, "Must provide node"),
        (b'{"Node": "n"}', 400, "Must provide address"),
        (b'{"Node": "n", "Address": "a", "Service": {"Port": 1}}', 400, "service"),
        (b'{"Node": "n", "Address": "a", "Check": {"Status": "passing"}}', 400, "check"),
        (b'{"Node": "n", "Address": "a", "Datacenter": "dc2"}', 500, "No path to datacenter"),
        (b'{"Node": "n", "Address": "a", "ID": "not-a-uuid"}', 400, "UUID"),
    ]:
        async with http.put("/v1/catalog/register", data=body) as r:
            got = await r.text()
            assert r.status == status and text.lower() in got.lower(), (body, r.status, got)
    async with http.put("/v1/catalog/deregister", data=b"{}") as r:
        assert r.status == 400
    body = {"Node": "box1", "Datacenter": "dc2"}
    async with http.put("/v1/catalog/deregister", json=body) as r:
        assert r.status == 500  # another datacenter: nothing is deleted here
    _, nodes, _ = await get(http, "/v1/catalog/nodes")
    assert isinstance(nodes, list) and [n["Node"] for n in nodes] == ["box1", "node1"]
    # a check named but without an ID takes its Name as ID (Consul's Catalog.Register)
    named = {"Node": "box1", "Address": "10.1.0.1", "Check": {"Name": "disk", "Status": "passing"}}
    assert await register(http, named) == (200, "true")
    _, checks, _ = await get(http, "/v1/health/node/box1")
    assert isinstance(checks, list) and [c["CheckID"] for c in checks] == ["disk"]
    async with http.get("/v1/catalog/services?dc=dc2") as r:
        assert r.status == 500 and "No path to datacenter" in await r.text()


async def test_several_tags_select_instances_with_every_tag(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    await wait_node_registered(agent)
    for i, tags in enumerate((["prod"], ["prod", "v2"], ["v2"])):
        body = {"Node": f"t{i}", "Address": f"10.2.0.{i}",
                "Service": {"ID": f"w{i}", "Service": "w", "Tags": tags}}  # fmt: skip
        assert (await register(http, body))[0] == 200
    for path in ("/v1/catalog/service/w?tag=prod&tag=v2", "/v1/catalog/service/w?tag=v2&tag=prod"):
        _, inst, _ = await get(http, path)
        assert isinstance(inst, list) and [i["ServiceID"] for i in inst] == ["w1"], path
    _, health, _ = await get(http, "/v1/health/service/w?tag=v2&tag=prod")
    assert isinstance(health, list) and [e["Service"]["ID"] for e in health] == ["w1"]


def _svc(node: str, addr: str, name: str, status: str = "passing") -> dict[str, object]:
    svc_check = {"CheckID": f"{name}-alive", "ServiceID": f"{name}-1", "Status": status}
    return {"Node": node, "Address": addr, "Service": {"ID": f"{name}-1", "Service": name},
            "Checks": [{"CheckID": "serfHealth", "Status": "passing"}, svc_check]}  # fmt: skip


async def _timed_get(
    http: aiohttp.ClientSession, path: str
) -> tuple[object, dict[str, str], float]:
    _, body, headers = await get(http, path)
    return body, headers, time.monotonic()


async def test_a_service_watch_is_not_woken_by_other_services(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    await wait_node_registered(agent)
    assert (await register(http, _svc("box-a", "10.3.0.1", "a")))[0] == 200
    assert (await register(http, _svc("box-b", "10.3.0.2", "b")))[0] == 200
    _, _, headers = await get(http, "/v1/health/service/b")
    index = int(headers["X-Consul-Index"])
    _, _, cheaders = await get(http, "/v1/health/checks/b")
    cindex = int(cheaders["X-Consul-Index"])
    watch = asyncio.create_task(_timed_get(http, f"/v1/health/service/b?index={index}&wait=10s"))
    checks_watch = asyncio.create_task(
        _timed_get(http, f"/v1/health/checks/b?index={cindex}&wait=10s")
    )
    try:
        # writes to service a, to a's node (a serfHealth flap) and to a node without services
        assert (await register(http, _svc("box-a", "10.3.0.1", "a", "critical")))[0] == 200
        flap = {"Node": "box-a", "Address": "10.3.0.1",
                "Check": {"CheckID": "serfHealth", "Status": "critical"}}  # fmt: skip
        assert (await register(http, flap))[0] == 200
        assert (await register(http, {"Node": "box-c", "Address": "10.3.0.3"}))[0] == 200
        await asyncio.sleep(0.3)
        assert not watch.done() and not checks_watch.done()
        _, _, now = await get(http, "/v1/catalog/nodes")
        assert int(now["X-Consul-Index"]) > index  # the catalog did move meanwhile

        assert (await register(http, _svc("box-b", "10.3.0.2", "b", "critical")))[0] == 200
        written = time.monotonic()
        body, headers, returned = await asyncio.wait_for(watch, 5)
        assert returned - written < 0.1
        assert int(headers["X-Consul-Index"]) > int(now["X-Consul-Index"]) > index
        assert isinstance(body, list) and len(body) == 1
        statuses = {ch["CheckID"]: ch["Status"] for ch in body[0]["Checks"]}
        assert statuses == {"serfHealth": "passing", "b-alive": "critical"}
        cbody, cheaders, creturned = await asyncio.wait_for(checks_watch, 5)
        assert creturned - written < 0.1 and int(cheaders["X-Consul-Index"]) > cindex
        assert isinstance(cbody, list) and [ch["Status"] for ch in cbody] == ["critical"]
    finally:
        watch.cancel()
        checks_watch.cancel()


async def test_a_watch_of_a_vanishing_service_wakes_to_an_empty_list(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    await wait_node_registered(agent)
    assert (await register(http, _svc("box-b", "10.3.0.2", "b")))[0] == 200
    _, inst, headers = await get(http, "/v1/catalog/service/b")
    assert isinstance(inst, list) and len(inst) == 1
    index = int(headers["X-Consul-Index"])
    watch = asyncio.create_task(_timed_get(http, f"/v1/catalog/service/b?index={index}&wait=10s"))
    try:
        await asyncio.sleep(0.1)
        assert not watch.done()
        async with http.put("/v1/catalog/deregister", json={"Node": "box-b"}) as r:
            assert r.status == 200
        written = time.monotonic()
        body, headers, returned = await asyncio.wait_for(watch, 5)
        assert returned - written < 0.1
        assert body == [] and int(headers["X-Consul-Index"]) > index
    finally:
        watch.cancel()

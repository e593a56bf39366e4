"""/v1/catalog and /v1/health on a one-node agent (fake gossip, real Raft and HTTP)."""

# ruff: noqa: F811 - pytest fixtures imported from test_kv_api are parameters here

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from yarl import URL

from node.agent import Agent
from node.api.filter import MAX_NESTING
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


# ----- names in any case, tags in lower case -----


async def test_names_and_tags_match_in_any_case(agent: Agent, http: aiohttp.ClientSession) -> None:
    await wait_node_registered(agent)
    body = {
        "Node": "Box7",
        "Address": "10.7.0.1",
        "Service": {"ID": "Web-1", "Service": "Web", "Tags": ["Prod"], "Port": 80},
        "Check": {"CheckID": "web-alive", "ServiceID": "Web-1", "Status": "passing"},
    }
    assert (await register(http, body))[0] == 200
    other = {
        "Node": "box8",
        "Address": "10.7.0.2",
        "Service": {"ID": "web-2", "Service": "web", "Tags": ["v1"], "Port": 81},
    }
    assert (await register(http, other))[0] == 200
    for name in ("web", "Web", "WEB"):
        _, inst, _ = await get(http, f"/v1/catalog/service/{name}")
        assert isinstance(inst, list) and [i["ServiceID"] for i in inst] == ["Web-1", "web-2"]
        _, health, _ = await get(http, f"/v1/health/service/{name}")
        assert isinstance(health, list) and [e["Service"]["ID"] for e in health] == [
            "Web-1", "web-2"]  # fmt: skip
        _, checks, _ = await get(http, f"/v1/health/checks/{name}")
        assert isinstance(checks, list) and [c["CheckID"] for c in checks] == ["web-alive"]
    for tag in ("prod", "PROD"):
        _, inst, _ = await get(http, f"/v1/catalog/service/web?tag={tag}")
        assert isinstance(inst, list) and [i["ServiceID"] for i in inst] == ["Web-1"], tag
        _, health, _ = await get(http, f"/v1/health/service/WEB?tag={tag}&tag=prod")
        assert isinstance(health, list) and [e["Service"]["ID"] for e in health] == ["Web-1"]
    for node in ("box7", "BOX7", "Box7"):
        _, got, _ = await get(http, f"/v1/catalog/node/{node}")
        assert isinstance(got, dict) and got["Node"]["Node"] == "Box7"
        assert list(got["Services"]) == ["Web-1"]
        _, checks, _ = await get(http, f"/v1/health/node/{node}")
        assert isinstance(checks, list) and [c["CheckID"] for c in checks] == ["web-alive"]
    assert (await get(http, "/v1/catalog/node/box9"))[1] is None
    assert (await get(http, "/v1/health/node/box9"))[1] == []
    # /v1/catalog/services keeps each spelling, as Consul's services table does
    _, services, _ = await get(http, "/v1/catalog/services")
    assert services == {"Web": ["Prod"], "consul": [], "web": ["v1"]}


async def test_a_watch_of_Web_wakes_on_a_write_to_web(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    await wait_node_registered(agent)
    assert (await register(http, _svc("box-w", "10.3.0.9", "web")))[0] == 200
    assert (await register(http, _svc("box-a", "10.3.0.1", "a")))[0] == 200
    _, _, headers = await get(http, "/v1/health/service/Web")
    index = int(headers["X-Consul-Index"])
    watch = asyncio.create_task(_timed_get(http, f"/v1/health/service/Web?index={index}&wait=10s"))
    try:
        assert (await register(http, _svc("box-a", "10.3.0.1", "a", "critical")))[0] == 200
        await asyncio.sleep(0.2)
        assert not watch.done()  # another service's write does not wake it
        assert (await register(http, _svc("box-w", "10.3.0.9", "web", "critical")))[0] == 200
        written = time.monotonic()
        body, headers, returned = await asyncio.wait_for(watch, 5)
        assert returned - written < 0.1 and int(headers["X-Consul-Index"]) > index
        assert isinstance(body, list) and body[0]["Checks"][1]["Status"] == "critical"
    finally:
        watch.cancel()


# ----- ?node-meta= and ?filter= -----

SEED = [
    {"Node": "box1", "Address": "10.1.0.1", "NodeMeta": {"rack": "r1", "zone": "a"},
     "Service": {"ID": "web-1", "Service": "web", "Tags": ["v1", "blue"], "Port": 8080,
                 "Meta": {"version": "1.0"}},
     "Check": {"CheckID": "web-1-alive", "ServiceID": "web-1", "Status": "passing"}},
    {"Node": "box2", "Address": "10.1.0.2",
     "NodeMeta": {"rack": "r2", "zone": "a", "url": "http://x:1"},
     "Service": {"ID": "web-2", "Service": "web", "Tags": ["v2"], "Port": 8081,
                 "Meta": {"version": "2.0"}},
     "Check": {"CheckID": "web-2-alive", "ServiceID": "web-2", "Status": "critical",
               "Output": "HTTP 503"}},
]  # fmt: skip


async def _seeded(agent: Agent, http: aiohttp.ClientSession) -> None:
    await wait_node_registered(agent)
    for body in SEED:
        assert (await register(http, body))[0] == 200


def _names(body: object) -> object:
    """What identifies the items of any catalog/health answer."""
    if isinstance(body, dict):
        return sorted(body["Services"]) if "Services" in body else body
    assert isinstance(body, list)
    out = []
    for item in body:
        if "CheckID" in item:
            out.append(item["CheckID"])
        elif "Checks" in item:
            out.append(item["Service"]["ID"])
        else:
            out.append(item["ServiceID"] if "ServiceID" in item else item["Node"])
    return out


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/catalog/nodes?node-meta=rack:r1", ["box1"]),
        ("/v1/catalog/nodes?node-meta=zone:a", ["box1", "box2"]),
        ("/v1/catalog/nodes?node-meta=zone:a&node-meta=rack:r2", ["box2"]),
        ("/v1/catalog/nodes?node-meta=url:http://x:1", ["box2"]),  # split at the first colon
        ("/v1/catalog/nodes?node-meta=zone:b", []),
        ("/v1/catalog/services?node-meta=rack:r2", {"web": ["v2"]}),
        ("/v1/catalog/services?node-meta=zone:a", {"web": ["blue", "v1", "v2"]}),
        ("/v1/catalog/service/web?node-meta=rack:r2", ["web-2"]),
        ("/v1/health/service/web?node-meta=rack:r1", ["web-1"]),
        ("/v1/health/checks/web?node-meta=rack:r2", ["web-2-alive"]),
        ("/v1/health/state/any?node-meta=rack:r1", ["web-1-alive"]),
        ("/v1/health/state/critical?node-meta=zone:a", ["web-2-alive"]),
    ],
)
async def test_node_meta_keeps_what_is_on_matching_nodes(
    agent: Agent, http: aiohttp.ClientSession, path: str, expected: object
) -> None:
    await _seeded(agent, http)
    status, body, headers = await get(http, path)
    assert status == 200 and "X-Consul-Index" in headers
    assert _names(body) == expected


@pytest.mark.parametrize(
    "path",
    ["/v1/catalog/nodes", "/v1/catalog/services", "/v1/catalog/service/web",
     "/v1/health/service/web", "/v1/health/checks/web", "/v1/health/state/any"],
)  # fmt: skip
async def test_a_malformed_node_meta_is_400(
    agent: Agent, http: aiohttp.ClientSession, path: str
) -> None:
    await wait_node_registered(agent)
    for bad in ("rack", ":r1", "rack=r1"):
        async with http.get(path, params=[("node-meta", "zone:a"), ("node-meta", bad)]) as r:
            text = await r.text()
            assert r.status == 400 and "Invalid node-meta filter" in text and bad in text


@pytest.mark.parametrize(
    ("path", "expression", "expected"),
    [
        ("/v1/catalog/nodes", 'Meta.rack == "r1"', ["box1"]),
        ("/v1/catalog/nodes", "Meta is empty", ["node1"]),
        ("/v1/catalog/services", "ServiceTags contains v2", {"web": ["v2"]}),
        ("/v1/catalog/services", 'ServiceName == "consul" or NodeMeta.rack == r1',
         {"consul": [], "web": ["blue", "v1"]}),
        ("/v1/catalog/service/web", "NodeMeta.rack == r2", ["web-2"]),
        ("/v1/catalog/service/web", 'ServiceMeta.version matches "^1\\\\."', ["web-1"]),
        ("/v1/catalog/service/web", "ServicePort == 8080 and v1 in ServiceTags", ["web-1"]),
        ("/v1/catalog/node/box1", "Port == 8080", ["web-1"]),
        ("/v1/catalog/node/box1", "Port == 1", []),
        ("/v1/health/service/web", "Checks.Status == critical", ["web-2"]),
        ("/v1/health/service/web", 'Node.Meta["zone"] == a and Service.Meta.version != "2.0"',
         ["web-1"]),
        ("/v1/health/checks/web", "Status == passing", ["web-1-alive"]),
        ("/v1/health/checks/web", 'Output contains "503"', ["web-2-alive"]),
        ("/v1/health/node/box2", "Status != passing", ["web-2-alive"]),
        ("/v1/health/node/node1", "ServiceName != \"\"", []),
        ("/v1/health/state/any", "ServiceName == web", ["web-1-alive", "web-2-alive"]),
        ("/v1/health/state/passing", "CheckID == serfHealth", ["serfHealth"]),
    ],
)  # fmt: skip
async def test_filter_runs_on_each_item_of_the_answer(
    agent: Agent, http: aiohttp.ClientSession, path: str, expression: str, expected: object
) -> None:
    await _seeded(agent, http)
    async with http.get(path, params={"filter": expression}) as r:
        assert r.status == 200, await r.text()
        assert "X-Consul-Index" in r.headers
        assert _names(await r.json()) == expected


async def test_passing_reads_as_gos_parse_bool(agent: Agent, http: aiohttp.ClientSession) -> None:
    """Review 1.8: Consul reads ?passing with strconv.ParseBool (present but empty: true) and
    answers 400 to anything else; `?passing=f` used to mean passing-only here, and so did
    `?passing=garbage`."""
    await _seeded(agent, http)  # web-1 passing, web-2 critical
    only, every = ["web-1"], ["web-1", "web-2"]
    cases = [("", every), ("?passing", only), ("?passing=", only)]
    cases += [(f"?passing={v}", only) for v in ("1", "t", "T", "TRUE", "true", "True")]
    cases += [(f"?passing={v}", every) for v in ("0", "f", "F", "FALSE", "false", "False")]
    for query, expected in cases:
        status, body, _ = await get(http, "/v1/health/service/web" + query)
        assert (status, _names(body)) == (200, expected), query
    for bad in ("garbage", "yes", "tRUE", "2", "%20"):
        async with http.get(URL(f"/v1/health/service/web?passing={bad}", encoded=True)) as r:
            assert (r.status, await r.text()) == (400, "Invalid value for ?passing"), bad


async def test_a_long_filter_chain_is_answered(agent: Agent, http: aiohttp.ClientSession) -> None:
    """Review 1.2 over real HTTP: 1000 `or` clauses (a request line under aiohttp's 8190
    bytes) made the parser raise RecursionError, answered as a 500."""
    await _seeded(agent, http)

    async def answer(expression: str) -> tuple[int, object]:
        url = URL("/v1/catalog/service/web?filter=" + expression.replace(" ", "+"), encoded=True)
        async with http.get(url) as r:
            return r.status, (await r.json() if r.status == 200 else await r.text())

    assert await answer(" or ".join(["a==b"] * 1000)) == (
        400,
        'Failed to create boolean expression evaluator: Selector "a" is not valid',
    )
    status, body = await answer(" or ".join(["ID==x"] * 850 + ["Node==box2"]))
    assert (status, _names(body)) == (200, ["web-2"])
    status, body = await answer(" and ".join(["ID!=x"] * 750 + ["Node==box2"]))
    assert (status, _names(body)) == (200, ["web-2"])
    # the deepest nesting the parser takes also fits the stack under a request handler
    deep = "Node==box1"
    for _ in range(MAX_NESTING + 1):
        deep = f"(ID==x or ServiceName==web and {deep})"
    status, body = await answer(deep)
    assert (status, _names(body)) == (200, ["web-1"])


@pytest.mark.timeout(30)  # Python's re took hours on this; RE2 takes microseconds
async def test_a_catastrophic_regex_does_not_stall_the_agent(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    """Review 1.1 over real HTTP: a registered value and one GET could freeze the event loop
    (Raft, gossip and DNS with it) while a backtracking engine tried 2^40 ways. (Should that
    come back, the timeout's signal breaks into the match and the request's own timeout, run
    out by then, fails the test instead of leaving it waiting for an answer.)"""
    await wait_node_registered(agent)
    service = {**WEB["Service"], "Meta": {"v": "a" * 40 + "!"}}  # type: ignore[dict-item]
    body = {**WEB, "Service": service}
    assert (await register(http, body))[0] == 200
    for pattern, expected in (("^(a+)+$", []), ("^(a+)+!$", ["web-1"])):
        params = {"filter": f'ServiceMeta.v matches "{pattern}"'}
        limit = aiohttp.ClientTimeout(total=10)
        async with http.get("/v1/catalog/service/web", params=params, timeout=limit) as r:
            assert r.status == 200, await r.text()
            assert _names(await r.json()) == expected


@pytest.mark.parametrize(
    "path",
    ["/v1/catalog/nodes", "/v1/catalog/services", "/v1/catalog/service/web",
     "/v1/catalog/node/box1", "/v1/health/service/web", "/v1/health/checks/web",
     "/v1/health/node/box1", "/v1/health/state/any"],
)  # fmt: skip
async def test_a_bad_filter_is_400_with_consuls_message(
    agent: Agent, http: aiohttp.ClientSession, path: str
) -> None:
    await wait_node_registered(agent)
    for expression, detail in (("Bogus == 1", 'Selector "Bogus" is not valid'),
                               ("foo", "1:4 (3): no match found, expected: ")):  # fmt: skip
        t0 = time.monotonic()
        async with http.get(path, params={"filter": expression, "index": "1",
                                          "wait": "10s"}) as r:  # fmt: skip
            assert r.status == 400
            assert (await r.text()).startswith(
                "Failed to create boolean expression evaluator: " + detail
            )
        assert time.monotonic() - t0 < 2  # refused before it could block


# ----- every blocking read: times out with the same index, wakes early on a write -----


@dataclass
class Ctx:
    http: aiohttp.ClientSession
    agent: Agent
    session: str = ""


async def _ok(r: aiohttp.ClientResponse) -> None:
    assert r.status == 200, await r.text()


async def _reg(ctx: Ctx, body: dict[str, object]) -> None:
    async with ctx.http.put("/v1/catalog/register", json=body) as r:
        await _ok(r)


def _web_check(status: str) -> dict[str, object]:
    return {**WEB, "Check": {**WEB["Check"], "Status": status}}  # type: ignore[dict-item]


async def _put(ctx: Ctx, key: str, value: bytes = b"x") -> None:
    async with ctx.http.put(f"/v1/kv/{key}", data=value) as r:
        await _ok(r)


async def _new_session(ctx: Ctx) -> None:
    async with ctx.http.put("/v1/session/create", json={"Name": "another"}) as r:
        await _ok(r)


async def _destroy_session(ctx: Ctx) -> None:
    async with ctx.http.put(f"/v1/session/destroy/{ctx.session}") as r:
        await _ok(r)


async def _fire(ctx: Ctx) -> None:
    async with ctx.http.put("/v1/event/fire/deploy", data=b"again") as r:
        await _ok(r)


BLOCKING_READS: list[tuple[str, Callable[[Ctx], Awaitable[None]]]] = [
    ("/v1/catalog/nodes", lambda ctx: _reg(ctx, {"Node": "box9", "Address": "10.9.0.1"})),
    ("/v1/catalog/services", lambda ctx: _reg(ctx, {"Node": "box9", "Address": "10.9.0.1",
                                                    "Service": {"Service": "db"}})),
    ("/v1/catalog/service/web", lambda ctx: _reg(ctx, {**WEB, "Service": {
        **WEB["Service"], "Port": 9090}})),  # type: ignore[dict-item]
    ("/v1/catalog/node/box1", lambda ctx: _reg(ctx, {"Node": "box1", "Address": "10.1.0.1",
                                                     "Service": {"Service": "extra"}})),
    ("/v1/health/service/web", lambda ctx: _reg(ctx, _web_check("critical"))),
    ("/v1/health/checks/web", lambda ctx: _reg(ctx, _web_check("warning"))),
    ("/v1/health/node/box1", lambda ctx: _reg(ctx, _web_check("critical"))),
    ("/v1/health/state/critical", lambda ctx: _reg(ctx, _web_check("critical"))),
    ("/v1/health/state/any", lambda ctx: _reg(ctx, _web_check("warning"))),
    ("/v1/kv/blk/key", lambda ctx: _put(ctx, "blk/key", b"changed")),
    ("/v1/kv/blk/?recurse", lambda ctx: _put(ctx, "blk/other")),
    ("/v1/kv/blk/?keys", lambda ctx: _put(ctx, "blk/new")),
    ("/v1/session/info/{session}", _destroy_session),
    ("/v1/session/list", _new_session),
    ("/v1/session/node/node1", _new_session),
    ("/v1/event/list", _fire),
]  # fmt: skip


async def _blocked(http: aiohttp.ClientSession, path: str) -> tuple[int, dict[str, str], float]:
    async with http.get(path) as r:
        await r.read()
        return r.status, dict(r.headers), time.monotonic()


@pytest.mark.parametrize(("path", "write"), BLOCKING_READS, ids=[p for p, _ in BLOCKING_READS])
async def test_every_blocking_read(
    agent: Agent, http: aiohttp.ClientSession, path: str, write: Callable[[Ctx], Awaitable[None]]
) -> None:
    await wait_node_registered(agent)
    ctx = Ctx(http, agent)
    await _reg(ctx, WEB)
    await _put(ctx, "blk/key")
    async with http.put("/v1/session/create", json={"Name": "watched"}) as r:
        ctx.session = (await r.json())["ID"]
    async with http.put("/v1/event/fire/deploy", data=b"v1") as r:
        await _ok(r)
    for _ in range(50):  # the event reaches the agent's list through its event pump
        if (await get(http, "/v1/event/list"))[1]:
            break
        await asyncio.sleep(0.01)
    path = path.format(session=ctx.session)
    sep = "&" if "?" in path else "?"
    status, _, headers = await get(http, path)
    assert status == 200
    index = headers["X-Consul-Index"]
    assert int(index) >= 1

    # nothing changes: the full wait (plus at most wait/16 of jitter), and the same index
    t0 = time.monotonic()
    status, _, headers = await get(http, f"{path}{sep}index={index}&wait=300ms")
    waited = time.monotonic() - t0
    assert status == 200 and headers["X-Consul-Index"] == index
    assert 0.3 <= waited < 0.3 + 0.3 / 16 + 1.0

    # a relevant write: back within 100 ms of the write's answer, with a new index
    task = asyncio.create_task(_blocked(http, f"{path}{sep}index={index}&wait=10s"))
    try:
        await asyncio.sleep(0.05)
        assert not task.done()
        await write(ctx)
        written = time.monotonic()
        status, headers, returned = await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert status == 200 and returned - written < 0.1, (status, returned - written)
    if path == "/v1/event/list":  # an event index is a hash of the newest event: it changes
        assert headers["X-Consul-Index"] != index
    else:
        assert int(headers["X-Consul-Index"]) > int(index)


async def test_reads_of_missing_things_carry_an_index_and_block(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    await wait_node_registered(agent)
    await _put(Ctx(http, agent), "elsewhere")
    # an unknown KV key is a 404 with X-Consul-Index; it blocks like a found one
    status, _, headers = await get(http, "/v1/kv/absent")
    assert status == 404 and int(headers["X-Consul-Index"]) >= 1
    index = headers["X-Consul-Index"]
    t0 = time.monotonic()
    status, _, headers = await get(http, f"/v1/kv/absent?index={index}&wait=300ms")
    assert status == 404 and headers["X-Consul-Index"] == index
    assert headers["X-Consul-KnownLeader"] == "true" and time.monotonic() - t0 >= 0.3
    task = asyncio.create_task(_blocked(http, f"/v1/kv/absent?index={index}&wait=10s"))
    try:
        await asyncio.sleep(0.05)
        assert not task.done()
        await _put(Ctx(http, agent), "absent")
        written = time.monotonic()
        status, headers, returned = await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
    assert status == 200 and returned - written < 0.1
    assert int(headers["X-Consul-Index"]) > int(index)
    # an unknown session: Consul answers 200 [] (py-consul's info() gives None), with an
    # index, and the read blocks all the same
    ghost = str(uuid.uuid4())
    status, body, headers = await get(http, f"/v1/session/info/{ghost}")
    assert status == 200 and body == [] and int(headers["X-Consul-Index"]) >= 1
    index = headers["X-Consul-Index"]
    t0 = time.monotonic()
    status, body, headers = await get(http, f"/v1/session/info/{ghost}?index={index}&wait=300ms")
    assert body == [] and headers["X-Consul-Index"] == index and time.monotonic() - t0 >= 0.3

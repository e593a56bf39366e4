"""/v1/agent/service* and /v1/agent/check* on a one-node agent, with the check runners and
anti-entropy carrying everything into the catalog (fake gossip, real Raft and HTTP); the tests
marked cluster drive real `meshnode agent` processes."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from node.agent import Agent
from node.antientropy import AntiEntropy
from node.consensus import Consensus
from node.local import LocalState
from node.raft.runtime import NoLeader
from tests.harness.agents import AgentProc, wait_until
from tests.test_http_api import FakeRuntime, FakeWorld, make_config

AgentMaker = Callable[..., Awaitable[Agent]]


@pytest.fixture
async def make_agent(tmp_path: Path) -> AsyncIterator[AgentMaker]:
    """A started one-node agent; keyword arguments go to its AntiEntropy."""
    started: list[Agent] = []

    async def make(**anti_entropy: Any) -> Agent:
        a = Agent(make_config(tmp_path, dev=True, server_port=0),
                  runtime_factory=partial(FakeRuntime, FakeWorld()))  # fmt: skip
        a.add_component(Consensus(a))
        a.add_component(AntiEntropy(a, **anti_entropy))
        await a.start()
        started.append(a)
        return a

    try:
        yield make
    finally:
        for a in started:
            await a.stop()


@pytest.fixture
async def agent(make_agent: AgentMaker) -> Agent:
    return await make_agent()


def client(agent: Agent) -> aiohttp.ClientSession:
    assert agent.http is not None
    return aiohttp.ClientSession(f"http://127.0.0.1:{agent.http.port}")


@pytest.fixture
async def http(agent: Agent) -> AsyncIterator[aiohttp.ClientSession]:
    async with client(agent) as s:
        yield s


def anti_entropy(agent: Agent) -> AntiEntropy:
    return next(c for c in agent.components if isinstance(c, AntiEntropy))


async def within(pred: Callable[[], Awaitable[bool]], limit: float) -> float:
    """Poll pred every 10 ms; fail unless it holds within `limit` s; return how long it took."""
    start = time.monotonic()
    while not await pred():
        if time.monotonic() - start > limit:
            pytest.fail(f"condition not reached within {limit} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def put(http: aiohttp.ClientSession, path: str, body: Any = None) -> tuple[int, str]:
    async with http.put(path, json=body) as r:
        return r.status, await r.text()


async def get(http: aiohttp.ClientSession, path: str) -> Any:
    async with http.get(path) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def eventually(pred: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.05)


async def catalog_checks(http: aiohttp.ClientSession, service: str) -> dict[str, str]:
    return {c["CheckID"]: c["Status"] for c in await get(http, f"/v1/health/checks/{service}")}


async def test_ttl_check_lifecycle_reaches_the_catalog(http: aiohttp.ClientSession) -> None:
    body = {"Name": "api", "ID": "api-1", "Port": 9000, "Tags": ["v1"], "Check": {"TTL": "1s"}}
    assert await put(http, "/v1/agent/service/register", body) == (200, "")
    svc = (await get(http, "/v1/agent/services"))["api-1"]
    assert (svc["Service"], svc["Port"], svc["Tags"]) == ("api", 9000, ["v1"])
    assert (await get(http, "/v1/agent/service/api-1"))["ID"] == "api-1"
    chk = (await get(http, "/v1/agent/checks"))["service:api-1"]
    assert chk["Status"] == "critical" and chk["ServiceID"] == "api-1"  # TTL checks start critical

    async def catalog_has(status: str) -> bool:
        return (await catalog_checks(http, "api")).get("service:api-1") == status

    await eventually(lambda: catalog_has("critical"))
    assert await put(http, "/v1/agent/check/pass/service:api-1?note=ok") == (200, "")
    await eventually(lambda: catalog_has("passing"))
    assert len(await get(http, "/v1/health/service/api?passing")) == 1
    await eventually(lambda: catalog_has("critical"), timeout=5)  # the TTL ran out
    chk = (await get(http, "/v1/agent/checks"))["service:api-1"]
    assert chk["Output"] == "TTL expired (last output before timeout follows): ok"
    assert await put(http, "/v1/agent/check/update/service:api-1",
                     {"Status": "warning", "Output": "slow"}) == (200, "")  # fmt: skip
    await eventually(lambda: catalog_has("warning"))

    assert await put(http, "/v1/agent/service/deregister/api-1") == (200, "")
    await eventually(lambda: _no_service(http, "api"))
    assert (await put(http, "/v1/agent/service/deregister/api-1"))[0] == 404


async def _no_service(http: aiohttp.ClientSession, name: str) -> bool:
    return name not in await get(http, "/v1/catalog/services")


async def test_http_and_tcp_checks_follow_the_target(http: aiohttp.ClientSession) -> None:
    healthy = {"ok": True}

    async def health(_: web.Request) -> web.Response:
        return web.Response(status=200 if healthy["ok"] else 503, text="state")

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        body = {"Name": "web", "Port": port, "Checks": [
            {"HTTP": f"http://127.0.0.1:{port}/health", "Interval": "200ms"},
            {"TCP": f"127.0.0.1:{port}", "Interval": "200ms", "Timeout": "1s"},
        ]}  # fmt: skip
        assert await put(http, "/v1/agent/service/register", body) == (200, "")

        async def statuses(want: dict[str, str]) -> bool:
            return await catalog_checks(http, "web") == want

        await eventually(lambda: statuses({"service:web:1": "passing",
                                           "service:web:2": "passing"}))  # fmt: skip
        # a status change reaches the catalog within one interval (200ms is clamped to 1 s)
        healthy["ok"] = False
        await within(lambda: statuses({"service:web:1": "critical",
                                       "service:web:2": "passing"}), 1.0 + 0.5)  # fmt: skip
        out = (await get(http, "/v1/agent/checks"))["service:web:1"]["Output"]
        assert "503" in out
    finally:
        await runner.cleanup()
    await within(lambda: statuses({"service:web:1": "critical",
                                   "service:web:2": "critical"}), 1.0 + 0.5)  # fmt: skip


async def test_anti_entropy_repairs_the_catalog_and_state_survives_a_restart(
    agent: Agent, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    body = {"Name": "db", "Port": 5432, "Check": {"TTL": "30s", "Status": "passing"}}
    assert await put(http, "/v1/agent/service/register", body) == (200, "")
    await eventually(lambda: _has_service(http, "db"))
    # a write lost, or someone removed it behind the agent's back: the next sync restores it
    assert await put(http, "/v1/catalog/deregister", {"Node": "node1", "ServiceID": "db"}) == (
        200, "true",
    )  # fmt: skip
    assert await _no_service(http, "db")
    ae = next(c for c in agent.components if isinstance(c, AntiEntropy))
    assert await ae.sync_once() >= 1
    assert await _has_service(http, "db")
    assert await ae.sync_once() == 0  # converged: nothing more to write
    # what the agent owns is on disk: a restarted agent knows it again
    again = LocalState(tmp_path / "data" / "local-services.json")
    again.load()
    assert list(again.services) == ["db"] and list(again.checks) == ["service:db"]


async def _has_service(http: aiohttp.ClientSession, name: str) -> bool:
    return name in await get(http, "/v1/catalog/services")


async def test_critical_services_are_deregistered_after_the_grace_period(
    http: aiohttp.ClientSession,
) -> None:
    body = {"Name": "flaky", "Check": {"TTL": "10s", "DeregisterCriticalServiceAfter": "300ms"}}
    assert await put(http, "/v1/agent/service/register", body) == (200, "")
    await eventually(lambda: _has_service(http, "flaky"))
    await eventually(lambda: _no_service(http, "flaky"), timeout=15)
    assert "flaky" not in await get(http, "/v1/agent/services")


async def test_bad_registrations_are_refused(http: aiohttp.ClientSession) -> None:
    for body, text in [
        ({"Port": 1}, "Missing service name"),
        ({"Name": "x", "Port": 70000}, "Port"),
        ({"Name": "x", "Tags": "a"}, "Tags"),
        ({"Name": "x", "Check": {"TTL": "1s", "HTTP": "http://h/"}}, "several kinds"),
        ({"Name": "x", "Check": {"HTTP": "http://h/"}}, "Interval"),
        ({"Name": "x", "Check": {"Args": ["true"], "Interval": "1s"}}, "--enable-script-checks"),
        ({"Name": "x", "Check": {"TTL": "soon"}}, "TTL"),
        ({"Name": "x", "Check": {"Name": "nothing to run"}}, "Must provide TTL"),
    ]:
        status, msg = await put(http, "/v1/agent/service/register", body)
        assert status == 400 and text in msg, (body, status, msg)
    async with http.put("/v1/agent/service/register", data=b"{nope") as r:
        assert r.status == 400
    status, msg = await put(
        http, "/v1/agent/check/register", {"Name": "c", "TTL": "5s", "ServiceID": "ghost"}
    )
    assert status == 400 and "ghost" in msg
    assert await put(http, "/v1/agent/check/register", {"ID": "anon", "TTL": "5s"}) == (
        400, "Missing check name")  # fmt: skip
    assert (await put(http, "/v1/agent/check/pass/nothing"))[0] == 404
    assert await put(http, "/v1/agent/check/register", {"Name": "m", "TTL": "5s"}) == (200, "")
    status, msg = await put(http, "/v1/agent/check/update/m", {"Status": "great"})
    assert status == 400 and "Status" in msg
    assert await get(http, "/v1/agent/services") == {}


async def test_a_ttl_update_rearms_the_timer_exactly(http: aiohttp.ClientSession) -> None:
    assert await put(http, "/v1/agent/check/register", {"Name": "beat", "TTL": "300ms"}) == (
        200, "",
    )  # fmt: skip
    for _ in range(4):  # updates faster than the TTL keep it passing, never a flap
        assert await put(http, "/v1/agent/check/pass/beat") == (200, "")
        await asyncio.sleep(0.15)
        assert (await get(http, "/v1/agent/checks"))["beat"]["Status"] == "passing"
    t0 = time.monotonic()
    while (await get(http, "/v1/agent/checks"))["beat"]["Status"] == "passing":
        await asyncio.sleep(0.01)
    assert time.monotonic() - t0 < 0.3  # critical within the TTL after the last update


async def test_service_read_blocks_on_its_content_hash(http: aiohttp.ClientSession) -> None:
    """Consul's hash-based blocking on /v1/agent/service/<id>: ?hash= waits until the service
    differs, check updates alone do not wake it, ?wait= bounds it."""
    body = {"Name": "hb", "Port": 1, "Check": {"TTL": "30s"}}
    assert await put(http, "/v1/agent/service/register", body) == (200, "")
    async with http.get("/v1/agent/service/hb") as r:
        assert r.status == 200
        digest = r.headers["X-Consul-ContentHash"]
    async with http.get("/v1/agent/service/hb?hash=nothing-like-it&wait=5s") as r:
        assert r.headers["X-Consul-ContentHash"] == digest  # a different hash: answered at once

    start = time.monotonic()
    async with http.get(f"/v1/agent/service/hb?hash={digest}&wait=300ms") as r:
        assert r.status == 200 and r.headers["X-Consul-ContentHash"] == digest
    assert 0.3 <= time.monotonic() - start < 2.0

    async def watch() -> tuple[float, dict[str, Any], str]:
        async with http.get(f"/v1/agent/service/hb?hash={digest}&wait=10s") as r:
            return time.monotonic(), await r.json(), r.headers["X-Consul-ContentHash"]

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    assert await put(http, "/v1/agent/check/pass/service:hb") == (200, "")  # not the service
    await asyncio.sleep(0.3)
    assert not watcher.done()
    changed_at = time.monotonic()
    assert await put(http, "/v1/agent/service/register", body | {"Port": 2}) == (200, "")
    woke_at, svc, new_digest = await asyncio.wait_for(watcher, 5)
    assert svc["Port"] == 2 and new_digest != digest
    assert woke_at - changed_at < 0.1, "a change wakes the watcher within 100 ms"

    async def watch_status() -> int:
        async with http.get(f"/v1/agent/service/hb?hash={new_digest}&wait=10s") as r:
            return r.status

    gone = asyncio.create_task(watch_status())
    await asyncio.sleep(0.2)
    assert not gone.done()
    assert await put(http, "/v1/agent/service/deregister/hb") == (200, "")
    assert await asyncio.wait_for(gone, 2) == 404  # a deregistration ends the wait


async def test_registration_keeps_what_consul_keeps_in_any_key_case(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    """TaggedAddresses, SocketPath, Locality, Weights and EnableTagOverride survive into the
    agent view and the catalog, sent in snake_case as py-consul and config files do."""
    body = {
        "name": "web", "id": "web-1", "port": 8080, "address": "10.0.0.5",
        "enable_tag_override": True, "socket_path": "/run/web.sock",
        "tagged_addresses": {"lan_ipv4": {"address": "10.0.0.5", "port": 8080},
                             "wan": {"address": "198.18.0.5", "port": 80}},
        "locality": {"region": "eu-west", "zone": "a"},
        "weights": {"passing": 3, "warning": 2},
    }  # fmt: skip
    assert await put(http, "/v1/agent/service/register", body) == (200, "")
    tagged = {"lan_ipv4": {"Address": "10.0.0.5", "Port": 8080},
              "wan": {"Address": "198.18.0.5", "Port": 80}}  # fmt: skip
    svc = await get(http, "/v1/agent/service/web-1")
    assert svc["TaggedAddresses"] == tagged
    assert (svc["EnableTagOverride"], svc["SocketPath"]) == (True, "/run/web.sock")
    assert svc["Locality"] == {"Region": "eu-west", "Zone": "a"}
    assert svc["Weights"] == {"Passing": 3, "Warning": 2}

    async def in_catalog() -> bool:
        return bool(await get(http, "/v1/catalog/service/web"))

    await eventually(in_catalog)
    [entry] = await get(http, "/v1/catalog/service/web")
    assert entry["ServiceTaggedAddresses"] == tagged
    assert (entry["ServiceEnableTagOverride"], entry["ServiceSocketPath"]) == (
        True, "/run/web.sock",
    )  # fmt: skip
    assert entry["ServiceLocality"] == {"Region": "eu-west", "Zone": "a"}
    assert entry["ServiceWeights"] == {"Passing": 3, "Warning": 2}
    [health] = await get(http, "/v1/health/service/web")
    assert health["Service"]["TaggedAddresses"] == tagged
    assert await anti_entropy(agent).sync_once() == 0  # the catalog equals the agent's view

    # an address nobody can dial is refused, as Consul does; nothing is registered
    for address in ("0.0.0.0", "::", "[::]"):
        assert await put(http, "/v1/agent/service/register", {"Name": "any", "Address": address}
                         ) == (400, "Invalid service address")  # fmt: skip
    bad_tagged = {"Name": "any", "TaggedAddresses": {"wan_ipv4": {"Address": "::1", "Port": 1}}}
    status, msg = await put(http, "/v1/agent/service/register", bad_tagged)
    assert (status, msg) == (400, "Service tagged address 'wan_ipv4' must be a valid ipv4 address")
    assert set(await get(http, "/v1/agent/services")) == {"web-1"}
    plain = await put(http, "/v1/agent/service/register", {"Name": "plain"})
    assert plain == (200, "")
    assert "TaggedAddresses" not in await get(http, "/v1/agent/service/plain")  # omitempty


async def test_default_check_names_are_consuls(http: aiohttp.ClientSession) -> None:
    body = {"Name": "api", "ID": "api-1",
            "Checks": [{"TTL": "30s"}, {"TTL": "30s", "Name": "mine"}]}  # fmt: skip
    assert await put(http, "/v1/agent/service/register", body) == (200, "")
    checks = await get(http, "/v1/agent/checks")
    assert checks["service:api-1:1"]["Name"] == "Service 'api' check"
    assert checks["service:api-1:2"]["Name"] == "mine"

    async def named() -> bool:
        got = {c["CheckID"]: c["Name"] for c in await get(http, "/v1/health/checks/api")}
        return got == {"service:api-1:1": "Service 'api' check", "service:api-1:2": "mine"}

    await eventually(named)


async def test_a_sidecar_service_is_registered_beside_its_service(
    http: aiohttp.ClientSession,
) -> None:
    """Consul's Connect.SidecarService: sugar for a second service `<id>-sidecar-proxy` (kind
    connect-proxy, a port from 21000 unless given, the rest inherited), not kept on the
    service it fronts; deregistering the service removes its sidecar."""
    body = {
        "name": "web",
        "port": 8080,
        "tags": ["v1"],
        "connect": {
            "sidecar_service": {
                "proxy": {"upstreams": [{"destination_name": "db", "local_bind_port": 9191}]}
            }
        },
    }
    assert await put(http, "/v1/agent/service/register", body) == (200, "")
    assert (await get(http, "/v1/agent/service/web"))["Connect"] is None
    sidecar = await get(http, "/v1/agent/service/web-sidecar-proxy")
    assert (sidecar["Service"], sidecar["Kind"], sidecar["Port"], sidecar["Tags"]) == (
        "web-sidecar-proxy", "connect-proxy", 21000, ["v1"],
    )  # fmt: skip
    assert sidecar["Proxy"] == {
        "DestinationServiceName": "web", "DestinationServiceID": "web",
        "LocalServiceAddress": "127.0.0.1", "LocalServicePort": 8080,
        "Upstreams": [{"DestinationName": "db", "LocalBindPort": 9191}],
    }  # fmt: skip
    checks = await get(http, "/v1/agent/checks")
    listening = checks["service:web-sidecar-proxy:1"]
    assert (listening["Name"], listening["Type"]) == ("Connect Sidecar Listening", "tcp")

    # one given as a full definition appears as given; a native service keeps its Connect
    own = {"Name": "api", "Port": 9000, "Connect": {"Native": True, "SidecarService": {
        "Port": 21555, "Meta": {"team": "x"},
        "Checks": [{"Name": "proxy up", "TTL": "30s", "Status": "passing"}]}}}  # fmt: skip
    assert await put(http, "/v1/agent/service/register", own) == (200, "")
    assert (await get(http, "/v1/agent/service/api"))["Connect"] == {"Native": True}
    api_sidecar = await get(http, "/v1/agent/service/api-sidecar-proxy")
    assert (api_sidecar["Port"], api_sidecar["Meta"]) == (21555, {"team": "x"})
    assert (await get(http, "/v1/agent/checks"))["service:api-sidecar-proxy"]["Name"] == (
        "proxy up"
    )  # fmt: skip

    async def catalog_sidecar() -> bool:
        found = await get(http, "/v1/catalog/service/web-sidecar-proxy")
        return bool(found) and found[0]["ServiceKind"] == "connect-proxy"

    await eventually(catalog_sidecar)
    [entry] = await get(http, "/v1/catalog/service/web-sidecar-proxy")
    assert entry["ServicePort"] == 21000 and entry["ServiceProxy"] == sidecar["Proxy"]
    # re-registering keeps the sidecar's port; another service's sidecar gets the next one
    assert await put(http, "/v1/agent/service/register", body) == (200, "")
    assert (await get(http, "/v1/agent/service/web-sidecar-proxy"))["Port"] == 21000
    other = {"Name": "cache", "Connect": {"SidecarService": {}}}
    assert await put(http, "/v1/agent/service/register", other) == (200, "")
    assert (await get(http, "/v1/agent/service/cache-sidecar-proxy"))["Port"] == 21001

    nested = {"Name": "n", "Connect": {"SidecarService": {"Connect": {"SidecarService": {}}}}}
    status, msg = await put(http, "/v1/agent/service/register", nested)
    assert status == 400 and msg.startswith("Invalid SidecarService")
    assert await put(http, "/v1/agent/service/deregister/web") == (200, "")
    assert "web-sidecar-proxy" not in await get(http, "/v1/agent/services")
    await eventually(lambda: _no_service(http, "web-sidecar-proxy"))


async def test_script_checks_run_in_an_agent_that_allows_them(make_agent: AgentMaker) -> None:
    """Exit 0/1/2 are passing/warning/critical, stdout is the Output in the agent's view and
    in the catalog, and a Timeout makes the check critical."""
    agent = await make_agent(scripts=True)

    def script(code: str) -> list[str]:
        return [sys.executable, "-c", f"import sys, time; {code}"]

    body = {"Name": "scripted", "Checks": [
        {"Args": script("print('all good')"), "Interval": "1s"},
        {"Args": script("print('so-so'); sys.exit(1)"), "Interval": "1s"},
        {"Args": script("print('broken'); sys.exit(2)"), "Interval": "1s"},
        {"Args": script("print('starting', flush=True); time.sleep(30)"), "Interval": "1s",
         "Timeout": "500ms"},
    ]}  # fmt: skip
    want = {
        "service:scripted:1": ("passing", "all good\n"),
        "service:scripted:2": ("warning", "so-so\n"),
        "service:scripted:3": ("critical", "broken\n"),
        "service:scripted:4": ("critical", "Timed out (500ms) running check\n\nstarting\n"),
    }
    async with client(agent) as http:
        assert await put(http, "/v1/agent/service/register", body) == (200, "")

        async def agent_view() -> bool:
            got = await get(http, "/v1/agent/checks")
            return {k: (v["Status"], v["Output"]) for k, v in got.items()} == want

        async def catalog_view() -> bool:
            got = await get(http, "/v1/health/checks/scripted")
            return {c["CheckID"]: (c["Status"], c["Output"]) for c in got} == want

        await within(agent_view, 5.0)  # each runs at once, the timeout after 0.5 s
        await within(catalog_view, 1.0)


async def test_an_http_check_of_the_agent_itself_passes_within_1_5_s(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    """py-consul's suite points an HTTP check at the agent's own address, Interval 1s, and
    expects it passing in the catalog within 1.5 s [T]."""
    assert agent.http is not None
    url = f"http://127.0.0.1:{agent.http.port}/v1/agent/self"
    body = {"Name": "selfie", "Check": {"HTTP": url, "Interval": "1s"}}
    assert await put(http, "/v1/agent/service/register", body) == (200, "")

    async def passing() -> bool:
        return await catalog_checks(http, "selfie") == {"service:selfie": "passing"}

    await within(passing, 1.5)


async def test_a_registration_is_in_health_within_200_ms(http: aiohttp.ClientSession) -> None:
    """py-consul's tests read /v1/health/service 40-200 ms after registering [T]; the median
    of a few runs keeps a loaded machine from deciding."""
    took = []
    for i in range(5):
        body = {"Name": f"quick{i}", "Port": 80, "Check": {"TTL": "30s"}}
        assert await put(http, "/v1/agent/service/register", body) == (200, "")

        async def listed(name: str = f"quick{i}") -> bool:
            return len(await get(http, f"/v1/health/service/{name}")) == 1

        took.append(await within(listed, 5.0))
    assert statistics.median(took) < 0.2, took


async def test_periodic_sync_restores_what_was_removed_behind_the_agents_back(
    make_agent: AgentMaker,
) -> None:
    """Consul's full sync: an entry removed with /v1/catalog/deregister (a service, then the
    whole node) comes back on the next periodic sync, without any local change."""
    agent = await make_agent(sync_interval=0.5)
    ae = anti_entropy(agent)
    async with client(agent) as http:
        body = {"Name": "db", "Port": 5432, "Check": {"TTL": "30s", "Status": "passing"}}
        assert await put(http, "/v1/agent/service/register", body) == (200, "")
        await eventually(lambda: _has_service(http, "db"))
        for removal in ({"Node": "node1", "ServiceID": "db"}, {"Node": "node1"}):
            syncs = ae.syncs
            assert await put(http, "/v1/catalog/deregister", removal) == (200, "true")
            assert await _no_service(http, "db")
            await within(lambda: _has_service(http, "db"), 0.5 + 1.0)
            assert ae.syncs > syncs
            assert await catalog_checks(http, "db") == {"service:db": "passing"}


async def test_a_sync_without_a_leader_is_retried_after_a_second(
    agent: Agent, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    consensus = agent.consensus
    assert consensus is not None
    real_write = consensus.write
    attempts: list[float] = []

    async def flaky_write(command: bytes, timeout: float = 10.0) -> Any:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise NoLeader("an election is running")
        return await real_write(command, timeout)

    monkeypatch.setattr(consensus, "write", flaky_write)
    assert await put(http, "/v1/agent/service/register", {"Name": "later"}) == (200, "")
    await eventually(lambda: _has_service(http, "later"))
    assert len(attempts) == 2
    assert 0.9 <= attempts[1] - attempts[0] <= 1.6, attempts[1] - attempts[0]


async def test_output_only_changes_are_batched_and_status_changes_are_not(
    make_agent: AgentMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Consul's check_update_interval: a new output with the same status is written at most
    once per interval (here 0.4 s: written 0.2-0.6 s later), a status change at once and with
    the latest output; a full sync meanwhile does not write the output either."""
    agent = await make_agent(check_update_interval=0.4)
    consensus = agent.consensus
    assert consensus is not None
    real_write, writes = consensus.write, []

    async def counting_write(command: bytes, timeout: float = 10.0) -> Any:
        writes.append(command)
        return await real_write(command, timeout)

    monkeypatch.setattr(consensus, "write", counting_write)
    async with client(agent) as http:

        async def catalog_check() -> tuple[str, str] | None:
            found = await get(http, "/v1/health/checks/chatty")
            return (found[0]["Status"], found[0]["Output"]) if len(found) == 1 else None

        async def catalog_has(want: tuple[str, str]) -> bool:
            return await catalog_check() == want

        body = {"Name": "chatty", "Check": {"TTL": "30s", "Status": "passing"}}
        assert await put(http, "/v1/agent/service/register", body) == (200, "")
        # a check's first result is written at once, even with the status it started with
        assert await put(http, "/v1/agent/check/pass/service:chatty?note=n=0") == (200, "")
        await eventually(lambda: catalog_has(("passing", "n=0")))
        before = len(writes)
        for n in range(1, 6):  # a check printing something new on every run
            assert await put(http, f"/v1/agent/check/pass/service:chatty?note=n={n}") == (200, "")
        assert (await get(http, "/v1/agent/checks"))["service:chatty"]["Output"] == "n=5"
        assert await anti_entropy(agent).sync_once() == 0  # a full sync leaves it deferred
        await asyncio.sleep(0.1)
        assert await catalog_check() == ("passing", "n=0") and len(writes) == before
        await within(lambda: catalog_has(("passing", "n=5")), 0.6 + 0.5)
        assert len(writes) == before + 1  # five outputs, one write

        # pending output, then a status change: one write, at once, with the latest output
        assert await put(http, "/v1/agent/check/pass/service:chatty?note=n=6") == (200, "")
        assert await put(http, "/v1/agent/check/warn/service:chatty?note=slow") == (200, "")
        await within(lambda: catalog_has(("warning", "slow")), 0.3)
        await asyncio.sleep(0.8)  # the deferred write was dropped with the status change
        assert len(writes) == before + 2 and await catalog_check() == ("warning", "slow")


async def test_with_consuls_default_interval_output_waits_minutes(
    http: aiohttp.ClientSession,
) -> None:
    body = {"Name": "quiet", "Check": {"TTL": "30s", "Status": "passing"}}
    assert await put(http, "/v1/agent/service/register", body) == (200, "")
    assert await put(http, "/v1/agent/check/pass/service:quiet?note=first") == (200, "")
    await eventually(lambda: _check_is(http, "quiet", ("passing", "first")))
    assert await put(http, "/v1/agent/check/pass/service:quiet?note=new") == (200, "")
    await asyncio.sleep(0.5)
    assert await _check_is(http, "quiet", ("passing", "first"))  # 2.5-7.5 min away
    assert await put(http, "/v1/agent/check/fail/service:quiet?note=down") == (200, "")
    await within(lambda: _check_is(http, "quiet", ("critical", "down")), 0.5)


async def _check_is(http: aiohttp.ClientSession, service: str, want: tuple[str, str]) -> bool:
    got = [(c["Status"], c["Output"]) for c in await get(http, f"/v1/health/checks/{service}")]
    return got == [want]


# ----- real agent processes -----


def _proc_checks(a: AgentProc, path: str) -> dict[str, tuple[str, str]]:
    status, body = a.http("GET", path)
    assert status == 200, body
    items = body.values() if isinstance(body, dict) else body
    return {c["CheckID"]: (c["Status"], c["Output"]) for c in items}


@pytest.mark.cluster
def test_script_checks_through_a_real_agent_with_the_flag(tmp_path: Path) -> None:
    """`meshnode agent` refuses script checks without --enable-script-checks and runs them
    with it: exit codes, stdout as Output (agent view and catalog), Timeout."""
    a = AgentProc("scripts", "127.0.0.1", tmp_path, dev=True)

    def script(code: str) -> list[str]:
        return [sys.executable, "-c", f"import sys, time; {code}"]

    body = {"Name": "scripted", "Checks": [
        {"Args": script("print('fine')"), "Interval": "1s"},
        {"Args": script("print('meh'); sys.exit(1)"), "Interval": "1s"},
        {"Args": script("print('bad'); sys.exit(2)"), "Interval": "1s"},
        {"Args": script("time.sleep(30)"), "Interval": "1s", "Timeout": "1s"},
    ]}  # fmt: skip
    want = {
        "service:scripted:1": ("passing", "fine\n"),
        "service:scripted:2": ("warning", "meh\n"),
        "service:scripted:3": ("critical", "bad\n"),
        "service:scripted:4": ("critical", "Timed out (1s) running check"),
    }
    try:
        a.start().wait_ready()
        status, msg = a.http("PUT", "/v1/agent/service/register", body)
        assert status == 400 and "--enable-script-checks" in msg
        a.stop()
        a.extra_args.append("--enable-script-checks")
        a.start().wait_ready()
        assert a.http("PUT", "/v1/agent/service/register", body)[0] == 200
        wait_until(lambda: _proc_checks(a, "/v1/agent/checks") == want, timeout=15,
                   desc="script checks in the agent view")  # fmt: skip
        wait_until(lambda: _proc_checks(a, "/v1/health/checks/scripted") == want, timeout=15,
                   desc="script checks in the catalog")  # fmt: skip
    finally:
        a.stop()


@pytest.mark.cluster
def test_a_restarted_agent_puts_its_services_back_into_a_catalog_that_lost_its_node(
    tmp_path: Path,
) -> None:
    a = AgentProc("phoenix", "127.0.0.1", tmp_path, dev=True)

    def catalog_services() -> set[str]:
        status, body = a.http("GET", "/v1/catalog/services")
        assert status == 200, body
        return set(body)

    try:
        a.start().wait_ready()
        body = {"Name": "kept", "Port": 7000, "Check": {"TTL": "60s", "Status": "passing"}}
        assert a.http("PUT", "/v1/agent/service/register", body)[0] == 200
        wait_until(lambda: "kept" in catalog_services(), timeout=10, desc="kept registered")
        assert a.http("PUT", "/v1/catalog/deregister", {"Node": "phoenix"}) == (200, True)
        assert "kept" not in catalog_services()
        a.kill9()
        a.start().wait_ready()
        wait_until(lambda: "kept" in catalog_services(), timeout=10,
                   desc="kept back in the catalog after the restart")  # fmt: skip
        wait_until(lambda: _proc_checks(a, "/v1/health/checks/kept")
                   == {"service:kept": ("passing", "")}, timeout=10,
                   desc="and its check")  # fmt: skip
    finally:
        a.stop()


async def test_agent_services_and_checks_take_a_filter(http: aiohttp.ClientSession) -> None:
    """?filter= on /v1/agent/services and /v1/agent/checks, Consul's expression language."""
    for body in ({"Name": "api", "ID": "api-1", "Tags": ["v1"], "Meta": {"env": "prod"},
                  "Check": {"TTL": "30s"}},
                 {"Name": "api", "ID": "api-2", "Tags": ["v2"], "Meta": {"env": "dev"}},
                 {"Name": "db", "Port": 5432}):  # fmt: skip
        assert await put(http, "/v1/agent/service/register", body) == (200, "")
    for expr, want in (('Service == "api"', ["api-1", "api-2"]),
                       ('v1 in Tags', ["api-1"]),
                       ('Meta.env == "dev" or Port == 5432', ["api-2", "db"]),
                       ('Service != "api" and Service != "db"', [])):  # fmt: skip
        assert sorted(await get(http, f"/v1/agent/services?filter={quote(expr)}")) == want, expr
    assert list(await get(http, "/v1/agent/checks?filter=" + quote('ServiceID == "api-1"'))) == [
        "service:api-1"]  # fmt: skip
    assert await get(http, "/v1/agent/checks?filter=" + quote('Status == "passing"')) == {}
    for path in ("/v1/agent/services", "/v1/agent/checks"):
        async with http.get(path, params={"filter": "Service =="}) as r:
            assert r.status == 400
            assert (await r.text()).startswith("Failed to create boolean expression evaluator")


# ----- review of issue 4: bad values are 400s, checks keep running and keep their state -----


async def test_malformed_registrations_are_a_400_not_a_500(http: aiohttp.ClientSession) -> None:
    """Values that used to crash the handler (TaggedAddresses entry not an object) or a check
    runner (a TCP port past 65535) are refused with a message naming what is wrong."""
    for body, text in [
        ({"Name": "x", "TaggedAddresses": {"lan": None}}, "TaggedAddresses.lan must be an object"),
        ({"Name": "x", "TaggedAddresses": {"wan": "10.0.0.1"}}, "TaggedAddresses.wan must be"),
        ({"Name": "x", "TaggedAddresses": {"lan_ipv4": [1]}}, "TaggedAddresses.lan_ipv4 must"),
        ({"Name": "x", "Check": {"TCP": "127.0.0.1:99999", "Interval": "1s"}}, "1-65535"),
        ({"Name": "x", "Check": {"TCP": "127.0.0.1:-1", "Interval": "1s"}}, "1-65535"),
        ({"Name": "x", "Check": {"TCP": "127.0.0.1:web", "Interval": "1s"}}, "1-65535"),
        ({"Name": "x", "Check": {"TTL": "1" + "0" * 400 + "h"}}, "invalid TTL"),
        ({"Name": "x", "Check": {"TTL": "1s", "Interval": 10**400}}, "invalid Interval"),
    ]:
        status, msg = await put(http, "/v1/agent/service/register", body)
        assert status == 400 and text in msg, (body, status, msg)
    status, msg = await put(http, "/v1/agent/check/register",
                            {"Name": "c", "TCP": "127.0.0.1:70000", "Interval": "1s"})  # fmt: skip
    assert status == 400 and "1-65535" in msg
    assert await get(http, "/v1/agent/services") == {}
    assert await get(http, "/v1/agent/checks") == {}


async def test_nan_and_infinity_tokens_are_refused_as_go_does(http: aiohttp.ClientSession) -> None:
    """Python's json takes the bare NaN/Infinity tokens and 1e999 (an infinity); Go's decoder
    refuses them, and a NaN duration froze the check's runner."""
    service = '{"Name": "x", "Check": {"TTL": "1s", "DeregisterCriticalServiceAfter": %s}}'
    for path, template in [("/v1/agent/service/register", service),
                           ("/v1/agent/check/register", '{"Name": "c", "TTL": %s}'),
                           ("/v1/agent/check/register",
                            '{"Name": "c", "HTTP": "http://127.0.0.1:1/", "Interval": %s}'),
                           ]:  # fmt: skip
        for token, text in [("NaN", "invalid character 'N' looking for beginning of value"),
                            ("Infinity", "invalid character 'I' looking for beginning of value"),
                            ("-Infinity", "invalid character 'I' in numeric literal"),
                            ("1e999", "cannot unmarshal number 1e999")]:  # fmt: skip
            async with http.put(path, data=(template % token).encode()) as r:
                msg = await r.text()
                assert r.status == 400 and msg.startswith("Request decode failed: "), msg
                assert text in msg, (path, token, msg)
    assert await put(http, "/v1/agent/check/register", {"Name": "ok", "TTL": "5s"}) == (200, "")
    async with http.put("/v1/agent/check/update/ok", data=b'{"Status": NaN}') as r:
        assert r.status == 400
    assert await get(http, "/v1/agent/services") == {}
    assert list(await get(http, "/v1/agent/checks")) == ["ok"]


async def test_a_check_runner_survives_a_failed_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """A round that raises (a bug) is logged and the check runs again an interval later: it
    must not freeze at its last status with its runner gone."""
    import node.local

    calls: list[str] = []

    async def flaky_probe(chk: Any) -> tuple[str, str]:
        calls.append(chk.id)
        if len(calls) == 1:
            raise RuntimeError("a bug in a probe")
        return "passing", f"run {len(calls)}"

    monkeypatch.setattr(node.local, "probe", flaky_probe)
    monkeypatch.setattr(node.local, "RETRY_AFTER_FAILURE", 0.05, raising=False)
    local = LocalState(None)
    local.add_service({"Name": "w", "Check": {"TCP": "127.0.0.1:1", "Interval": "1s"}})
    chk = local.checks["service:w"]
    chk.interval = 0.05  # (definitions clamp to 1 s; the test need not wait that long)
    try:
        with capture_logs() as logs:
            deadline = time.monotonic() + 5
            while len(calls) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        assert len(calls) >= 3, "the runner stopped after the failed round"
        assert chk.status == "passing" and chk.output.startswith("run ")
        failed = [e for e in logs if e["event"] == "local.check_round_failed"]
        assert [e["check"] for e in failed] == ["service:w"]
    finally:
        await local.stop()


async def test_a_status_change_does_not_rewrite_the_definitions_file(tmp_path: Path) -> None:
    """local-services.json holds definitions only: a check's status or output changes wake
    anti-entropy and blocked readers but write nothing; (de)registrations write it."""
    path = tmp_path / "local-services.json"
    changes: list[None] = []
    local = LocalState(path, on_change=lambda: changes.append(None), run_checks=False)

    def stamp() -> tuple[int, int]:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns

    local.add_service({"Name": "w", "Check": {"TTL": "30s"}})
    written, before = stamp(), len(changes)
    waiter = asyncio.create_task(local.wait_changed(10.0))
    await asyncio.sleep(0)
    for status, output in (("passing", "ok"), ("warning", "slow"), ("warning", "slower")):
        local.update_check("service:w", status, output)
    await asyncio.wait_for(waiter, 2)  # woken by the status change, not the 10 s timeout
    assert len(changes) > before and stamp() == written
    assert json.loads(path.read_text())["services"][0]["ID"] == "w"
    local.add_service({"Name": "v"})
    assert stamp() != written
    written = stamp()
    local.add_check({"Name": "disk", "TTL": "30s"})
    assert stamp() != written
    written = stamp()
    assert local.remove_service("v") and stamp() != written
    started = time.monotonic()
    await local.wait_changed(0.05)  # nothing changes: the timeout ends it
    assert 0.04 <= time.monotonic() - started < 2.0


async def test_re_registering_a_service_keeps_its_checks_state(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    """Consul's "Restore the fields from the snapshot": registering a service again (as
    registrator or nomad do periodically), with or without ?replace-existing-checks, keeps each
    check's status, output, critical-since and TTL deadline, so nothing flaps to critical."""
    body = {"Name": "keep", "Port": 1, "Checks": [
        {"CheckID": "beat", "TTL": "30s"},
        {"CheckID": "down", "TTL": "30s", "DeregisterCriticalServiceAfter": "1h"},
    ]}  # fmt: skip
    assert await put(http, "/v1/agent/service/register", body) == (200, "")
    assert await put(http, "/v1/agent/check/pass/beat?note=alive") == (200, "")
    assert await put(http, "/v1/agent/check/fail/down?note=broken") == (200, "")
    want = {"beat": ("passing", "alive"), "down": ("critical", "broken")}

    async def catalog_state() -> dict[str, tuple[str, str]]:
        found = await get(http, "/v1/health/checks/keep")
        return {c["CheckID"]: (c["Status"], c["Output"]) for c in found}

    await eventually(lambda: _async_eq(catalog_state, want))
    local = agent.local
    assert local is not None
    deadline, since = local.checks["beat"].ttl_deadline, local.checks["down"].critical_since
    for query in ("", "?replace-existing-checks", "?replace-existing-checks=true"):
        assert await put(http, f"/v1/agent/service/register{query}", body) == (200, ""), query
        checks = await get(http, "/v1/agent/checks")
        assert {k: (v["Status"], v["Output"]) for k, v in checks.items()} == want, query
        assert local.checks["beat"].ttl_deadline == deadline  # a registration is no heartbeat
        assert local.checks["down"].critical_since == since  # the reap clock keeps running
        assert await anti_entropy(agent).sync_once() == 0  # nothing for the catalog to follow
    assert await catalog_state() == want


async def _async_eq(read: Callable[[], Awaitable[Any]], want: Any) -> bool:
    return bool(await read() == want)


def test_a_changed_definition_keeps_the_state_as_consul_does() -> None:
    """The snapshot is keyed by check ID alone in Consul, so the state survives a new TTL, a
    new kind and a Status in the new definition; a new TTL counts from the last update."""
    local = LocalState(None, run_checks=False)
    local.add_service({"Name": "w", "Check": {"TTL": "10s"}})
    local.update_check("service:w", "warning", "slow")
    old = local.checks["service:w"]
    local.add_service({"Name": "w", "Check": {"TTL": "30s", "Status": "critical"}})
    new = local.checks["service:w"]
    assert new is not old and (new.ttl, new.status, new.output) == (30.0, "warning", "slow")
    assert new.ttl_deadline == pytest.approx(old.ttl_deadline + 20.0)
    local.add_service({"Name": "w", "Check": {"HTTP": "http://127.0.0.1:1/", "Interval": "5s"}})
    http = local.checks["service:w"]
    assert (http.kind, http.status, http.output) == ("http", "warning", "slow")
    # a check the new definition does not name is gone with ?replace-existing-checks; one
    # registered afresh under that ID later starts as a new check does
    local.add_service({"Name": "w"}, replace_checks=True)
    assert local.checks == {}
    local.add_service({"Name": "w", "Check": {"TTL": "10s"}})
    assert (local.checks["service:w"].status, local.checks["service:w"].output) == ("critical", "")


async def test_a_restored_ttl_past_its_deadline_expires_at_once() -> None:
    """A TTL check registered again keeps its last update time: when the new TTL has already
    run out since then, the check turns critical at once instead of staying passing."""
    local = LocalState(None)
    try:
        local.add_service({"Name": "w", "Check": {"TTL": "30s"}})
        local.update_check("service:w", "passing", "ok")
        local.checks["service:w"].ttl_deadline = time.monotonic() - 0.5  # updated 30.5 s ago
        local.add_service({"Name": "w", "Check": {"TTL": "30s"}})
        chk = local.checks["service:w"]
        deadline = time.monotonic() + 2
        while chk.status == "passing" and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert (chk.status, chk.output) == (
            "critical", "TTL expired (last output before timeout follows): ok")  # fmt: skip
    finally:
        await local.stop()

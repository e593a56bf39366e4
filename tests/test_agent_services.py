"""/v1/agent/service* and /v1/agent/check* on a one-node agent, with the check runners and
anti-entropy carrying everything into the catalog (fake gossip, real Raft and HTTP)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from node.agent import Agent
from node.antientropy import AntiEntropy
from node.consensus import Consensus
from node.local import LocalState
from tests.test_http_api import FakeRuntime, FakeWorld, make_config


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    a = Agent(make_config(tmp_path, dev=True, server_port=0),
              runtime_factory=partial(FakeRuntime, FakeWorld()))  # fmt: skip
    a.add_component(Consensus(a))
    a.add_component(AntiEntropy(a))
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


@pytest.fixture
async def http(agent: Agent) -> AsyncIterator[aiohttp.ClientSession]:
    assert agent.http is not None
    async with aiohttp.ClientSession(f"http://127.0.0.1:{agent.http.port}") as s:
        yield s


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
        healthy["ok"] = False
        await eventually(lambda: statuses({"service:web:1": "critical",
                                           "service:web:2": "passing"}))  # fmt: skip
        out = (await get(http, "/v1/agent/checks"))["service:web:1"]["Output"]
        assert "503" in out
    finally:
        await runner.cleanup()
    await eventually(lambda: statuses({"service:web:1": "critical",
                                       "service:web:2": "critical"}))  # fmt: skip


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

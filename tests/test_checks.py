"""node/checks: Consul's rules for a check definition, and one probe of each kind against real
local targets (an aiohttp server, a TCP listener, a script)."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from node.checks.definition import CheckError, CheckSpec
from node.checks.probes import probe


def spec(**kw: Any) -> CheckSpec:
    return CheckSpec(kw, scripts=True)


def test_definition_rules() -> None:
    ttl = CheckSpec({"name": "beat", "ttl": "15s"})  # lower/snake case accepted
    assert (ttl.id, ttl.kind, ttl.ttl, ttl.status) == ("beat", "ttl", 15.0, "critical")
    fast = spec(ID="f", TCP="127.0.0.1:1", Interval="10ms", Timeout=2_000_000_000)
    assert fast.interval == 1.0 and fast.timeout == 2.0  # clamped; nanoseconds as Go encodes
    assert spec(ID="w", HTTP="http://x/", Interval="5s", Status="passing").status == "passing"
    owned = CheckSpec({"TTL": "1s"}, service_id="web", default_id="service:web")
    assert (owned.id, owned.service_id) == ("service:web", "web")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"ID": "x"}, "Must provide TTL or HTTP/TCP/Args and Interval"),
        ({"ID": "x", "TTL": "1s", "TCP": "h:1"}, "several kinds"),
        ({"ID": "x", "HTTP": "http://x/"}, "Interval is required"),
        ({"ID": "x", "TCP": "nohost", "Interval": "1s"}, "host:port"),
        ({"ID": "x", "TTL": "soon"}, "invalid TTL"),
        ({"ID": "x", "TTL": "1s", "Status": "great"}, "Status must be one of"),
        ({"ID": "x", "Args": ["true", 5], "Interval": "1s"}, "list of strings"),
        ({"TTL": "1s"}, "Name or an ID"),
    ]
    for bad, message in cases:
        with pytest.raises(CheckError, match=message):
            CheckSpec(bad, scripts=True)
    with pytest.raises(CheckError, match="--enable-script-checks"):
        CheckSpec({"ID": "x", "Args": ["true"], "Interval": "1s"})


def test_output_is_capped_and_critical_since_follows_the_status() -> None:
    c = spec(ID="t", TTL="1s")
    assert c.critical_since > 0
    c.set("passing", "x" * 10_000)
    assert len(c.output) == 4096 and c.critical_since == 0.0
    with pytest.raises(CheckError):
        c.set("fine", "")


@pytest.fixture
async def site() -> AsyncIterator[str]:
    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="body here")

    app = web.Application()
    app.router.add_route("*", "/{code}", status)
    runner = web.AppRunner(app)
    await runner.setup()
    server = web.TCPSite(runner, "127.0.0.1", 0)
    await server.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_http_probe_maps_status_codes_like_consul(site: str) -> None:
    ok = await probe(spec(ID="h", HTTP=f"{site}/200", Interval="1s"))
    assert ok == ("passing", f"HTTP GET {site}/200: 200 OK Output: body here")
    assert (await probe(spec(ID="h", HTTP=f"{site}/429", Interval="1s")))[0] == "warning"
    assert (await probe(spec(ID="h", HTTP=f"{site}/503", Interval="1s")))[0] == "critical"
    post = await probe(spec(ID="h", HTTP=f"{site}/204", Method="POST", Interval="1s"))
    assert post[0] == "passing" and post[1].startswith("HTTP POST")


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


async def test_tcp_probe() -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ok = await probe(spec(ID="t", TCP=f"127.0.0.1:{port}", Interval="1s"))
        assert ok == ("passing", f"TCP connect 127.0.0.1:{port}: Success")
    finally:
        server.close()
        await server.wait_closed()
    closed = _closed_port()
    status, output = await probe(spec(ID="t", TCP=f"127.0.0.1:{closed}", Interval="1s"))
    assert status == "critical" and output.startswith(f"dial tcp 127.0.0.1:{closed}")


async def test_script_probe_exit_codes_output_and_timeout() -> None:
    def script(code: str, **kw: Any) -> CheckSpec:
        return spec(ID="s", Args=[sys.executable, "-c", code], Interval="1s", **kw)

    assert await probe(script("print('fine')")) == ("passing", "fine\n")
    assert (await probe(script("import sys; sys.exit(1)")))[0] == "warning"
    assert await probe(script("import sys; print('bad'); sys.exit(2)")) == ("critical", "bad\n")
    slow = await probe(script("import time; time.sleep(5)", Timeout="200ms"))
    assert slow == ("critical", "Timed out (0.2s) running check")
    missing = await probe(spec(ID="s", Args=["/nonexistent/check"], Interval="1s"))
    assert missing[0] == "critical" and "/nonexistent/check" in missing[1]

"""node/checks: Consul's rules for a check definition, and one probe of each kind against real
local targets (aiohttp servers, one of them HTTPS with a self-signed certificate, a TCP
listener, scripts)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from node.checks.definition import CheckError, CheckSpec
from node.checks.probes import probe
from node.golang import format_duration


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


def test_durations_must_be_finite_and_fit_gos_duration() -> None:
    """NaN or infinite durations (TOML has them; JSON bodies are refused before this) and
    ones past Go's int64 nanoseconds are refused naming the field: a runner sleeping NaN
    seconds never wakes again."""
    too_long = ("1" + "0" * 400 + "h", "3000000h", 10**400, 2.0**64)
    for raw in (float("nan"), float("inf"), float("-inf"), *too_long):
        for name in ("TTL", "Interval", "Timeout", "DeregisterCriticalServiceAfter"):
            with pytest.raises(CheckError, match=f"invalid {name}"):
                CheckSpec({"ID": "x", "TTL": "1s"} | {name: raw})
    top = CheckSpec({"ID": "x", "TTL": "2562047h"})
    assert top.ttl == 2562047 * 3600.0


def test_a_tcp_check_needs_a_numeric_port_in_range() -> None:
    """A port past 65535 made the probe raise OverflowError and end the check's runner."""
    for target in ("127.0.0.1:99999", "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:0",
                   "127.0.0.1:http", "127.0.0.1:", "[::1]:1e3", "h:\u0663"):  # fmt: skip
        with pytest.raises(CheckError, match="port in 1-65535"):
            spec(ID="t", TCP=target, Interval="1s")
    assert spec(ID="t", TCP="[::1]:65535", Interval="1s").tcp == "[::1]:65535"
    assert spec(ID="t", TCP="localhost:1", Interval="1s").tcp == "localhost:1"


async def test_a_probe_never_raises() -> None:
    chk = spec(ID="t", TCP="127.0.0.1:1", Interval="1s")
    chk.tcp = "127.0.0.1:99999"  # past the definition's rule: what used to escape the probe
    status, output = await probe(chk)
    assert status == "critical" and "OverflowError" in output, output


def test_output_is_capped_and_critical_since_follows_the_status() -> None:
    c = spec(ID="t", TTL="1s")
    assert c.critical_since > 0
    c.set("passing", "x" * 10_000)
    assert len(c.output) == 4096 and c.critical_since == 0.0
    with pytest.raises(CheckError):
        c.set("fine", "")


@contextlib.asynccontextmanager
async def _server(handler: Any, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    server = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await server.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


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


async def test_http_probe_sends_method_headers_and_body_like_consul() -> None:
    seen: list[dict[str, Any]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(
            {
                "method": request.method,
                "multi": request.headers.getall("X-Multi", []),
                "ua": request.headers.get("User-Agent"),
                "host": request.host,
                "accept": request.headers.get("Accept"),
                "body": await request.text(),
            }
        )
        return web.Response(text="seen")  # fmt: skip

    async with _server(record) as base:
        chk = spec(ID="h", HTTP=f"{base}/x", Interval="1s", Method="PUT", Body='{"ping":1}',
                   Header={"X-Multi": ["a", "b"], "Host": ["svc.internal"]})  # fmt: skip
        assert (await probe(chk))[0] == "passing"
        default = spec(ID="h", HTTP=f"{base}/x", Interval="1s")
        assert (await probe(default))[0] == "passing"
        own_ua = spec(ID="h", HTTP=f"{base}/x", Interval="1s", Header={"User-Agent": ["me"]})
        assert (await probe(own_ua))[0] == "passing"
    assert seen[0] == {"method": "PUT", "multi": ["a", "b"], "ua": "Consul Health Check",
                       "host": "svc.internal", "accept": "text/plain, text/*, */*",
                       "body": '{"ping":1}'}  # fmt: skip
    assert (seen[1]["method"], seen[1]["multi"], seen[1]["body"]) == ("GET", [], "")
    assert seen[2]["ua"] == "me"


async def test_http_probe_keeps_the_last_4_kib_of_the_body() -> None:
    """Consul copies the body into a 4 KiB circular buffer: a long page's end is what shows."""

    async def long_page(_: web.Request) -> web.Response:
        return web.Response(text="head " + "x" * 20_000 + " the end")

    async with _server(long_page) as base:
        status, out = await probe(spec(ID="h", HTTP=f"{base}/x", Interval="1s"))
    prefix = f"HTTP GET {base}/x: 200 OK Output: "
    assert status == "passing" and out.startswith(prefix) and out.endswith(" the end")
    assert len(out) == len(prefix) + 4096 and "head" not in out


async def test_http_probe_timeout_is_critical() -> None:
    async def stall(_: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    async with _server(stall) as base:
        start = time.monotonic()
        status, out = await probe(spec(ID="h", HTTP=f"{base}/x", Interval="1s", Timeout="300ms"))
        assert time.monotonic() - start < 2.0
    assert (status, out) == ("critical", f"HTTP GET {base}/x: timed out after 300ms")


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    """A certificate for DNS name `name` only (not 127.0.0.1), signed by its own key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return cert_path, key_path


async def test_https_checks_honour_tls_skip_verify_and_tls_server_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fabio-style HTTPS checks: a self-signed certificate is critical unless TLSSkipVerify;
    TLSServerName is the SNI name sent and the name the certificate is checked against."""
    cert, key = _self_signed(tmp_path, "meshnode-check.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    sni: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: sni.append(name)

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="tls ok")

    async with _server(ok, ssl_context=server_ctx) as base:
        url = base.replace("http://", "https://") + "/health"

        async def run(**kw: Any) -> tuple[str, str]:
            return await probe(spec(ID="t", HTTP=url, Interval="1s", Timeout="5s", **kw))

        status, out = await run()
        assert status == "critical" and "certificate verify failed" in out, out
        assert await run(TLSSkipVerify=True) == (
            "passing",
            f"HTTP GET {url}: 200 OK Output: tls ok",
        )
        sni.clear()
        assert (await run(TLSSkipVerify=True, TLSServerName="svc.example"))[0] == "passing"
        assert sni == ["svc.example"]
        # trust the certificate (as an agent's CA file would): now the name decides
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert (await run(TLSServerName="meshnode-check.test"))[0] == "passing"
        status, out = await run(TLSServerName="other.test")
        assert status == "critical" and "other.test" in out, out
        assert (await run())[0] == "critical"  # 127.0.0.1 is not a name the certificate has


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
    assert slow == ("critical", "Timed out (200ms) running check")  # Go's duration wording
    missing = await probe(spec(ID="s", Args=["/nonexistent/check"], Interval="1s"))
    assert missing[0] == "critical" and "/nonexistent/check" in missing[1]


async def test_a_timed_out_script_keeps_its_output_and_takes_its_children_along() -> None:
    """Consul appends what the script printed before the timeout, and kills its process group:
    a shell's `sleep` child holding stdout open must not keep the probe waiting."""
    chatty = "import time; print('started', flush=True); time.sleep(30)"
    start = time.monotonic()
    status, out = await probe(spec(ID="s", Args=[sys.executable, "-c", chatty],
                                   Interval="1s", Timeout="300ms"))  # fmt: skip
    assert (status, out) == ("critical", "Timed out (300ms) running check\n\nstarted\n")
    status, out = await probe(spec(ID="s", Args=["/bin/sh", "-c", "sleep 30; echo never"],
                                   Interval="1s", Timeout="300ms"))  # fmt: skip
    assert (status, out) == ("critical", "Timed out (300ms) running check")
    assert time.monotonic() - start < 5.0


async def test_long_script_output_keeps_its_tail_like_consul() -> None:
    code = "import sys; sys.stdout.write('a' * 5000 + 'END')"
    status, out = await probe(spec(ID="s", Args=[sys.executable, "-c", code], Interval="1s"))
    assert status == "passing"
    assert out == "Captured 4096 of 5003 bytes\n...\n" + "a" * 4093 + "END"


def test_go_duration_strings() -> None:
    cases = {0.2: "200ms", 1.0: "1s", 1.5: "1.5s", 90.0: "1m30s", 3600.0: "1h0m0s",
             0.0015: "1.5ms", 0.0: "0s", 10.0: "10s"}  # fmt: skip
    assert {k: format_duration(k) for k in cases} == cases


def test_default_name_header_and_body_fields() -> None:
    c = CheckSpec({"ttl": "5s"}, service_id="web", default_id="service:web",
                  default_name="Service 'web' check")  # fmt: skip
    assert (c.id, c.name) == ("service:web", "Service 'web' check")
    named = CheckSpec(
        {"ttl": "5s", "name": "mine"}, default_id="x", default_name="Service 'w' check"
    )
    assert named.name == "mine"
    h = spec(
        ID="h",
        HTTP="https://x/",
        Interval="1s",
        method="put",
        body="{}",
        header={"X-A": ["1", "2"]},
        tls_skip_verify=True,
        tls_server_name="svc.test",
    )
    assert (h.method, h.body, h.header) == ("PUT", "{}", {"X-A": ["1", "2"]})
    assert (h.tls_skip_verify, h.tls_server_name) == (True, "svc.test")
    with pytest.raises(CheckError, match="Header must be an object of string lists"):
        spec(ID="h", HTTP="http://x/", Interval="1s", Header={"X-A": "1"})
    with pytest.raises(CheckError, match="Body must be a string"):
        spec(ID="h", HTTP="http://x/", Interval="1s", Body={"a": 1})

"""Running one check of each kind once: an HTTP request, a TCP connect, a script. Each returns
(status, output) in Consul's wording; a failure to reach the target (or anything else going
wrong) is a critical status, never an exception."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl

import aiohttp
from multidict import CIMultiDict

from node.checks.definition import MAX_OUTPUT, CheckSpec
from node.golang import format_duration

__all__ = ["USER_AGENT", "probe"]

USER_AGENT = "Consul Health Check"  # Consul's checks.UserAgent; some targets match on it


async def probe(chk: CheckSpec) -> tuple[str, str]:
    """Never raises (but CancelledError): whatever goes wrong is the check's critical output,
    so a surprise in one probe cannot end the check's runner."""
    run = {"http": _http, "tcp": _tcp, "script": _script}[chk.kind]
    try:
        return await run(chk)
    except Exception as e:
        return "critical", f"{chk.kind} check failed: {type(e).__name__}: {e}"


def _ssl_context(chk: CheckSpec) -> ssl.SSLContext | None:
    """Consul's OutgoingTLSConfigForCheck: the system roots, verification off with
    TLSSkipVerify; TLSServerName is both the SNI name and the name the certificate must have."""
    if not chk.http.lower().startswith("https:"):
        return None
    ctx = ssl.create_default_context()
    if chk.tls_skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _headers(chk: CheckSpec) -> CIMultiDict[str]:
    headers: CIMultiDict[str] = CIMultiDict()
    for name, values in chk.header.items():
        for v in values:
            headers.add(name, v)
    headers.setdefault("User-Agent", USER_AGENT)
    headers.setdefault("Accept", "text/plain, text/*, */*")
    return headers


async def _http(chk: CheckSpec) -> tuple[str, str]:
    try:
        timeout = aiohttp.ClientTimeout(total=chk.timeout)
        connector = aiohttp.TCPConnector(force_close=True)  # no keep-alive, as Consul
        async with (aiohttp.ClientSession(timeout=timeout, connector=connector) as s,
                    s.request(chk.method, chk.http, headers=_headers(chk),
                              data=chk.body.encode() if chk.body else None,
                              ssl=_ssl_context(chk) or True,
                              server_hostname=chk.tls_server_name or None,
                              allow_redirects=not chk.disable_redirects) as r):  # fmt: skip
            tail = b""  # the last 4 KiB, as Consul's circular buffer keeps them
            async for chunk in r.content.iter_any():
                tail = (tail + chunk)[-MAX_OUTPUT:]
            body = tail.decode(errors="replace")
            out = f"HTTP {chk.method} {chk.http}: {r.status} {r.reason} Output: {body}"
            if 200 <= r.status < 300:
                return "passing", out
            return ("warning" if r.status == 429 else "critical"), out
    except TimeoutError:
        return "critical", (f"HTTP {chk.method} {chk.http}: timed out after "
                            f"{format_duration(chk.timeout)}")  # fmt: skip
    except (aiohttp.ClientError, OSError, ValueError) as e:
        return "critical", f"HTTP {chk.method} {chk.http}: {e or type(e).__name__}"


async def _tcp(chk: CheckSpec) -> tuple[str, str]:
    host, _, port = chk.tcp.rpartition(":")
    try:
        async with asyncio.timeout(chk.timeout):
            _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
        writer.close()
        return "passing", f"TCP connect {chk.tcp}: Success"
    except (OSError, TimeoutError, ValueError) as e:
        return "critical", f"dial tcp {chk.tcp}: {e or type(e).__name__}"


class _Tail:
    """Consul's circular output buffer: the last MAX_OUTPUT bytes, and how many there were."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        del self.data[:-MAX_OUTPUT]

    def text(self) -> str:
        out = self.data.decode(errors="replace")
        if self.total > len(self.data):
            return f"Captured {len(self.data)} of {self.total} bytes\n...\n{out}"
        return out


async def _script(chk: CheckSpec) -> tuple[str, str]:
    """Exit 0 passing, 1 warning, anything else critical; stdout and stderr are the output.
    The script runs in its own process group, so a timeout kills whatever it started too."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *chk.args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    except OSError as e:
        return "critical", f"cannot run {chk.args[0] if chk.args else ''}: {e.strerror}"
    assert proc.stdout is not None
    tail = _Tail()

    async def pump() -> None:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(65536):
            tail.add(chunk)

    try:
        async with asyncio.timeout(chk.timeout):
            await pump()
            code = await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        msg = f"Timed out ({format_duration(chk.timeout)}) running check"
        out = tail.text()
        return "critical", f"{msg}\n\n{out}" if out else msg
    finally:
        if proc.returncode is None:  # cancelled (the check was removed): leave nothing behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    status = "passing" if code == 0 else "warning" if code == 1 else "critical"
    return status, tail.text()

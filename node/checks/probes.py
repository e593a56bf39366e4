"""Running one check of each kind once: an HTTP request, a TCP connect, a script. Each returns
(status, output) in Consul's wording; a failure to reach the target is a critical status, never
an exception."""

from __future__ import annotations

import asyncio

import aiohttp

from node.checks.definition import MAX_OUTPUT, CheckSpec

__all__ = ["probe"]


async def probe(chk: CheckSpec) -> tuple[str, str]:
    run = {"http": _http, "tcp": _tcp, "script": _script}[chk.kind]
    return await run(chk)


async def _http(chk: CheckSpec) -> tuple[str, str]:
    try:
        timeout = aiohttp.ClientTimeout(total=chk.timeout)
        async with (aiohttp.ClientSession(timeout=timeout) as s,
                    s.request(chk.method, chk.http) as r):  # fmt: skip
            body = (await r.content.read(MAX_OUTPUT)).decode(errors="replace")
            out = f"HTTP {chk.method} {chk.http}: {r.status} {r.reason} Output: {body}"
            if 200 <= r.status < 300:
                return "passing", out
            return ("warning" if r.status == 429 else "critical"), out
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
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


async def _script(chk: CheckSpec) -> tuple[str, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *chk.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(chk.timeout):
                raw, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return "critical", f"Timed out ({chk.timeout:g}s) running check"
        text = raw.decode(errors="replace")[:MAX_OUTPUT]
        code = proc.returncode
        return ("passing" if code == 0 else "warning" if code == 1 else "critical"), text
    except OSError as e:
        return "critical", f"cannot run {chk.args[0] if chk.args else ''}: {e.strerror}"

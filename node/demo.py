"""`make run`: a local three-node cluster on loopback, a demo web service, and what to try.

Agents bind 127.0.0.1, 127.0.0.2 and 127.0.0.3 with the default ports, so the first one answers
on the default HTTP address and every CLI command works without flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from aiohttp import web

NODES = [("node1", "127.0.0.1"), ("node2", "127.0.0.2"), ("node3", "127.0.0.3")]
DEMO_PORT = 8080


def _start_agent(name: str, ip: str, data: Path, join: str | None) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "node",
        "agent",
        "--node",
        name,
        "--bind",
        ip,
        "--client",
        ip,
        "--data-dir",
        str(data / name),
        "--bootstrap-expect",
        str(len(NODES)),
    ]
    if join:
        argv += ["--join", join]
    log = open(data / f"{name}.log", "wb")  # noqa: SIM115 - handed to the child
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def _members(ip: str) -> list[dict[str, object]] | None:
    try:
        with urllib.request.urlopen(f"http://{ip}:8500/v1/agent/members", timeout=1) as r:
            data: list[dict[str, object]] = json.load(r)
            return data
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _leader(ip: str) -> str:
    try:
        with urllib.request.urlopen(f"http://{ip}:8500/v1/status/leader", timeout=1) as r:
            return str(json.load(r))
    except (OSError, urllib.error.URLError, ValueError):
        return ""


def _register_demo_service() -> None:
    """The demo web service, registered with node1 and health-checked by it over HTTP."""
    body = json.dumps({
        "Name": "web", "Port": DEMO_PORT, "Tags": ["demo"],
        "Check": {"HTTP": f"http://127.0.0.1:{DEMO_PORT}/", "Interval": "2s"},
    }).encode()  # fmt: skip
    req = urllib.request.Request(
        "http://127.0.0.1:8500/v1/agent/service/register", data=body, method="PUT"
    )
    with urllib.request.urlopen(req, timeout=5):
        pass


def _wait_converged(timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        views = [_members(ip) for _, ip in NODES]
        if all(
            v is not None and sum(m.get("Status") == 1 for m in v) == len(NODES) for v in views
        ) and all(_leader(ip) for _, ip in NODES):
            return True
        time.sleep(0.2)
    return False


async def _demo_service(stop: asyncio.Event) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"service": "web", "message": "hello from the meshnode demo"})

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", DEMO_PORT).start()
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    data = Path(tempfile.mkdtemp(prefix="meshnode-demo-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, (name, ip) in enumerate(NODES):
            procs.append(_start_agent(name, ip, data, None if i == 0 else f"{NODES[0][1]}:8301"))
            if i == 0:
                time.sleep(1.0)
        if not _wait_converged(30):
            print(f"the cluster did not form; logs are in {data}", file=sys.stderr)
            return 1
        _register_demo_service()
        print(
            f"""
meshnode demo: 3 agents on 127.0.0.1-3 (gossip :8301, Raft :8300, HTTP :8500), one Raft
cluster (leader {_leader(NODES[0][1])}), demo web service on http://127.0.0.1:{DEMO_PORT}/ .
Logs and data: {data}

Try, in another terminal (source .venv/bin/activate first):
  meshnode members
  meshnode operator raft list-peers
  meshnode kv put greeting hello && meshnode kv get greeting --http-addr 127.0.0.3:8500
  curl -s 'http://127.0.0.2:8500/v1/kv/greeting?consistent'
  dig @127.0.0.2 -p 8600 web.service.consul SRV       # the demo service, from any agent
  curl -s 'http://127.0.0.3:8500/v1/health/service/web?passing'
  meshnode event deploy v2 && curl -s http://127.0.0.2:8500/v1/event/list
  kill -9 {procs[2].pid}        # node3: the others see it failed within seconds
  curl -s http://127.0.0.1:{DEMO_PORT}/

Ctrl-C stops everything (each agent leaves gracefully).
""",
            flush=True,
        )
        stop = asyncio.Event()

        async def run() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await _demo_service(stop)

        asyncio.run(run())
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
            if p.poll() is None:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())

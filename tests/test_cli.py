"""The `meshnode` client commands against the real HTTP API (agent with a fake gossip runtime),
plus one end-to-end run of a real `meshnode agent --dev` process.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import structlog

from gossip.keyring import generate_key
from node import cli
from node.agent import Agent
from tests.harness.agents import free_port
from tests.test_http_api import AgentMaker, FakeRuntime, FakeWorld, fake, make_config, settle

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet_agent_logs() -> Iterator[None]:
    """The in-process agent logs through structlog; keep that out of the CLI's stdout."""
    with structlog.testing.capture_logs():
        yield


@pytest.fixture
def world() -> FakeWorld:
    return FakeWorld()


@pytest.fixture
async def make_agent(tmp_path: Path, world: FakeWorld) -> AsyncIterator[AgentMaker]:
    agents: list[Agent] = []

    async def make(**overrides: Any) -> Agent:
        config = make_config(tmp_path, **overrides)
        agent = Agent(config, runtime_factory=partial(FakeRuntime, world))
        agents.append(agent)
        await agent.start()
        return agent

    yield make
    for a in agents:
        await a.stop()


@pytest.fixture
async def agent(make_agent: AgentMaker) -> Agent:
    return await make_agent()


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """cli.main in a worker thread (it blocks on urllib) while the agent serves on this loop."""
    capsys.readouterr()
    rc = await asyncio.to_thread(cli.main, list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def addr(agent: Agent) -> list[str]:
    return ["--http-addr", f"http://127.0.0.1:{agent.http.port}"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----- keygen -----


def test_keygen_prints_a_fresh_32_byte_key(capsys: pytest.CaptureFixture[str]) -> None:
    keys = []
    for _ in range(2):
        assert cli.main(["keygen"]) == 0
        out = capsys.readouterr().out
        assert out.endswith("\n") and out.count("\n") == 1
        keys.append(out.strip())
        assert len(base64.b64decode(keys[-1], validate=True)) == 32
    assert keys[0] != keys[1]


# ----- members -----


def test_format_members_table() -> None:
    members = [
        {"Name": "zeta", "Addr": "10.0.0.2", "Port": 8301, "Status": 4, "Tags": {"role": "node"}},
        {"Name": "alpha", "Addr": "10.0.0.10", "Port": 7946, "Status": 1,
         "Tags": {"dc": "dc1", "b": "2", "a": "1"}},
        {"Name": "mid", "Addr": "10.0.0.3", "Port": 8301, "Status": 3, "Tags": {}},
        {"Name": "odd", "Addr": "10.0.0.4", "Port": 8301, "Status": 9, "Tags": {}},
    ]  # fmt: skip
    assert cli.format_members(members).splitlines() == [
        "Node   Address         Status  Tags",
        "alpha  10.0.0.10:7946  alive   a=1,b=2,dc=dc1",
        "mid    10.0.0.3:8301   left",
        "odd    10.0.0.4:8301   9",
        "zeta   10.0.0.2:8301   failed  role=node",
    ]


async def test_members_table_and_json(
    agent: Agent, world: FakeWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    world.add_peer("node2", "127.0.0.9", 8301)
    await agent.runtime.join(["127.0.0.9"])
    rc, out, err = await run(capsys, "members", *addr(agent))
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["Node", "Address", "Status", "Tags"]
    assert lines[1].split()[:3] == ["node1", "127.0.0.1:18301", "alive"]
    assert f"id={agent.node_id}" in lines[1] and "role=node" in lines[1]
    assert lines[2].split() == ["node2", "127.0.0.9:8301", "alive", "role=node"]

    rc, out, _ = await run(capsys, "members", "--format", "json", *addr(agent))
    assert rc == 0
    assert [m["Name"] for m in json.loads(out)] == ["node1", "node2"]


async def test_http_addr_from_env_and_without_scheme(
    agent: Agent, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHNODE_HTTP_ADDR", f"127.0.0.1:{agent.http.port}")
    rc, out, _ = await run(capsys, "members")
    assert rc == 0 and "node1" in out


async def test_unreachable_agent(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    rc, out, err = await run(capsys, "members", "--http-addr", f"http://127.0.0.1:{port}")
    assert rc == 1 and out == ""
    assert err == (
        f"meshnode: error: cannot reach agent at http://127.0.0.1:{port}: connection refused\n"
    )


def test_bad_http_addr_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["members", "--http-addr", "ftp://x:1"]) == 2
    assert capsys.readouterr().err == (
        "meshnode: error: --http-addr: must be http://host:port, got 'ftp://x:1'\n"
    )


# ----- join / leave -----


async def test_join(agent: Agent, world: FakeWorld, capsys: pytest.CaptureFixture[str]) -> None:
    world.add_peer("node2", "127.0.0.9", 8301)
    rc, out, err = await run(capsys, "join", *addr(agent), "127.0.0.9")
    assert (rc, err) == (0, "")
    assert out == "Successfully joined cluster by contacting 1 nodes.\n"
    assert fake(agent).join_calls[-1] == ["127.0.0.9"]

    rc, out, err = await run(capsys, "join", *addr(agent), "127.0.0.66:8301", "127.0.0.9:8301")
    assert rc == 0 and out == "Successfully joined cluster by contacting 1 nodes.\n"
    assert err.startswith("meshnode: error: joining 127.0.0.66:8301: agent returned 500: ")
    assert "connection refused" in err

    rc, out, err = await run(capsys, "join", *addr(agent), "127.0.0.66")
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and "joining 127.0.0.66" in err


async def test_leave(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run(capsys, "leave", *addr(agent))
    assert (rc, out, err) == (0, "Graceful leave complete\n", "")
    assert fake(agent).left
    await settle()
    assert agent.shutting_down


# ----- event -----


async def test_event(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = await run(capsys, "event", *addr(agent), "--node", "node.*", "deploy", "v1.2")
    assert (rc, err) == (0, "")
    assert out.startswith("Event ID: ")
    event_id = out.split(": ", 1)[1].strip()
    await settle()
    (ev,) = agent.events.matching("deploy")
    assert ev.id == event_id and ev.payload == b"v1.2" and ev.node_filter == "node.*"

    rc, out, err = await run(capsys, "event", *addr(agent), "bare")
    assert rc == 0
    await settle()
    assert agent.events.matching("bare")[0].payload is None

    rc, _, err = await run(capsys, "event", *addr(agent), "--tag", "x", "deploy")
    assert rc == 2 and err == "meshnode: error: --tag: cannot be used without --service\n"

    rc, _, err = await run(capsys, "event", *addr(agent), "big", "x" * 600)
    assert rc == 1
    assert err.startswith("meshnode: error: agent returned 400: ") and "512 bytes" in err


# ----- keyring -----


async def test_keyring_flow(make_agent: AgentMaker, capsys: pytest.CaptureFixture[str]) -> None:
    k1, k2 = generate_key(), generate_key()
    agent = await make_agent(encrypt=k1)
    a = addr(agent)

    rc, out, err = await run(capsys, "keyring", "--list", *a)
    assert (rc, err) == (0, "")
    assert out.splitlines() == [
        "==> Gathering installed encryption keys...",
        "",
        "dc1 (LAN):",
        f"  {k1} [1/1]",
        "Primary key:",
        f"  {k1} [1/1]",
    ]

    rc, out, err = await run(capsys, "keyring", "--install", k2, *a)
    assert (rc, out, err) == (0, "==> Installing new gossip encryption key...\n", "")
    rc, out, _ = await run(capsys, "keyring", "--use", k2, *a)
    assert (rc, out) == (0, "==> Changing primary gossip encryption key...\n")
    rc, out, _ = await run(capsys, "keyring", "--remove", k1, *a)
    assert (rc, out) == (0, "==> Removing gossip encryption key...\n")
    kr = fake(agent).keyring
    assert kr is not None and [base64.b64encode(k).decode() for k in kr.keys] == [k2]

    rc, _, err = await run(capsys, "keyring", "--remove", k2, *a)
    assert rc == 1
    assert err.startswith("meshnode: error: agent returned 500: dc1 (LAN) error: 1/1 nodes")

    rc, _, err = await run(capsys, "keyring", "--install", "bogus!", *a)
    assert rc == 2 and err.startswith("meshnode: error: --install: encryption key is not valid")

    rc, _, err = await run(capsys, "keyring", *a)
    assert rc == 2 and err.count("\n") == 1 and "one of the arguments" in err


async def test_keyring_without_encryption(agent: Agent, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = await run(capsys, "keyring", "--list", *addr(agent))
    assert rc == 1 and "gossip encryption is not enabled" in err


# ----- a real agent process -----


def _get(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=2) as r:
        return json.loads(r.read())


@pytest.mark.cluster
def test_real_dev_agent_members_then_leave(tmp_path: Path) -> None:
    serf, http = free_port("127.0.0.1"), free_port("127.0.0.1", udp=False)
    server = free_port("127.0.0.1", udp=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MESHNODE_HTTP_ADDR": f"127.0.0.1:{http}"}
    base = [sys.executable, "-m", "node"]
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*base, "agent", "--dev", "--node", "solo", "--serf-port", str(serf),
             "--http-port", str(http), "--server-port", str(server), "--log-json",
             "--log-level", "debug"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                me = _get(f"http://127.0.0.1:{http}/v1/agent/self")
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
        assert me["Config"]["NodeName"] == "solo" and me["Member"]["Port"] == serf

        r = subprocess.run([*base, "members"], env=env, capture_output=True, text=True, timeout=20)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[1].split()[:3] == ["solo", f"127.0.0.1:{serf}", "alive"]

        r = subprocess.run([*base, "leave"], env=env, capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stdout) == (0, "Graceful leave complete\n"), r.stderr
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=5)

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    events = [rec["event"] for rec in records]
    for name in ("agent.started", "agent.leaving", "agent.left", "agent.stopped"):
        assert name in events, events
    started = records[events.index("agent.started")]
    assert started["level"] == "info" and started["node"] == "solo" and "timestamp" in started
    assert any(rec["event"] == "http.request" and rec["level"] == "debug" for rec in records)


@pytest.mark.cluster
def test_dev_agent_accepts_writes_within_a_second(tmp_path: Path) -> None:
    """`meshnode agent --dev` is a one-node cluster ready within a second: from the process
    spawn to the first acknowledged KV write. Best of three, so that one scheduling hiccup on a
    busy machine does not decide it."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    times = []
    for attempt in range(3):
        http = free_port("127.0.0.1", udp=False)
        argv = [sys.executable, "-m", "node", "agent", "--dev", "--node", f"quick{attempt}",
                "--data-dir", str(tmp_path / f"d{attempt}"), "--bind", "127.0.0.1",
                "--serf-port", str(free_port("127.0.0.1")), "--http-port", str(http),
                "--dns-port", str(free_port("127.0.0.1")), "--log-level", "warn",
                "--server-port", str(free_port("127.0.0.1", udp=False))]  # fmt: skip
        log_path = tmp_path / f"agent{attempt}.log"
        put = urllib.request.Request(f"http://127.0.0.1:{http}/v1/kv/ready", b"1", method="PUT")
        with log_path.open("wb") as log:
            start = time.monotonic()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            while True:
                assert proc.poll() is None, log_path.read_text()
                try:
                    with opener.open(put, timeout=2) as r:
                        if r.status == 200 and json.loads(r.read()) is True:
                            break
                except OSError:
                    pass
                assert time.monotonic() - start < 20, log_path.read_text()
                time.sleep(0.01)
            times.append(time.monotonic() - start)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=5)
    assert min(times) < 1.0, f"spawn to first acknowledged write: {times}"

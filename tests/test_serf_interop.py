"""Interop with a stock `serf agent` (Debian serf 0.9.4): real processes on loopback.

Covers: serf joins meshnode and meshnode joins serf; members and tags on both sides; user events
both ways; kill -9 on either side seen as failed within memberlist's suspicion bounds; graceful
leave seen as left; gossip encryption with the same key, refusal with a wrong or missing key;
`serf keys` and `meshnode keyring` rotating keys across a mixed cluster.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.agents import (
    STATUS_ALIVE,
    STATUS_FAILED,
    AgentProc,
    SerfProc,
    free_port,
    wait_until,
)

# No skip when serf is missing: interop is a promise, and `make test` installs serf.
pytestmark = [pytest.mark.interop]

# Suspicion for a 3-4 node cluster: at most 6 x 4 s, plus probing and dissemination.
FAILURE_BOUND = 35.0


@pytest.fixture
def procs() -> Iterator[list[AgentProc | SerfProc]]:
    made: list[AgentProc | SerfProc] = []
    yield made
    for p in made:
        if isinstance(p, SerfProc):
            p.kill9()
        else:
            p.stop(timeout=5)


def serf_proc(name: str, ip: str, tmp: Path, **kw: object) -> SerfProc:
    return SerfProc(name, f"{ip}:{free_port(ip)}", f"{ip}:{free_port(ip, udp=False)}", tmp,
                    **kw)  # type: ignore[arg-type]


def meshnode_cli(agent: AgentProc, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "node", *args, "--http-addr", agent.http_base],
        capture_output=True, text=True, timeout=30, env=env,
    )


def serf_status(s: SerfProc, name: str) -> str | None:
    return s.member_status(name)


def test_mixed_cluster_membership_events_failures_and_leave(
    tmp_path: Path, procs: list[AgentProc | SerfProc]
) -> None:
    m1 = AgentProc("mesh1", "127.0.0.2", tmp_path)
    procs.append(m1)
    m1.start().wait_ready()
    s1 = serf_proc("serf1", "127.0.0.3", tmp_path, tags={"role": "web"}, join=[m1.serf_addr])
    procs.append(s1)
    s1.start().wait_ready()
    # a stock serf joined meshnode: both list each other alive, with tags
    wait_until(lambda: serf_status(s1, "mesh1") == "alive", 10, desc="serf sees mesh1 alive")
    tags = next(m["tags"] for m in s1.members() if m["name"] == "mesh1")
    assert tags["role"] == "node" and tags["dc"] == "dc1" and "build" in tags and "port" in tags
    wait_until(lambda: m1.member_status("serf1") == STATUS_ALIVE, 10, desc="mesh1 sees serf1")
    out = meshnode_cli(m1, "members", "--format", "json")
    assert out.returncode == 0, out.stderr
    listed = {m["Name"]: m for m in json.loads(out.stdout)}
    assert listed["serf1"]["Tags"] == {"role": "web"}

    # meshnode joins serf (the reverse direction), by address of the serf agent
    s2 = serf_proc("serf2", "127.0.0.4", tmp_path)
    procs.append(s2)
    s2.start().wait_ready()
    m2 = AgentProc("mesh2", "127.0.0.5", tmp_path, join=[s2.bind])
    procs.append(m2)
    m2.start().wait_ready()
    # and the two halves meet: serf2 joins serf1 through the serf CLI
    assert s2.cli("join", s1.bind).returncode == 0
    names = {"mesh1", "mesh2", "serf1", "serf2"}
    for a in (m1, m2):
        wait_until(lambda a=a: a.alive_members() == names, 15, desc=f"{a.name} sees all")
    for s in (s1, s2):
        wait_until(
            lambda s=s: {m["name"] for m in s.members() if m["status"] == "alive"} == names,
            15, desc=f"{s.name} sees all",
        )  # fmt: skip

    # user events both ways
    s1.event("deploy", "hello")
    wait_until(
        lambda: any(e["Name"] == "deploy" and base64.b64decode(e["Payload"]) == b"hello"
                    for e in m2.http("GET", "/v1/event/list")[1]),
        10, desc="serf event reaches mesh2",
    )  # fmt: skip
    out = meshnode_cli(m1, "event", "rollout", "v2")
    assert out.returncode == 0, out.stderr
    # Consul fires its events as serf user events named "consul:event:<name>"; so do we
    wait_until(lambda: "user-event: consul:event:rollout" in s2.log_text(), 10,
               desc="serf2 gets rollout")

    # kill -9 of a serf agent: meshnode marks it failed; of a meshnode agent: serf does
    s2.kill9()
    wait_until(lambda: m1.member_status("serf2") == STATUS_FAILED, FAILURE_BOUND,
               desc="mesh1 sees serf2 failed")
    m2.kill9()
    wait_until(lambda: serf_status(s1, "mesh2") == "failed", FAILURE_BOUND,
               desc="serf1 sees mesh2 failed")

    # graceful leave of meshnode is "left" (not failed) on the serf side
    out = meshnode_cli(m1, "leave")
    assert out.returncode == 0, out.stderr
    wait_until(lambda: serf_status(s1, "mesh1") == "left", 15, desc="serf1 sees mesh1 left")
    assert m1.popen is not None and m1.popen.wait(timeout=15) == 0


def test_encryption_interop_and_wrong_key(
    tmp_path: Path, procs: list[AgentProc | SerfProc]
) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    other = base64.b64encode(os.urandom(32)).decode()
    m1 = AgentProc("emesh1", "127.0.0.6", tmp_path, encrypt=key)
    procs.append(m1)
    m1.start().wait_ready()
    good = serf_proc("eserf1", "127.0.0.7", tmp_path, encrypt=key, join=[m1.serf_addr])
    procs.append(good)
    good.start().wait_ready()
    wait_until(lambda: m1.member_status("eserf1") == STATUS_ALIVE, 10, desc="encrypted join")
    wait_until(lambda: serf_status(good, "emesh1") == "alive", 10, desc="serf sees emesh1")

    wrong = serf_proc("eserf2", "127.0.0.8", tmp_path, encrypt=other)
    plain = serf_proc("eserf3", "127.0.0.9", tmp_path)
    procs += [wrong, plain]
    for s in (wrong, plain):
        s.start().wait_ready()
        r = s.cli("join", m1.serf_addr, timeout=20)
        assert r.returncode != 0, f"{s.name} joined without the right key: {r.stdout}"
    # a meshnode agent with the wrong key cannot join either
    m2 = AgentProc("emesh2", "127.0.0.10", tmp_path, encrypt=other)
    procs.append(m2)
    m2.start().wait_ready()
    out = meshnode_cli(m2, "join", m1.serf_addr)
    assert out.returncode != 0
    assert m1.member_status("eserf2") is None and m1.member_status("emesh2") is None
    assert m1.member_status("eserf3") is None
    # each refused stream (wrong key, plaintext, wrong key) was counted, nothing crashed
    stats = m1.http("GET", "/v1/agent/self")[1]["Stats"]["serf_lan"]
    assert int(stats["tcp_errors"]) >= 3, stats
    assert m1.running

    # key rotation driven from serf reaches meshnode, and from meshnode reaches serf
    k2 = base64.b64encode(os.urandom(32)).decode()
    r = good.cli("keys", "-install", k2)
    assert r.returncode == 0, r.stdout + r.stderr
    out = meshnode_cli(m1, "keyring", "--list")
    assert out.returncode == 0 and k2 in out.stdout, out.stdout + out.stderr
    out = meshnode_cli(m1, "keyring", "--use", k2)
    assert out.returncode == 0, out.stdout + out.stderr
    out = meshnode_cli(m1, "keyring", "--remove", key)
    assert out.returncode == 0, out.stdout + out.stderr
    r = good.cli("keys", "-list")
    assert r.returncode == 0 and k2 in r.stdout and key not in r.stdout, r.stdout
    # still one cluster under the new key
    good.event("after-rotation", "x")
    wait_until(
        lambda: any(e["Name"] == "after-rotation" for e in m1.http("GET", "/v1/event/list")[1]),
        10, desc="event after rotation",
    )  # fmt: skip

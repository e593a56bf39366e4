"""Service discovery on a real 3-agent cluster: a service registered with one agent is found
through every agent's DNS and health API, and drops out when its node dies."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agents import AgentProc, LocalCluster, wait_until

pytestmark = pytest.mark.cluster


def dig_short(a: AgentProc, name: str) -> list[str]:
    dig = shutil.which("dig")
    if dig is None:
        pytest.fail("dig is missing: `make test` installs dnsutils")
    out = subprocess.run(
        [dig, "+short", "+time=2", "+tries=1", "-p", str(a.ports.dns), f"@{a.client}", name],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    return sorted(out.stdout.split())


def passing(a: AgentProc, service: str) -> list[str]:
    status, body = a.http("GET", f"/v1/health/service/{service}?passing")
    assert status == 200, body
    return sorted(e["Node"]["Node"] for e in body)


def test_a_service_is_found_everywhere_and_leaves_dns_when_its_node_dies(tmp_path: Path) -> None:
    with LocalCluster(3, tmp_path, extra_args=["--bootstrap-expect", "3"]) as c:
        c.start()
        wait_until(lambda: all(a.http("GET", "/v1/status/leader")[1] for a in c), timeout=30)
        for a in c:  # each agent runs one instance, with a check the agent itself runs
            body = {"Name": "web", "Port": 8080,
                    "Check": {"TCP": f"{a.bind}:{a.ports.http}", "Interval": "500ms"}}  # fmt: skip
            assert a.http("PUT", "/v1/agent/service/register", body) == (200, "")
        everyone = sorted(a.bind for a in c)
        for a in c:
            wait_until(lambda a=a: dig_short(a, "web.service.consul") == everyone, timeout=15,  # type: ignore[misc]
                       desc=f"all instances in {a.name}'s DNS")  # fmt: skip
        victim = c[2]
        victim.kill9()
        survivors = [a for a in c if a is not victim]
        rest = sorted(a.bind for a in survivors)
        for a in survivors:  # gossip declares it failed; the leader turns serfHealth critical
            wait_until(lambda a=a: dig_short(a, "web.service.consul") == rest, timeout=20,  # type: ignore[misc]
                       desc=f"{victim.name} gone from {a.name}'s DNS")  # fmt: skip
            assert passing(a, "web") == sorted(x.name for x in survivors)


def test_reads_by_consistency_mode_with_and_without_a_leader(tmp_path: Path) -> None:
    """A follower's default read sees a write made through another agent; once quorum is lost,
    ?stale still answers from the local replica (KnownLeader false, LastContact growing), a
    default read fails with 500 "No cluster leader", and DNS keeps answering locally."""
    with LocalCluster(3, tmp_path, extra_args=["--bootstrap-expect", "3"]) as c:
        c.start()
        wait_until(lambda: all(a.http("GET", "/v1/status/leader")[1] for a in c), timeout=30)
        leader_addr = c[0].http("GET", "/v1/status/leader")[1]
        leader = next(a for a in c if leader_addr.startswith(f"{a.bind}:"))
        followers = [a for a in c if a is not leader]
        last = followers[1]
        body = {"Name": "web", "Port": 8080}
        assert last.http("PUT", "/v1/agent/service/register", body) == (200, "")
        for i in range(20):  # written through one follower, read at once through the other
            assert followers[0].http("PUT", "/v1/kv/seq", str(i)) == (200, True)
            status, entries = last.http("GET", "/v1/kv/seq")
            assert (
                status == 200 and entries[0]["Value"] == base64.b64encode(str(i).encode()).decode()
            ), f"default read on a follower missed write {i}"
        wait_until(lambda: dig_short(last, "web.service.consul") == [last.bind], timeout=15,
                   desc="the instance in DNS")  # fmt: skip

        leader.kill9()
        followers[0].kill9()  # one of three left: no quorum
        wait_until(lambda: last.http("GET", "/v1/status/leader")[1] == "", timeout=15,
                   desc="the survivor knows no leader")  # fmt: skip
        status, entries, headers = _get(last, "/v1/kv/seq?stale")
        assert status == 200 and entries[0]["Value"] == base64.b64encode(b"19").decode()
        assert headers["X-Consul-KnownLeader"] == "false"
        assert int(headers["X-Consul-LastContact"]) > 0
        started = time.monotonic()
        status, text, _ = _get(last, "/v1/kv/seq", timeout=30)
        assert status == 500 and "No cluster leader" in text, (status, text)
        assert time.monotonic() - started < 15
        assert dig_short(last, "web.service.consul") == [last.bind]


def _get(a: AgentProc, path: str, timeout: float = 5.0) -> tuple[int, Any, dict[str, str]]:
    """GET with the response headers, which AgentProc.http does not return."""
    req = urllib.request.Request(f"http://{a.client}:{a.ports.http}{path}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)

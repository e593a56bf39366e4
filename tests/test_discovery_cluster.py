"""Service discovery on a real 3-agent cluster: a service registered with one agent is found
through every agent's DNS and health API, and drops out when its node dies."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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

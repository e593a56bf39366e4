"""Five real agents on five hosts (network namespaces in 198.18.0.0/15).

Joins by address and by mDNS, a partitioned host is seen failed and comes back after healing,
a SIGKILLed agent is seen failed, and a graceful leave is seen as left.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness.agents import (
    STATUS_ALIVE,
    STATUS_FAILED,
    STATUS_LEFT,
    AgentProc,
    NetnsAgentCluster,
    wait_until,
)
from tests.harness.netns import NetnsCluster

pytestmark = [pytest.mark.netns, pytest.mark.cluster]

# memberlist LAN bounds for 5 nodes: suspicion at most 6 x 4 s, plus probe rounds
FAILURE_BOUND = 35.0


def statuses(agents: list[AgentProc], name: str) -> dict[str, int | None]:
    return {a.name: a.member_status(name) for a in agents if a.running and a.name != name}


def all_see(agents: list[AgentProc], name: str, status: int) -> bool:
    return all(s == status for s in statuses(agents, name).values())


def test_five_hosts_join_partition_heal_kill_leave(
    netns_cluster: Callable[..., NetnsCluster], tmp_path: Path
) -> None:
    net = netns_cluster(5)
    # hosts 1-4 join host 1 by address; host 5 finds the cluster only through mDNS
    with NetnsAgentCluster(net, tmp_path, hosts=[1, 2, 3, 4], discover="mdns") as cluster:
        cluster.start()
        mdns_only = AgentProc(
            "node5", net.ip(5), tmp_path, netns=net, host=5, discover="mdns"
        )
        cluster.agents.append(mdns_only)
        mdns_only.start().wait_ready()
        cluster.wait_converged(timeout=30)
        agents = cluster.agents

        # partition host 3: the others see it failed, it sees them failed; heal: all alive
        net.partition(3)
        others = [a for a in agents if a.host != 3]
        wait_until(lambda: all_see(others, "node3", STATUS_FAILED), FAILURE_BOUND,
                   desc="node3 failed while partitioned")
        net.heal(3)
        # serf-style reconnect brings it back (reconnect interval is 30 s in the LAN profile)
        cluster.wait_converged(timeout=90)

        # SIGKILL host 4's agent: failed everywhere
        cluster.agent_on(4).kill9()
        alive = [a for a in agents if a.host != 4]
        wait_until(lambda: all_see(alive, "node4", STATUS_FAILED), FAILURE_BOUND,
                   desc="node4 failed after SIGKILL")

        # graceful leave of host 2 (SIGTERM): left, not failed, and the agent exits 0
        leaver = cluster.agent_on(2)
        assert leaver.stop() == 0
        rest = [a for a in alive if a.host != 2]
        wait_until(lambda: all_see(rest, "node2", STATUS_LEFT), 15, desc="node2 left")
        for a in rest:
            assert a.member_status(a.name) == STATUS_ALIVE

"""The sans-I/O gossip core at scale, on the deterministic simulated network.

Every assertion message carries the seed; `MESHNODE_SIM_SEED=<seed>` replays a run exactly.
"""

from __future__ import annotations

import os

import pytest

from gossip.member import MemberStatus
from tests.sim.bare import preload_converged
from tests.sim.network import SimNetwork, SimNode

SEED = int(os.environ.get("MESHNODE_SIM_SEED", "20261124"))
N = int(os.environ.get("MESHNODE_SIM_NODES", "1000"))


def build(net: SimNetwork, n: int, *, join_window: float = 5.0) -> list[SimNode]:
    """Start n nodes; each joins a random earlier node, spread over join_window seconds."""
    nodes = [net.add_node()]
    for i in range(1, n):
        node = net.add_node()
        seed = nodes[net.rng.randrange(len(nodes))]
        nodes.append(node)
        net.at(net.now + join_window * i / n, lambda node=node, seed=seed: net.join(node, seed))
    return nodes


def converge(net: SimNetwork, limit: float) -> float:
    start = net.now
    ok = net.run_until(net.now + limit, stop=net.all_see_all_alive)
    assert ok, f"no convergence within {limit}s of simulated time (replay with seed {net.seed})"
    return net.now - start


@pytest.fixture(scope="module")
def cluster() -> SimNetwork:
    """One 1,000-node cluster, shared by the scenarios below in order (formation is the cost)."""
    net = SimNetwork(SEED)
    build(net, N)
    converge(net, 120.0)
    return net


def test_every_member_converges_after_joins(cluster: SimNetwork) -> None:
    net = cluster
    assert len(net.nodes) == N
    assert net.all_see_all_alive(), f"seed {net.seed}"
    for n in net.nodes:
        assert len(n.serf.members_by_name) == N, f"{n.name} knows {len(n.serf.members_by_name)}"
        assert n.serf.local_member().tags["dc"] == "sim"


def test_crashed_node_is_marked_failed_everywhere(cluster: SimNetwork) -> None:
    net = cluster
    victim = net.nodes[net.rng.randrange(1, N)]
    net.crash(victim)
    t0 = net.now
    ok = net.run_until(t0 + 120.0, stop=lambda: net.all_see(victim.name, {MemberStatus.FAILED}))
    assert ok, f"{victim.name} not seen failed everywhere (seed {net.seed})"
    # memberlist's bound: suspicion max timeout (6 x 4 x log10(n) s) plus dissemination
    assert net.now - t0 < 6 * 4 * 3 + 20, f"detection took {net.now - t0:.1f}s (seed {net.seed})"


def test_packet_loss_never_kills_a_healthy_node(cluster: SimNetwork) -> None:
    """Lifeguard: with 5% loss, suspicion of a healthy node is always refuted."""
    net = cluster
    healthy = {n.name for n in net.live()}
    for n in net.nodes:
        n.failed_events.clear()
    net.loss = 0.05
    net.run_until(net.now + 60.0)
    net.loss = 0.0
    wrongly = {(n.name, who) for n in net.live() for _, who in n.failed_events if who in healthy}
    assert not wrongly, f"healthy nodes declared failed: {sorted(wrongly)[:5]} (seed {net.seed})"


def test_healed_partition_remerges(cluster: SimNetwork) -> None:
    """A tenth of the cluster is cut off and seen failed; after healing, all are alive again."""
    net = cluster
    live = net.live()
    cut = [n for n in live if n.index % 10 == 3]
    rest = [n for n in live if n.index % 10 != 3]
    net.partition(lambda n: int(n.index % 10 == 3))
    ok = net.run_until(
        net.now + 120.0,
        stop=lambda: all(net.all_see(c.name, {MemberStatus.FAILED}, rest) for c in cut[:5]),
        check=1.0,
    )
    assert ok, f"the majority did not see the cut-off nodes fail (seed {net.seed})"
    assert any(
        ms.member.status == MemberStatus.FAILED
        for ms in cut[0].serf.members_by_name.values()
    ), f"the cut-off side saw no failures (seed {net.seed})"
    net.heal()
    ok = net.run_until(net.now + 300.0, stop=lambda: net.all_see_all_alive(live), check=1.0)
    assert ok, f"partition did not re-merge after healing (seed {net.seed})"


def test_warm_started_bare_cluster_detects_a_crash() -> None:
    """The large-scale benchmark's mode (tests/sim/bare.py): memberlist alone, converged views
    preloaded. It must behave as a formed cluster does: quiet while healthy, a crash seen failed
    everywhere, and push/pulls spread over the interval scaled for n (not bunched in 30 s)."""
    n = 300
    net = SimNetwork(SEED, layer="memberlist")
    nodes = net.add_converged(n)
    assert net.all_see_all_alive(), f"seed {net.seed}"
    assert all(len(x.serf.memberlist.nodes) == n for x in nodes)
    pulls: list[float] = []
    original = net._push_pull

    def counting(*args: object, **kwargs: object) -> None:
        pulls.append(net.now)
        original(*args, **kwargs)  # type: ignore[arg-type]

    net._push_pull = counting  # type: ignore[method-assign]
    net.run_until(30.0)
    # scaled interval at 300 nodes is 30 * (ceil(log2 300) - 4) = 150 s: ~n/5 in the first 30 s
    assert n / 10 < len(pulls) < n / 3, f"{len(pulls)} push/pulls in 30 s (seed {net.seed})"
    assert not any(x.failed_events for x in nodes), f"seed {net.seed}"
    victim = nodes[net.rng.randrange(n)]
    net.crash(victim)
    t0 = net.now
    ok = net.run_until(t0 + 120.0, stop=lambda: net.all_see(victim.name, {MemberStatus.FAILED}))
    assert ok, f"{victim.name} not seen failed everywhere (seed {net.seed})"
    wrong = [(x.name, who) for x in net.live() for _, who in x.failed_events if who != victim.name]
    assert not wrong, f"healthy nodes declared failed: {wrong[:5]} (seed {net.seed})"


def test_preload_refuses_a_started_node() -> None:
    net = SimNetwork(SEED, layer="memberlist")
    node = net.add_node()
    with pytest.raises(ValueError, match="already has a view"):
        preload_converged([node.serf.memberlist], 0.0)

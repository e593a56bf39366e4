"""Which members vote: the leader's periodic decision of the next single configuration change.

There are no separate servers: every agent is in the Raft configuration, as a voter or as a
learner. The leader keeps 3 voters, or 5 once 5 or more members are healthy, out of the gossip
members; everyone else is a learner that replicates the log and serves stale reads.

A pure function of what the leader knows (gossip view, configuration, replication progress,
the clock), so the rules are unit-tested without a cluster. It returns at most one change, and
the caller applies it only when no other change is in flight: Raft allows one at a time.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from node.raft.types import Configuration, Server

__all__ = ["AutopilotConfig", "Health", "MemberView", "desired_voters", "next_change"]


class Health(enum.Enum):
    ALIVE = "alive"
    FAILED = "failed"
    LEFT = "left"


@dataclass(frozen=True, slots=True)
class MemberView:
    """A gossip member as autopilot sees it."""

    id: str
    node: str
    address: str  # ip:server-port
    health: Health
    since: float  # when the member entered its current health state


@dataclass(frozen=True, slots=True)
class AutopilotConfig:
    #: Consul's ServerStabilizationTime: a member must be healthy this long to be promoted, and
    #: a voter failed this long before it is replaced
    stabilization: float = 10.0
    #: a learner more than this many entries behind the leader is not promoted (Consul's
    #: MaxTrailingLogs)
    max_trailing: int = 250
    small_voters: int = 3
    large_voters: int = 5


def desired_voters(healthy: int, cfg: AutopilotConfig) -> int:
    return cfg.large_voters if healthy >= cfg.large_voters else cfg.small_voters


def next_change(
    config: Configuration,
    members: Mapping[str, MemberView],
    *,
    leader_id: str,
    match: Mapping[str, int],
    last_index: int,
    now: float,
    cfg: AutopilotConfig | None = None,
) -> Configuration | None:
    """The next configuration, or None when nothing should change now. Order of concern:
    1. remove servers whose member left the cluster (or was reaped from gossip),
    2. promote a healthy, caught-up learner while there are fewer healthy voters than wanted,
    3. demote a voter failed longer than the stabilization time (its replacement was promoted
       first, so the cluster never loses fault tolerance it had),
    4. add alive members missing from the configuration as learners.
    The leader itself is never removed or demoted here (it transfers leadership first).
    """
    cfg = cfg or AutopilotConfig()
    servers = config.servers

    for sid in sorted(servers):
        m = members.get(sid)
        if sid != leader_id and (m is None or m.health == Health.LEFT):
            return config.without(sid)

    def stable(m: MemberView | None) -> bool:
        return m is not None and m.health == Health.ALIVE and now - m.since >= cfg.stabilization

    healthy_members = sum(1 for m in members.values() if m.health == Health.ALIVE)
    want = desired_voters(healthy_members, cfg)
    voters = [sid for sid, s in servers.items() if s.voter]
    healthy_voters = [
        sid for sid in voters if sid == leader_id or members[sid].health == Health.ALIVE
    ]
    if len(healthy_voters) < want:
        candidates = [
            sid
            for sid, s in servers.items()
            if not s.voter
            and stable(members.get(sid))
            and last_index - match.get(sid, 0) <= cfg.max_trailing
        ]
        if candidates:
            sid = min(candidates)
            return config.with_server(_with_voter(servers[sid], True))

    failed_long = [
        sid
        for sid in voters
        if sid != leader_id
        and members[sid].health == Health.FAILED
        and now - members[sid].since >= cfg.stabilization
    ]
    # demote only when the healthy voters alone still reach the wanted count, or when the failed
    # voter's vote would otherwise keep an even-sized (and so less tolerant) configuration
    if failed_long and (len(healthy_voters) >= want or len(voters) % 2 == 0):
        return config.with_server(_with_voter(servers[min(failed_long)], False))

    # members that left shrink the cluster below 5: back to 3 voters (failed members still count,
    # they may come back; a failing learner must not make the voter count flap)
    staying = sum(1 for m in members.values() if m.health != Health.LEFT)
    if len(voters) > desired_voters(staying, cfg) and len(healthy_voters) >= len(voters):
        extra = sorted(sid for sid in voters if sid != leader_id)
        return config.with_server(_with_voter(servers[extra[-1]], False))

    for sid, m in sorted(members.items()):
        if sid not in servers and m.health == Health.ALIVE:
            return config.with_server(Server(sid, m.node, m.address, voter=False))
    return None


def _with_voter(s: Server, voter: bool) -> Server:
    return Server(s.id, s.node, s.address, voter)

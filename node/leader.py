"""What only the Raft leader decides, turned into log writes that every replica applies.

* Member reconciliation (Consul's `reconcileMember`): each gossip member is a catalog node with a
  `serfHealth` check, passing while the member is alive, critical once gossip declares it
  failed (which invalidates the sessions bound to that check), deregistered when it leaves or
  is reaped. Voters also carry the `consul` service, as Consul's servers do.
* Session TTLs (Consul keeps the timers on the leader only): a session not renewed within
  2 x TTL is destroyed. A new leader re-arms every TTL session from scratch.
* Tombstone reaping: deleted KV keys leave tombstones so list indexes never go backwards; they
  are reaped once older than TOMBSTONE_TTL (Consul's tombstone GC, 15 minutes).

The decisions are plain functions of the store, the members and the clock, so they are unit
tested without a cluster; `Consensus` calls them on the leader and proposes what they return.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from node.raft.autopilot import Health
from node.state import StateStore, parse_duration
from node.state import commands as cmd

__all__ = [
    "FAILED_OUTPUT",
    "SERF_CHECK_ID",
    "SESSION_TTL_MULTIPLIER",
    "LeaderDuties",
    "MemberInfo",
    "catalog_commands",
]

SERF_CHECK_ID = "serfHealth"
SERF_CHECK_NAME = "Serf Health Status"
ALIVE_OUTPUT = "Agent alive and reachable"
FAILED_OUTPUT = "Agent not live or unreachable"
CONSUL_SERVICE = "consul"
SESSION_TTL_MULTIPLIER = 2
TOMBSTONE_TTL = 900.0
TOMBSTONE_GRANULARITY = 30.0
#: a catalog node that gossip no longer lists is deregistered only after this long, so a leader
#: whose gossip view is still filling (it just restarted) does not drop live nodes
REAP_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class MemberInfo:
    name: str
    id: str
    ip: str
    health: Health
    server_port: int
    voter: bool


def _node_fields(store: StateStore, m: MemberInfo, datacenter: str) -> dict[str, Any]:
    existing = store.catalog.node(m.name) or {}
    return {
        "node_id": m.id,
        "datacenter": datacenter,
        # keep what the agent itself registered (anti-entropy owns the node's meta)
        "tagged_addresses": existing.get("TaggedAddresses") or {"lan": m.ip, "wan": m.ip},
        "node_meta": existing.get("Meta") or {},
    }


def catalog_commands(
    store: StateStore,
    members: list[MemberInfo],
    *,
    datacenter: str,
    now: float,
    reapable: set[str] | frozenset[str] = frozenset(),
) -> list[bytes]:
    """The writes that make the catalog match gossip; empty when it already does.

    `reapable`: catalog nodes with a serfHealth check that gossip has not listed for
    REAP_GRACE; only those are deregistered for being unknown.
    """
    out: list[bytes] = []
    catalog = store.catalog
    known = {m.name for m in members}
    for m in sorted(members, key=lambda m: m.name):
        node = catalog.node(m.name)
        check = catalog.check(m.name, SERF_CHECK_ID)
        if m.health == Health.LEFT:
            if node is not None and check is not None:
                out.append(cmd.deregister(m.name, now=now))
            continue
        alive = m.health == Health.ALIVE
        status, output = ("passing", ALIVE_OUTPUT) if alive else ("critical", FAILED_OUTPUT)
        stale_node = node is None or node["Address"] != m.ip or node["ID"] != m.id.lower()
        if stale_node or check is None or check["Status"] != status:
            out.append(
                cmd.register(
                    m.name,
                    m.ip,
                    **_node_fields(store, m, datacenter),
                    checks=[
                        {
                            "CheckID": SERF_CHECK_ID,
                            "Name": SERF_CHECK_NAME,
                            "Status": status,
                            "Output": output,
                        }
                    ],
                    now=now,
                )
            )
        has_service = catalog.service(m.name, CONSUL_SERVICE) is not None
        if m.voter and alive and (not has_service or stale_node):
            out.append(
                cmd.register(
                    m.name,
                    m.ip,
                    **_node_fields(store, m, datacenter),
                    service={"ID": CONSUL_SERVICE, "Service": CONSUL_SERVICE,
                             "Port": m.server_port},
                    now=now,
                )
            )  # fmt: skip
        elif not m.voter and has_service:
            out.append(cmd.deregister(m.name, service_id=CONSUL_SERVICE, now=now))
    for name in sorted(reapable):
        if name not in known and catalog.check(name, SERF_CHECK_ID) is not None:
            out.append(cmd.deregister(name, now=now))
    return out


class LeaderDuties:
    """The leader's timers; reset whenever this node becomes leader."""

    def __init__(self) -> None:
        self._session_deadlines: dict[str, float] = {}
        self._missing_since: dict[str, float] = {}
        self._tomb_samples: deque[tuple[float, int]] = deque()
        self._reaped_to = 0

    def on_leadership(self, store: StateStore, now: float) -> None:
        self._session_deadlines = {
            sid: now + ttl * SESSION_TTL_MULTIPLIER for sid, ttl in store.sessions.with_ttl()
        }
        self._missing_since.clear()
        self._tomb_samples.clear()

    # -- sessions -------------------------------------------------------------------------------

    def renew(self, store: StateStore, session_id: str, now: float) -> bool:
        """Reset a session's timer; False when the session does not exist."""
        session = store.sessions.get(session_id)
        if session is None:
            return False
        if session["TTL"]:
            ttl = parse_duration(session["TTL"])
            self._session_deadlines[session_id] = now + ttl * SESSION_TTL_MULTIPLIER
        return True

    def expired_sessions(self, store: StateStore, now: float) -> list[str]:
        """Arm timers for new TTL sessions, forget destroyed ones, return the expired."""
        current = dict(store.sessions.with_ttl())
        for sid in list(self._session_deadlines):
            if sid not in current:
                del self._session_deadlines[sid]
        for sid, ttl in current.items():
            self._session_deadlines.setdefault(sid, now + ttl * SESSION_TTL_MULTIPLIER)
        return sorted(sid for sid, t in self._session_deadlines.items() if t <= now)

    # -- catalog --------------------------------------------------------------------------------

    def reapable(self, store: StateStore, members: list[MemberInfo], now: float) -> set[str]:
        known = {m.name for m in members}
        gossip_nodes = {
            n["Node"]
            for n in store.catalog.list_nodes()
            if store.catalog.check(n["Node"], SERF_CHECK_ID) is not None
        }
        missing = gossip_nodes - known
        self._missing_since = {n: self._missing_since.get(n, now) for n in missing}
        return {n for n, t in self._missing_since.items() if now - t >= REAP_GRACE}

    # -- tombstones -----------------------------------------------------------------------------

    def tombstones_to_reap(
        self, store: StateStore, now: float, ttl: float = TOMBSTONE_TTL
    ) -> int | None:
        """The index to reap tombstones up to, once tombstones written before it are old."""
        # a delete moves the kvs index too, so it bounds every tombstone written so far (the
        # tombstones index itself also moves when a reap is applied)
        index = store.table_index("kvs")
        last = self._tomb_samples[-1] if self._tomb_samples else None
        if len(store.kv.tombstones) and index > self._reaped_to and (last is None or (
            index != last[1] and now - last[0] >= TOMBSTONE_GRANULARITY
        )):  # fmt: skip
            self._tomb_samples.append((now, index))
        reap: int | None = None
        while self._tomb_samples and now - self._tomb_samples[0][0] >= ttl:
            reap = self._tomb_samples.popleft()[1]
        if reap is not None:
            self._reaped_to = reap
        return reap

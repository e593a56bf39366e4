"""A deterministic simulated network for the sans-I/O gossip core.

One seeded RNG decides loss, delay and every node's randomness, so a failing run replays exactly
from its seed. Datagrams go through the real codec (bytes in, bytes out); TCP push/pull and TCP
pings are modelled as reliable exchanges that fail when either side is cut off.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog

from gossip.config import GossipConfig
from gossip.member import MemberEvent, MemberEventType, MemberStatus
from gossip.serf import Serf
from gossip.swim import (
    Address,
    Memberlist,
    ProtocolError,
    SendPacket,
    StartPushPull,
    StartTcpPing,
)
from tests.sim.bare import BareDelegate, BareNode, preload_converged


@dataclass
class SimNode:
    index: int
    name: str
    addr: Address
    serf: Serf | BareNode
    crashed: bool = False
    group: int = 0
    scheduled: float | None = None
    failed_events: list[tuple[float, str]] = field(default_factory=list)


class SimNetwork:
    def __init__(
        self,
        seed: int,
        *,
        config: GossipConfig | None = None,
        loss: float = 0.0,
        min_delay: float = 0.0005,
        max_delay: float = 0.005,
        layer: Literal["serf", "memberlist"] = "serf",
    ) -> None:
        """`layer="memberlist"` runs bare memberlist nodes (tests/sim/bare.py), for sizes where
        Serf's per-member state does not fit in memory."""
        # a thousand nodes logging every suspicion would drown the test output and its speed
        structlog.configure(
            wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
            cache_logger_on_first_use=True,
        )
        self.seed = seed
        self.rng = random.Random(seed)
        self.config = config or GossipConfig.lan()
        self.loss = loss
        self.min_delay = min_delay
        self.max_delay = max_delay
        self.layer = layer
        self.now = 0.0
        self.nodes: list[SimNode] = []
        self.by_addr: dict[Address, SimNode] = {}
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._deadlines: list[tuple[float, int, int]] = []
        self.partitioned = False
        self.packets = 0
        self.packets_dropped = 0
        self.bytes = 0

    # -- building -----------------------------------------------------------------------------

    def add_node(self, name: str | None = None) -> SimNode:
        node = self._make_node(name)
        node.serf.start(self.now)
        self._service(node)
        return node

    def add_converged(self, n: int) -> list[SimNode]:
        """n bare memberlist nodes that start with the converged view of a long-running
        cluster (no joins simulated); see tests/sim/bare.py."""
        if self.layer != "memberlist":
            raise ValueError("add_converged needs layer='memberlist'")
        new = [self._make_node(None) for _ in range(n)]
        preload_converged([x.serf.memberlist for x in new], self.now)
        for node in new:
            node.serf.start(self.now)
            self._service(node)
        return new

    def _make_node(self, name: str | None) -> SimNode:
        i = len(self.nodes)
        name = name or f"n{i:05d}"
        addr = (f"198.18.{i // 250}.{i % 250 + 1}", 7946)
        rng = random.Random(self.rng.getrandbits(64))
        peer: Serf | BareNode
        if self.layer == "serf":
            tags = {"role": "node", "dc": "sim"}
            peer = Serf(
                name=name, addr=addr[0], port=addr[1], tags=tags, config=self.config, rng=rng
            )
        else:
            delegate = BareDelegate()
            ml = Memberlist(
                name=name, addr=addr[0], port=addr[1], config=self.config, delegate=delegate,
                rng=rng,
            )
            peer = BareNode(ml, delegate)
        node = SimNode(i, name, addr, peer)
        self.nodes.append(node)
        self.by_addr[addr] = node
        return node

    def join(self, node: SimNode, seed: SimNode) -> None:
        """memberlist Join: a push/pull with Join=true, then Serf's join intent."""

        def done(ok: bool) -> None:
            if ok:
                node.serf.joined(self.now)
                self._service(node)

        self._push_pull(node, seed.addr, True, done)

    # -- faults -------------------------------------------------------------------------------

    def crash(self, node: SimNode) -> None:
        node.crashed = True

    def partition(self, groups: Callable[[SimNode], int]) -> None:
        for n in self.nodes:
            n.group = groups(n)
        self.partitioned = True

    def heal(self) -> None:
        for n in self.nodes:
            n.group = 0
        self.partitioned = False

    def reachable(self, a: SimNode, b: SimNode) -> bool:
        return not a.crashed and not b.crashed and a.group == b.group

    # -- running ------------------------------------------------------------------------------

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), fn))

    def run_until(
        self, end: float, stop: Callable[[], bool] | None = None, check: float = 0.05
    ) -> bool:
        """Advance simulated time to `end`; with `stop`, return True once it holds (checked
        every `check` simulated seconds)."""
        next_check = self.now + check
        while True:
            t_ev = self._events[0][0] if self._events else float("inf")
            t_dl = self._deadlines[0][0] if self._deadlines else float("inf")
            t = min(t_ev, t_dl)
            if t > end:
                self.now = end
                return bool(stop and stop())
            self.now = max(self.now, t)
            if t_ev <= t_dl:
                _, _, fn = heapq.heappop(self._events)
                fn()
            else:
                when, _, i = heapq.heappop(self._deadlines)
                node = self.nodes[i]
                if node.crashed or when != node.scheduled:
                    continue  # stale entry: an earlier deadline replaced it
                node.scheduled = None
                node.serf.tick(self.now)
                self._service(node)
            if stop is not None and self.now >= next_check:
                next_check = self.now + check
                if stop():
                    return True

    # -- plumbing -----------------------------------------------------------------------------

    def _service(self, node: SimNode) -> None:
        """Route a node's effects into the network and re-arm its timer."""
        serf = node.serf
        for eff in serf.take_effects():
            if isinstance(eff, SendPacket):
                self._send(node, eff.dest, eff.data)
            elif isinstance(eff, StartPushPull):
                self._push_pull(node, eff.dest, eff.join, None)
            elif isinstance(eff, StartTcpPing):
                self._tcp_ping(node, eff)
        for ev in serf.take_events():
            if isinstance(ev, MemberEvent) and ev.type == MemberEventType.FAILED:
                node.failed_events.append((self.now, ev.member.name))
        dl = serf.next_deadline()
        if dl is not None and not node.crashed and (node.scheduled is None or dl < node.scheduled):
            node.scheduled = dl
            heapq.heappush(self._deadlines, (dl, next(self._seq), node.index))

    def _delay(self) -> float:
        return self.min_delay + self.rng.random() * (self.max_delay - self.min_delay)

    def _send(self, src: SimNode, dest: Address, data: bytes) -> None:
        self.packets += 1
        self.bytes += len(data)
        dst = self.by_addr.get(dest)
        if (
            dst is None
            or not self.reachable(src, dst)
            or (self.loss and self.rng.random() < self.loss)
        ):
            self.packets_dropped += 1
            return

        def deliver() -> None:
            if dst.crashed or not self.reachable(src, dst):
                return
            dst.serf.receive_packet(data, src.addr, self.now)
            self._service(dst)

        self.at(self.now + self._delay(), deliver)

    def _push_pull(
        self, src: SimNode, dest: Address, join: bool, done: Callable[[bool], None] | None
    ) -> None:
        dst = self.by_addr.get(dest)

        def fail() -> None:
            if done:
                done(False)

        if dst is None or not self.reachable(src, dst):
            self.at(self.now + 0.05, fail)
            return

        def exchange() -> None:
            if not self.reachable(src, dst):
                fail()
                return
            local = src.serf.memberlist.join_state(join)
            reply = dst.serf.memberlist.join_state(join)
            with contextlib.suppress(ProtocolError):
                dst.serf.memberlist.merge_push_pull(local, self.now)
            self._service(dst)

            def merge_back() -> None:
                if src.crashed:
                    return
                try:
                    src.serf.memberlist.merge_push_pull(reply, self.now)
                except ProtocolError:
                    fail()
                    return
                self._service(src)
                if done:
                    done(True)

            self.at(self.now + self._delay(), merge_back)

        self.at(self.now + self._delay(), exchange)

    def _tcp_ping(self, src: SimNode, eff: StartTcpPing) -> None:
        dst = self.by_addr.get(eff.dest)
        ok = dst is not None and self.reachable(src, dst) and dst.name == eff.node

        def result() -> None:
            if not src.crashed:
                src.serf.memberlist.tcp_ping_result(eff.seq_no, ok, self.now)
                self._service(src)

        self.at(self.now + (2 * self._delay() if ok else max(0.0, eff.deadline - self.now)), result)

    # -- observations -------------------------------------------------------------------------

    def status_of(self, observer: SimNode, name: str) -> MemberStatus | None:
        peer = observer.serf
        if isinstance(peer, BareNode):
            return peer.status(name)
        ms = peer.members_by_name.get(name)
        return ms.member.status if ms else None

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes if not n.crashed]

    def all_see_all_alive(self, nodes: list[SimNode] | None = None) -> bool:
        nodes = nodes or self.live()
        names = [n.name for n in nodes]
        for n in nodes:
            peer = n.serf
            if isinstance(peer, BareNode):
                if any(peer.status(name) != MemberStatus.ALIVE for name in names):
                    return False
                continue
            mb = peer.members_by_name
            for name in names:
                ms = mb.get(name)
                if ms is None or ms.member.status != MemberStatus.ALIVE:
                    return False
        return True

    def all_see(
        self, name: str, statuses: set[MemberStatus], nodes: list[SimNode] | None = None
    ) -> bool:
        for n in nodes or self.live():
            if n.name == name:
                continue
            if self.status_of(n, name) not in statuses:
                return False
        return True

    def describe(self) -> dict[str, Any]:
        return {"seed": self.seed, "now": round(self.now, 3), "packets": self.packets}

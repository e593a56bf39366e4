"""Sans-I/O SWIM membership with the Lifeguard extensions, speaking memberlist's protocol.

`Memberlist` never touches a socket or a clock. The runtime (or a simulator) feeds it datagrams
with `receive_packet`, push/pull states with `handle_push_pull`/`merge_push_pull`, and time with
`tick`; it answers with effects collected by `take_effects` (datagrams to send, TCP exchanges to
start). That keeps the protocol testable with thousands of nodes under a seeded, simulated
network, and makes every failure replayable.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from gossip import packet
from gossip.awareness import Awareness
from gossip.broadcast import BroadcastQueue
from gossip.config import GossipConfig, push_pull_scale, retransmit_limit, suspicion_timeout
from gossip.keyring import ENCRYPTION_OVERHEAD, Keyring
from gossip.messages import (
    MAX_UINT32,
    META_MAX_SIZE,
    Ack,
    Alive,
    Dead,
    DecodeError,
    IndirectPing,
    Nack,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    User,
    decode,
)
from gossip.suspicion import Suspicion

log = structlog.get_logger("gossip.swim")

Address = tuple[str, int]

# memberlist protocol 1..5, speaking 2; Serf (delegate) protocol 2..5, speaking 5.
DEFAULT_VSN = bytes((1, 5, 2, 2, 5, 5))
USER_MSG_OVERHEAD = 1


@dataclass(slots=True)
class NodeInfo:
    name: str
    addr: bytes
    port: int
    meta: bytes
    vsn: bytes
    incarnation: int = 0
    state: NodeState = NodeState.DEAD
    state_change: float = 0.0

    @property
    def address(self) -> Address:
        return (str(ipaddress.ip_address(self.addr)) if self.addr else "", self.port)

    @property
    def pmax(self) -> int:
        return self.vsn[1] if len(self.vsn) == 6 else 0

    def dead_or_left(self) -> bool:
        return self.state in (NodeState.DEAD, NodeState.LEFT)


@dataclass(frozen=True, slots=True)
class SendPacket:
    dest: Address
    data: bytes


@dataclass(frozen=True, slots=True)
class StartPushPull:
    """Open a TCP stream to dest, send `handle`'s local state, merge the reply."""

    dest: Address
    join: bool


@dataclass(frozen=True, slots=True)
class StartTcpPing:
    """TCP fallback ping; the runtime reports the outcome with `tcp_ping_result`."""

    dest: Address
    node: str
    seq_no: int
    deadline: float


Effect = SendPacket | StartPushPull | StartTcpPing


class Delegate(Protocol):
    """The layer above memberlist (Serf)."""

    def node_meta(self, limit: int) -> bytes: ...
    def notify_msg(self, msg: bytes, now: float) -> None: ...
    def get_broadcasts(self, overhead: int, limit: int) -> list[bytes]: ...
    def has_broadcasts(self) -> bool: ...
    def local_state(self, join: bool) -> bytes: ...
    def merge_remote_state(self, buf: bytes, join: bool, now: float) -> None: ...
    def notify_join(self, node: NodeInfo, now: float) -> None: ...
    def notify_leave(self, node: NodeInfo, now: float) -> None: ...
    def notify_update(self, node: NodeInfo, now: float) -> None: ...


@dataclass(slots=True)
class _Probe:
    """An outstanding probe (ours) or relayed probe (on behalf of an indirect-ping requester)."""

    target: str
    on_ack: Callable[[float], None]
    on_nack: Callable[[], None] = lambda: None
    done: bool = False


@dataclass(slots=True)
class Counters:
    packets_received: int = 0
    packets_sent: int = 0
    packets_dropped: int = 0
    messages_dropped: int = 0
    pings_misaddressed: int = 0
    refutes: int = 0
    probes_failed: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Memberlist:
    def __init__(
        self,
        *,
        name: str,
        addr: str,
        port: int,
        config: GossipConfig,
        delegate: Delegate | None = None,
        keyring: Keyring | None = None,
        rng: random.Random | None = None,
        vsn: bytes = DEFAULT_VSN,
    ) -> None:
        self.name = name
        self.addr = ipaddress.ip_address(addr).packed
        self.port = port
        self.config = config
        self.delegate = delegate
        self.keyring = keyring
        self.rng = rng or random.Random()
        self.vsn = vsn
        self.nodes: dict[str, NodeInfo] = {}
        self.counters = Counters()
        self.awareness = Awareness(config.awareness_max_multiplier)
        self.broadcasts = BroadcastQueue()
        self.leaving = False
        self.incarnation = 0
        # every member in probe order; also what random picks index into (memberlist's one
        # `nodes` slice). Members leave it only when it is rebuilt, so no position map is needed.
        self._probe_order: list[str] = []
        self._probe_index = 0
        self._seq = itertools.count(1)
        self._acks: dict[int, _Probe] = {}
        self._suspicions: dict[str, Suspicion] = {}
        self._timers: list[tuple[float, int, Callable[[float], None]]] = []
        self._timer_ids = itertools.count()
        self._effects: list[Effect] = []
        self._started = False

    # -- driving interface ------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Announce ourselves and start the protocol timers."""
        self.incarnation += 1
        meta = self.delegate.node_meta(META_MAX_SIZE) if self.delegate else b""
        self._alive(
            Alive(self.incarnation, self.name, self.addr, self.port, meta, self.vsn),
            now,
            bootstrap=True,
        )
        self._started = True
        stagger = self.rng.random()
        self._at(now + stagger * self.config.probe_interval, self._probe_tick)
        self._at(now + stagger * self.config.gossip_interval, self._gossip_tick)
        if self.config.push_pull_interval > 0:
            # a fresh node knows no one and staggers over the plain interval, as memberlist does;
            # one that starts with a known view (a warm simulation) over the interval for it
            spread = push_pull_scale(self.config.push_pull_interval, len(self.nodes))
            self._at(now + self.rng.random() * spread, self._push_pull_tick)

    def take_effects(self) -> list[Effect]:
        out, self._effects = self._effects, []
        return out

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def tick(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, fn = heapq.heappop(self._timers)
            fn(now)

    def receive_packet(self, data: bytes, src: Address, now: float) -> None:
        self.counters.packets_received += 1
        try:
            decoded = packet.decode_packet(data, self.keyring)
        except packet.PacketError as e:
            self.counters.packets_dropped += 1
            log.debug("gossip.packet_dropped", src=f"{src[0]}:{src[1]}", reason=str(e))
            return
        self.counters.messages_dropped += decoded.truncated
        for raw in decoded.messages:
            try:
                msg = decode(raw)
            except DecodeError as e:
                self.counters.messages_dropped += 1
                log.debug("gossip.message_dropped", src=f"{src[0]}:{src[1]}", reason=str(e))
                continue
            self._handle(msg, raw, src, now)

    def join_state(self, join: bool) -> PushPull:
        """Our side of a push/pull exchange."""
        nodes = [
            PushNodeState(n.name, n.addr, n.port, n.meta, n.incarnation, n.state, n.vsn)
            for n in self.nodes.values()
        ]
        user = self.delegate.local_state(join) if self.delegate else b""
        return PushPull(join=join, nodes=nodes, user_state=user)

    def handle_push_pull(self, remote: PushPull, now: float) -> PushPull:
        """A peer opened a push/pull: reply with our state, then merge theirs."""
        reply = self.join_state(remote.join)
        self.merge_push_pull(remote, now)
        return reply

    def merge_push_pull(self, remote: PushPull, now: float) -> None:
        self._verify_protocol(remote.nodes)
        for r in remote.nodes:
            if r.state == NodeState.ALIVE:
                self._alive(Alive(r.incarnation, r.name, r.addr, r.port, r.meta, r.vsn), now)
            elif r.state == NodeState.LEFT:
                self._dead(Dead(r.incarnation, r.name, r.name), now)
            else:
                # a remote "dead" only makes us suspect: we give the node a chance to refute
                self._suspect(Suspect(r.incarnation, r.name, self.name), now)
        if remote.user_state and self.delegate:
            self.delegate.merge_remote_state(remote.user_state, remote.join, now)

    def tcp_ping_result(self, seq_no: int, ok: bool, now: float) -> None:
        if ok:
            self._ack_received(seq_no, now)

    def leave(self, now: float) -> None:
        """Broadcast our own death with From=self, which peers record as a graceful leave."""
        self.leaving = True
        me = self.nodes.get(self.name)
        if me is None:
            return
        self._dead(Dead(me.incarnation, self.name, self.name), now)

    def leave_broadcast_pending(self) -> bool:
        return self.broadcasts.has(self.name) and self.num_alive_peers() > 0

    def update_meta(self, now: float) -> None:
        """Re-announce ourselves with fresh delegate meta (tags changed)."""
        me = self.nodes[self.name]
        meta = self.delegate.node_meta(META_MAX_SIZE) if self.delegate else b""
        self.incarnation = (self.incarnation + 1) & MAX_UINT32
        me.meta = meta
        me.incarnation = self.incarnation
        self._queue(
            self.name,
            Alive(self.incarnation, self.name, self.addr, self.port, meta, self.vsn).encode(),
        )
        if self.delegate:
            self.delegate.notify_update(me, now)

    def announce(self) -> None:
        """Queue our alive as the newest broadcast.

        After a join we have just queued an alive for every member the seed told us about; our
        own alive (queued at start) would wait behind them all. Peers that know us ignore the
        repeat (same incarnation), so this only speeds up how fast the cluster learns of us.
        """
        me = self.nodes.get(self.name)
        if me is not None and not self.leaving:
            a = Alive(me.incarnation, self.name, self.addr, self.port, me.meta, self.vsn)
            self._queue(self.name, a.encode())

    # -- queries -----------------------------------------------------------------------------

    def estimated_nodes(self) -> int:
        return len(self.nodes)

    def num_alive_peers(self) -> int:
        return sum(
            1
            for n in self.nodes.values()
            if n.name != self.name and n.state != NodeState.DEAD and n.state != NodeState.LEFT
        )

    def send_user(self, dest: Address, payload: bytes) -> None:
        """Send a delegate message straight to an address (serf's SendToAddress)."""
        self._send(dest, User(payload).encode(), crc=False, piggyback=False)

    def schedule(self, when: float, fn: Callable[[float], None]) -> None:
        """Run fn(now) at `when`; used by the layer above to share one timer queue."""
        self._at(when, fn)

    def add_effect(self, effect: Effect) -> None:
        self._effects.append(effect)

    # -- timers ------------------------------------------------------------------------------

    def _at(self, when: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(self._timers, (when, next(self._timer_ids), fn))

    def _probe_tick(self, now: float) -> None:
        interval = self.awareness.scale(self.config.probe_interval)
        self._at(now + interval, self._probe_tick)
        target = self._next_probe_target(now)
        if target is not None:
            self._probe(target, now, interval)

    def _gossip_tick(self, now: float) -> None:
        self._at(now + self.config.gossip_interval, self._gossip_tick)
        self._gossip(now)

    def _push_pull_tick(self, now: float) -> None:
        n = len(self.nodes)
        self._at(now + push_pull_scale(self.config.push_pull_interval, n), self._push_pull_tick)
        peers = self._k_random(1, lambda x: x.state != NodeState.ALIVE)
        if peers:
            self._effects.append(StartPushPull(peers[0].address, join=False))

    # -- probing -----------------------------------------------------------------------------

    def _next_probe_target(self, now: float) -> NodeInfo | None:
        for _ in range(len(self._probe_order) + 1):
            if self._probe_index >= len(self._probe_order):
                self._reset_probe_order(now)
                if not self._probe_order:
                    return None
            name = self._probe_order[self._probe_index]
            self._probe_index += 1
            node = self.nodes.get(name)
            if node is None or name == self.name or node.dead_or_left():
                continue
            return node
        return None

    def _reset_probe_order(self, now: float) -> None:
        """Reap long-dead members and reshuffle, as memberlist does when the probe list wraps."""
        for name in [
            n.name
            for n in self.nodes.values()
            if n.dead_or_left()
            and now - n.state_change > self.config.gossip_to_the_dead_time
            and n.name != self.name
        ]:
            self._forget(name)
        self._probe_order = list(self.nodes)
        self.rng.shuffle(self._probe_order)
        self._probe_index = 0

    def _probe(self, node: NodeInfo, now: float, interval: float) -> None:
        seq = self._next_seq()
        ping = Ping(seq, node.name, self.addr, self.port, self.name)
        crc = node.pmax >= 5
        if node.state == NodeState.SUSPECT:
            # let a suspected node see the accusation at once so it can refute
            sus = Suspect(node.incarnation, node.name, self.name)
            self._send_compound(node.address, [ping.encode(), sus.encode()], crc=crc)
        else:
            self._send(node.address, ping.encode(), crc=False)
        state = {"nacks": 0, "expected": 0}
        probe = _Probe(node.name, on_ack=lambda t: None)

        def acked(t: float) -> None:
            probe.done = True
            self.awareness.apply(-1)

        def nacked() -> None:
            state["nacks"] += 1

        probe.on_ack = acked
        probe.on_nack = nacked
        self._acks[seq] = probe
        deadline = now + interval

        def indirect(t: float) -> None:
            if probe.done:
                return
            peers = self._k_random(
                self.config.indirect_checks,
                lambda x: x.name == node.name or x.state != NodeState.ALIVE,
            )
            for p in peers:
                want_nack = p.pmax >= 4
                if want_nack:
                    state["expected"] += 1
                req = IndirectPing(
                    seq, node.addr, node.port, node.name, want_nack, self.addr, self.port, self.name
                )
                self._send(p.address, req.encode(), crc=False)
            if self.config.tcp_pings and node.pmax >= 3:
                self._effects.append(StartTcpPing(node.address, node.name, seq, deadline))

        def expire(t: float) -> None:
            self._acks.pop(seq, None)
            if probe.done:
                return
            self.counters.probes_failed += 1
            if state["expected"] > 0:
                self.awareness.apply(max(0, state["expected"] - state["nacks"]))
            else:
                self.awareness.apply(1)
            current = self.nodes.get(node.name)
            if current is not None:
                log.info("gossip.probe_failed", node=node.name)
                self._suspect(Suspect(current.incarnation, node.name, self.name), t)

        self._at(now + self.config.probe_timeout, indirect)
        self._at(deadline, expire)

    def _ack_received(self, seq: int, now: float) -> None:
        probe = self._acks.get(seq)
        if probe is None or probe.done:
            return
        del self._acks[seq]
        probe.on_ack(now)

    def _handle_indirect(self, req: IndirectPing, src: Address, now: float) -> None:
        seq = self._next_seq()
        target_ip = str(ipaddress.ip_address(req.target)) if req.target else src[0]
        target = (target_ip, req.port or self.port)
        reply_to = (
            (str(ipaddress.ip_address(req.source_addr)), req.source_port)
            if req.source_addr and req.source_port
            else src
        )
        self._send(target, Ping(seq, req.node, self.addr, self.port, self.name).encode(), crc=False)
        relay = _Probe(req.node, on_ack=lambda t: None)

        def relay_ack(t: float) -> None:
            relay.done = True
            self._send(reply_to, Ack(req.seq_no).encode(), crc=False)

        relay.on_ack = relay_ack
        self._acks[seq] = relay

        def expire(t: float) -> None:
            self._acks.pop(seq, None)
            if not relay.done and req.nack:
                self._send(reply_to, Nack(req.seq_no).encode(), crc=False)

        self._at(now + self.config.probe_timeout, expire)

    # -- gossip ------------------------------------------------------------------------------

    def _gossip(self, now: float) -> None:
        if not len(self.broadcasts) and not (self.delegate and self.delegate.has_broadcasts()):
            return  # the common idle case: nothing to say, so don't even pick peers
        dead_time = self.config.gossip_to_the_dead_time
        peers = self._k_random(
            self.config.gossip_nodes,
            lambda x: (
                x.state == NodeState.LEFT
                or (x.state == NodeState.DEAD and now - x.state_change > dead_time)
            ),
        )
        budget = self.config.udp_buffer_size - packet.COMPOUND_OVERHEAD
        if self.keyring is not None:
            budget -= ENCRYPTION_OVERHEAD
        for p in peers:
            msgs = self._get_broadcasts(packet.COMPOUND_PART_OVERHEAD, budget)
            if not msgs:
                return
            if len(msgs) == 1:
                self._send(p.address, msgs[0], crc=p.pmax >= 5, piggyback=False)
            else:
                self._send_compound(p.address, msgs, crc=p.pmax >= 5)

    def _get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        limit_tx = retransmit_limit(self.config.retransmit_mult, len(self.nodes))
        # news about ourselves (an alive refuting a suspicion, our announce after a join) goes
        # first: it is what the cluster most needs from us, and it is never queued for long
        msgs = self.broadcasts.get(overhead, limit, limit_tx, first=self.name)
        if self.delegate is not None:
            used = sum(len(m) + overhead for m in msgs)
            avail = limit - used
            if avail > overhead + USER_MSG_OVERHEAD:
                for m in self.delegate.get_broadcasts(overhead + USER_MSG_OVERHEAD, avail):
                    msgs.append(b"\x08" + m)
        return msgs[: packet.MAX_COMPOUND_PARTS]

    def _queue(self, name: str, msg: bytes) -> None:
        self.broadcasts.queue(msg, name)

    # -- sending -----------------------------------------------------------------------------

    def _send(self, dest: Address, msg: bytes, *, crc: bool, piggyback: bool = True) -> None:
        if piggyback:
            avail = self.config.udp_buffer_size - len(msg) - packet.COMPOUND_OVERHEAD
            if self.keyring is not None:
                avail -= ENCRYPTION_OVERHEAD
            extra = self._get_broadcasts(packet.COMPOUND_PART_OVERHEAD, avail)[
                : packet.MAX_COMPOUND_PARTS - 1
            ]
            if extra:
                self._send_compound(dest, [msg, *extra], crc=crc)
                return
        self._emit(dest, msg, crc)

    def _send_compound(self, dest: Address, msgs: list[bytes], *, crc: bool) -> None:
        self._emit(dest, packet.make_compound(msgs), crc)

    def _emit(self, dest: Address, msg: bytes, crc: bool) -> None:
        data = packet.encode_udp(msg, crc=crc, compress=self.config.compress, keyring=self.keyring)
        self.counters.packets_sent += 1
        self._effects.append(SendPacket(dest, data))

    # -- message handling --------------------------------------------------------------------

    def _handle(self, msg: object, raw: bytes, src: Address, now: float) -> None:
        """Dispatch one message; `raw` is its encoding, re-gossiped as is when news is new."""
        if isinstance(msg, Ping):
            self._handle_ping(msg, src)
        elif isinstance(msg, Ack):
            self._ack_received(msg.seq_no, now)
        elif isinstance(msg, Nack):
            probe = self._acks.get(msg.seq_no)
            if probe is not None:
                probe.on_nack()
        elif isinstance(msg, IndirectPing):
            self._handle_indirect(msg, src, now)
        elif isinstance(msg, Alive):
            self._alive(msg, now, raw=raw)
        elif isinstance(msg, Suspect):
            self._suspect(msg, now, raw=raw)
        elif isinstance(msg, Dead):
            self._dead(msg, now, raw=raw)
        elif isinstance(msg, User) and self.delegate is not None and msg.payload:
            self.delegate.notify_msg(msg.payload, now)

    def _handle_ping(self, ping: Ping, src: Address) -> None:
        if ping.node and ping.node != self.name:
            self.counters.pings_misaddressed += 1
            return
        dest = (
            (str(ipaddress.ip_address(ping.source_addr)), ping.source_port)
            if ping.source_addr and ping.source_port
            else src
        )
        self._send(dest, Ack(ping.seq_no).encode(), crc=False)

    def _alive(
        self, a: Alive, now: float, *, bootstrap: bool = False, raw: bytes | None = None
    ) -> None:
        if self.leaving and a.node == self.name:
            return
        if len(a.vsn) == 6 and (a.vsn[0] == 0 or a.vsn[1] == 0 or a.vsn[0] > a.vsn[1]):
            self.counters.messages_dropped += 1
            return
        if not a.node or len(a.addr) not in (4, 16) or not a.port:
            self.counters.messages_dropped += 1
            return
        node = self.nodes.get(a.node)
        updates_addr = False
        if node is None:
            node = NodeInfo(a.node, a.addr, a.port, a.meta, a.vsn, 0, NodeState.DEAD, now)
            self.nodes[a.node] = node
            # insert at a random place in the probe order so new nodes are probed soon but fairly
            pos = self.rng.randint(0, len(self._probe_order))
            self._probe_order.insert(pos, a.node)
            if pos < self._probe_index:
                self._probe_index += 1
        elif node.addr != a.addr or node.port != a.port:
            if node.state == NodeState.LEFT:
                node.addr, node.port = a.addr, a.port
                updates_addr = True
            else:
                log.warning(
                    "gossip.address_conflict",
                    node=a.node,
                    known=f"{node.address[0]}:{node.port}",
                    claimed=f"{ipaddress.ip_address(a.addr)}:{a.port}",
                )
                self.counters.extra["conflicts"] = self.counters.extra.get("conflicts", 0) + 1
                return
        is_local = a.node == self.name
        if a.incarnation <= node.incarnation and not is_local and not updates_addr:
            return
        if a.incarnation < node.incarnation and is_local:
            return
        self._suspicions.pop(a.node, None)
        old_state, old_meta = node.state, node.meta
        if is_local and not bootstrap:
            if a.incarnation == node.incarnation and a.meta == node.meta and a.vsn == node.vsn:
                return
            self._refute(node, a.incarnation)
            return
        self._queue(a.node, raw or a.encode())
        node.incarnation = a.incarnation
        node.meta = a.meta
        node.vsn = a.vsn or node.vsn
        if node.state != NodeState.ALIVE:
            node.state = NodeState.ALIVE
            node.state_change = now
        if self.delegate is not None:
            if old_state in (NodeState.DEAD, NodeState.LEFT):
                self.delegate.notify_join(node, now)
            elif old_meta != node.meta:
                self.delegate.notify_update(node, now)

    def _suspect(self, s: Suspect, now: float, *, raw: bytes | None = None) -> None:
        node = self.nodes.get(s.node)
        if node is None or s.incarnation < node.incarnation:
            return
        timer = self._suspicions.get(s.node)
        if timer is not None:
            if timer.confirm(s.from_):
                self._queue(s.node, raw or s.encode())
                self._at(timer.deadline, self._suspicion_fired(s.node, timer))
            return
        if node.state != NodeState.ALIVE:
            return
        if node.name == self.name:
            self._refute(node, s.incarnation)
            log.warning("gossip.refuting_suspect", accuser=s.from_)
            return
        self._queue(s.node, raw or s.encode())
        node.incarnation = s.incarnation
        node.state = NodeState.SUSPECT
        node.state_change = now
        log.info("gossip.member_suspect", node=s.node, accuser=s.from_)
        k = self.config.suspicion_mult - 2
        n = len(self.nodes)
        if n - 2 < k:
            k = 0
        lo = suspicion_timeout(self.config.suspicion_mult, n, self.config.probe_interval)
        hi = self.config.suspicion_max_timeout_mult * lo
        timer = Suspicion(s.from_, k, lo, hi, now)
        self._suspicions[s.node] = timer
        self._at(timer.deadline, self._suspicion_fired(s.node, timer))

    def _suspicion_fired(self, name: str, timer: Suspicion) -> Callable[[float], None]:
        def fire(now: float) -> None:
            if self._suspicions.get(name) is not timer or now < timer.deadline:
                return
            del self._suspicions[name]
            node = self.nodes.get(name)
            if node is not None and node.state == NodeState.SUSPECT:
                log.info("gossip.member_failed", node=name)
                self._dead(Dead(node.incarnation, name, self.name), now)

        return fire

    def _dead(self, d: Dead, now: float, *, raw: bytes | None = None) -> None:
        node = self.nodes.get(d.node)
        if node is None or d.incarnation < node.incarnation:
            return
        self._suspicions.pop(d.node, None)
        if node.dead_or_left():
            return
        if node.name == self.name and not self.leaving:
            self._refute(node, d.incarnation)
            log.warning("gossip.refuting_dead", accuser=d.from_)
            return
        self._queue(d.node, raw or d.encode())
        node.incarnation = d.incarnation
        node.state = NodeState.LEFT if d.node == d.from_ else NodeState.DEAD
        node.state_change = now
        if self.delegate is not None:
            self.delegate.notify_leave(node, now)

    def _refute(self, me: NodeInfo, accused: int) -> None:
        self.counters.refutes += 1
        self.incarnation = max(self.incarnation + 1, accused + 1) & MAX_UINT32
        me.incarnation = self.incarnation
        self.awareness.apply(1)
        a = Alive(self.incarnation, self.name, self.addr, self.port, me.meta, self.vsn)
        self._queue(self.name, a.encode())

    def _verify_protocol(self, remote: list[PushNodeState]) -> None:
        """Refuse a push/pull from a cluster speaking a protocol range we can't talk to."""
        for r in remote:
            if r.state != NodeState.ALIVE:
                continue
            if len(r.vsn) != 6:
                raise ProtocolError(f"node {r.name} sent no protocol versions")
            pmin, pmax, pcur = r.vsn[0], r.vsn[1], r.vsn[2]
            if not (self.vsn[0] <= pcur <= self.vsn[1]) or not (pmin <= self.vsn[2] <= pmax):
                raise ProtocolError(
                    f"node {r.name} speaks memberlist protocol {pcur} ({pmin}..{pmax}), "
                    f"incompatible with ours {self.vsn[2]} ({self.vsn[0]}..{self.vsn[1]})"
                )

    # -- helpers -----------------------------------------------------------------------------

    def _next_seq(self) -> int:
        seq = next(self._seq) & 0xFFFFFFFF
        if seq == 0:
            self._seq = itertools.count(2)
            seq = 1
        return seq

    def _forget(self, name: str) -> None:
        del self.nodes[name]
        self._suspicions.pop(name, None)

    def _k_random(self, k: int, exclude: Callable[[NodeInfo], bool]) -> list[NodeInfo]:
        """Up to k distinct random members, never ourselves (memberlist's kRandomNodes)."""
        names = self._probe_order
        n = len(names)
        out: list[NodeInfo] = []
        seen: set[str] = set()
        for _ in range(3 * n):
            if len(out) >= k:
                break
            name = names[self.rng.randrange(n)]
            if name in seen:
                continue
            seen.add(name)
            node = self.nodes[name]
            if name == self.name or exclude(node):
                continue
            out.append(node)
        return out


class ProtocolError(ValueError):
    """A peer speaks a memberlist protocol range we cannot talk to."""

"""Deterministic unit tests of the sans-I/O SWIM/Lifeguard core against memberlist 0.2.2's rules.

Each test drives a `Memberlist` (or `Serf`) directly: hand-made packets in, explicit `now`
values, effects out. Timers are fired in order by `run`, which can answer pings on behalf of
the simulated peers; nothing here touches a socket or the wall clock.
Reference: /work/shared/reference/memberlist-serf-wire.md §9-§11.
"""

from __future__ import annotations

import ipaddress
import itertools
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from gossip import packet
from gossip.broadcast import BroadcastQueue
from gossip.config import GossipConfig, retransmit_limit, suspicion_timeout
from gossip.member import MemberEvent, MemberEventType, MemberStatus
from gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Message,
    Nack,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    decode,
    decode_push_pull,
)
from gossip.serf import Serf
from gossip.suspicion import Suspicion, remaining_timeout
from gossip.swim import Address, Effect, Memberlist, SendPacket, StartTcpPing
from tests.sim.network import SimNetwork

VSN = bytes((1, 5, 2, 2, 5, 5))
VSN3 = bytes((1, 3, 2, 2, 5, 5))  # a peer speaking memberlist protocol up to 3: no nacks
META = b"\xff\x80"
PORT = 7946
LAN = GossipConfig.lan()
# No TCP fallback pings and a suspicion so long it never completes: probes alone are observed.
PROBE_ONLY = LAN.with_(tcp_pings=False, suspicion_mult=1000)
OUTSIDER: Address = ("10.0.9.9", PORT)
T = TypeVar("T")


def ip(i: int) -> str:
    return f"10.0.0.{i}"


def packed(i: int) -> bytes:
    return ipaddress.ip_address(ip(i)).packed


def addr(i: int) -> Address:
    return (ip(i), PORT)


def alive(name: str, i: int, inc: int = 1, *, meta: bytes = META, vsn: bytes = VSN) -> Alive:
    return Alive(inc, name, packed(i), PORT, meta, vsn)


def udp(*msgs: bytes, crc: bool = False) -> bytes:
    body = msgs[0] if len(msgs) == 1 else packet.make_compound(list(msgs))
    return packet.encode_udp(body, crc=crc, compress=False, keyring=None)


def feed(m: Memberlist | Serf, now: float, *msgs: bytes, src: Address = OUTSIDER) -> None:
    m.receive_packet(udp(*msgs), src, now)


def make(
    name: str = "a", i: int = 1, *, config: GossipConfig = LAN, seed: int = 7, now: float = 0.0
) -> Memberlist:
    m = Memberlist(name=name, addr=ip(i), port=PORT, config=config, rng=random.Random(seed))
    m.start(now)
    m.take_effects()
    return m


def add_peers(m: Memberlist, peers: Iterable[tuple[str, int]], now: float = 0.0) -> None:
    for name, i in peers:
        feed(m, now, alive(name, i).encode())
    m.take_effects()


def state(m: Memberlist, name: str) -> NodeState:
    return m.nodes[name].state


def drain(q: BroadcastQueue) -> list[bytes]:
    """Pop everything queued (one transmit each), so later queueing can be observed."""
    return q.get(0, 1 << 30, 1)


@dataclass
class Sent:
    t: float
    dest: Address
    data: bytes
    raws: list[bytes]
    msgs: list[Message]

    def of(self, cls: type[T]) -> list[T]:
        return [x for x in self.msgs if isinstance(x, cls)]


@dataclass
class Trace:
    sent: list[Sent] = field(default_factory=list)
    other: list[tuple[float, Effect]] = field(default_factory=list)

    def msgs(self, cls: type[T]) -> list[tuple[Sent, T]]:
        return [(s, x) for s in self.sent for x in s.of(cls)]


def collect(m: Memberlist, t: float, trace: Trace) -> list[Sent]:
    new: list[Sent] = []
    for e in m.take_effects():
        if isinstance(e, SendPacket):
            raws = packet.decode_udp(e.data, None)
            new.append(Sent(t, e.dest, e.data, raws, [decode(r) for r in raws]))
        else:
            trace.other.append((t, e))
    trace.sent.extend(new)
    return new


def run(
    m: Memberlist, end: float, *, silent: Iterable[str] = (), trace: Trace | None = None
) -> Trace:
    """Fire m's timers in order up to `end`; every pinged node not in `silent` acks at once."""
    trace = trace if trace is not None else Trace()
    quiet = set(silent)
    while (t := m.next_deadline()) is not None and t <= end:
        m.tick(t)
        pending = collect(m, t, trace)
        while pending:
            s = pending.pop(0)
            for ping in s.of(Ping):
                if ping.node not in quiet:
                    m.receive_packet(udp(Ack(ping.seq_no).encode()), s.dest, t)
                    pending.extend(collect(m, t, trace))
    return trace


def next_ping_to(m: Memberlist, target: str, end: float, trace: Trace) -> tuple[float, Ping]:
    """Run (acking everyone else) until `target` is pinged; stop right after that tick."""
    while True:
        t = m.next_deadline()
        assert t is not None and t <= end, f"{target} was never probed before {end}"
        before = len(trace.sent)
        run(m, t, silent=[target], trace=trace)
        for s in trace.sent[before:]:
            for p in s.of(Ping):
                if p.node == target:
                    return s.t, p


# -- ping / ack --------------------------------------------------------------------------------


def test_ping_is_acked_to_source_addr_and_port() -> None:
    m = make("a")
    ping = Ping(77, "a", packed(5), 8000, "e")
    m.receive_packet(udp(ping.encode()), ("10.0.0.99", 1234), 1.0)
    trace = Trace()
    (s,) = collect(m, 1.0, trace)
    assert s.dest == ("10.0.0.5", 8000)
    assert [x for x in s.msgs if isinstance(x, Ack)] == [Ack(77)]
    # no Source*: the ack goes back to the UDP source; an empty Node is accepted (memberlist)
    m.receive_packet(udp(Ping(78, "").encode()), ("10.0.0.99", 1234), 1.0)
    (s,) = collect(m, 1.0, trace)
    assert s.dest == ("10.0.0.99", 1234) and Ack(78) in s.msgs
    assert m.counters.pings_misaddressed == 0


def test_real_serf_ping_is_acked_to_its_source() -> None:
    """The §13 capture a->b (seq 1, SourceAddr 127.0.0.1:7946), received by a node named b."""
    wire = bytes.fromhex(
        "0085a44e6f6465a162a55365714e6f01aa536f7572636541646472a47f000001aa536f757263654e6f6465"
        "a161aa536f75726365506f7274cd1f0a"
    )
    m = Memberlist(name="b", addr="127.0.0.1", port=7947, config=LAN, rng=random.Random(1))
    m.receive_packet(wire, ("127.0.0.1", 40000), 1.0)
    (s,) = collect(m, 1.0, Trace())
    assert s.dest == ("127.0.0.1", 7946)
    assert s.msgs == [Ack(1)]
    assert s.data == Ack(1).encode()  # plain: no CRC and no compound on an ack with nothing queued


def test_ping_for_another_node_is_ignored_and_counted() -> None:
    m = make("a")
    m.receive_packet(udp(Ping(5, "b", packed(2), PORT, "b").encode()), addr(2), 1.0)
    assert m.take_effects() == []
    assert m.counters.pings_misaddressed == 1


# -- suspicion timeouts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "lo"), [(1, 4.0), (2, 4.0), (3, 4.0), (4, 4.0), (9, 4.0), (10, 4.0), (100, 8.0)]
)
def test_suspicion_timeout_formula(n: int, lo: float) -> None:
    assert suspicion_timeout(4, n, 1.0) == lo
    assert suspicion_timeout(6, 1000, 5.0) == 90.0  # WAN, log10(1000) = 3
    assert suspicion_timeout(4, 50, 1.0) == 6.792  # log10(50) = 1.69897 -> 1698 ms per mult


def test_remaining_timeout_formula() -> None:
    assert remaining_timeout(0, 2, 4.0, 24.0) == 24.0
    # 24 - ln(2)/ln(3) * 20 = 11.3814..., floored to whole milliseconds
    assert remaining_timeout(1, 2, 4.0, 24.0) == 11.381
    assert remaining_timeout(2, 2, 4.0, 24.0) == 4.0
    s = Suspicion("x", 2, 4.0, 24.0, now=10.0)
    assert s.deadline == 34.0
    assert not s.confirm("x")  # the accuser itself never confirms
    assert s.confirm("y") and s.deadline == pytest.approx(21.381)
    assert not s.confirm("y")
    assert s.confirm("z") and s.deadline == 14.0
    assert not s.confirm("w")  # k confirmations reached: no more counted
    assert Suspicion("x", 0, 4.0, 24.0, now=1.0).deadline == 5.0


def cluster_of(n: int, config: GossipConfig = LAN) -> Memberlist:
    m = make("a", 1, config=config)
    add_peers(m, [(f"p{i}", i) for i in range(2, n + 1)])
    assert m.estimated_nodes() == n
    return m


def assert_dead_at(m: Memberlist, name: str, when: float) -> None:
    run(m, when - 1e-6)
    assert state(m, name) == NodeState.SUSPECT, f"{name} declared dead before {when}"
    run(m, when + 1e-6)
    assert state(m, name) == NodeState.DEAD, f"{name} still suspect after {when}"


@pytest.mark.parametrize("n", [2, 3])
def test_small_cluster_suspicion_lasts_the_minimum(n: int) -> None:
    """n <= 3: k = 0 (no confirmations possible), so the timer is min = 4 s on LAN."""
    m = cluster_of(n)
    run(m, 10.0)
    feed(m, 10.0, Suspect(1, "p2", "zz").encode())
    assert state(m, "p2") == NodeState.SUSPECT
    assert_dead_at(m, "p2", 14.0)
    queued = [decode(b) for b in drain(m.broadcasts)]
    assert Dead(1, "p2", "a") in queued  # the failure is gossiped with From = us


def test_suspicion_starts_at_max_with_expected_confirmations() -> None:
    """n = 4..9: min 4 s, max 24 s, k = 2: with no confirmation the timer runs the full 24 s."""
    m = cluster_of(5)
    run(m, 10.0)
    feed(m, 10.0, Suspect(1, "p2", "p3").encode())
    assert_dead_at(m, "p2", 34.0)


def test_confirmations_shrink_the_timer_and_count_once() -> None:
    m = cluster_of(6)
    run(m, 10.0)
    feed(m, 10.0, Suspect(1, "p2", "p3").encode())
    assert [decode(b) for b in drain(m.broadcasts) if b[0] == 3] == [Suspect(1, "p2", "p3")]
    feed(m, 10.5, Suspect(1, "p2", "p3").encode())  # the accuser again: not a confirmation
    assert not m.broadcasts.has("p2")
    feed(m, 11.0, Suspect(1, "p2", "p4").encode())  # new, independent: re-gossiped
    assert [decode(b) for b in drain(m.broadcasts) if b[0] == 3] == [Suspect(1, "p2", "p4")]
    feed(m, 11.5, Suspect(1, "p2", "p4").encode())  # same confirmer twice: counted once
    assert not m.broadcasts.has("p2")
    # one confirmation of k = 2: 24 - ln2/ln3 * 20 = 11.381 s after the suspicion began
    assert_dead_at(m, "p2", 10.0 + 11.381)


def test_k_confirmations_bring_the_timer_down_to_min() -> None:
    m = cluster_of(6)
    run(m, 10.0)
    feed(m, 10.0, Suspect(1, "p2", "p3").encode())
    feed(m, 11.0, Suspect(1, "p2", "p4").encode())
    feed(m, 12.0, Suspect(1, "p2", "p5").encode())
    drain(m.broadcasts)
    feed(m, 12.5, Suspect(1, "p2", "p6").encode())  # beyond k: neither counted nor gossiped
    assert not m.broadcasts.has("p2")
    assert_dead_at(m, "p2", 14.0)


def test_suspect_for_unknown_stale_or_dead_node_is_ignored() -> None:
    m = cluster_of(3)
    feed(m, 1.0, alive("p2", 2, 5).encode())
    drain(m.broadcasts)
    feed(m, 2.0, Suspect(1, "nobody", "p3").encode(), Suspect(4, "p2", "p3").encode())
    assert "nobody" not in m.nodes and state(m, "p2") == NodeState.ALIVE
    feed(m, 2.0, Dead(5, "p3", "p2").encode())
    drain(m.broadcasts)
    feed(m, 3.0, Suspect(5, "p3", "p2").encode())
    assert state(m, "p3") == NodeState.DEAD and not m.broadcasts.has("p3")


# -- refutation --------------------------------------------------------------------------------


def queued_about(m: Memberlist, name: str) -> list[Message]:
    return [msg for msg in map(decode, drain(m.broadcasts)) if getattr(msg, "node", None) == name]


def test_suspect_about_us_is_refuted_with_a_higher_incarnation() -> None:
    m = make("a")
    add_peers(m, [("b", 2)])
    drain(m.broadcasts)
    feed(m, 1.0, Suspect(5, "a", "b").encode())
    assert m.incarnation == 6 and m.nodes["a"].incarnation == 6
    assert state(m, "a") == NodeState.ALIVE
    assert m.awareness.score == 1 and m.counters.refutes == 1
    assert queued_about(m, "a") == [Alive(6, "a", packed(1), PORT, b"", VSN)]


def test_dead_about_us_is_refuted() -> None:
    m = make("a")
    feed(m, 1.0, Dead(9, "a", "b").encode())
    assert m.incarnation == 10 and state(m, "a") == NodeState.ALIVE
    assert m.awareness.score == 1
    assert [x.incarnation for x in queued_about(m, "a") if isinstance(x, Alive)] == [10]
    feed(m, 2.0, Suspect(0, "a", "b").encode())  # below ours: stale, ignored
    assert m.incarnation == 10 and m.awareness.score == 1 and queued_about(m, "a") == []


def test_refute_takes_max_of_own_plus_one_and_accused_plus_one() -> None:
    m = make("a")
    feed(m, 1.0, Suspect(1, "a", "b").encode())  # accused == ours (1) -> 2
    assert m.incarnation == 2
    feed(m, 2.0, Suspect(2, "a", "b").encode())
    assert m.incarnation == 3


def test_alive_about_us() -> None:
    m = make("a")
    feed(m, 1.0, Suspect(4, "a", "b").encode())
    assert m.incarnation == 5
    drain(m.broadcasts)
    # lower incarnation, whatever its content: ignored
    feed(m, 2.0, Alive(4, "a", packed(1), PORT, b"\xff\x81\xa1k\xa1v", VSN).encode())
    assert m.incarnation == 5 and queued_about(m, "a") == []
    # same incarnation, byte-equal Meta and Vsn: ignored
    feed(m, 3.0, Alive(5, "a", packed(1), PORT, b"", VSN).encode())
    assert m.incarnation == 5 and queued_about(m, "a") == []
    assert m.counters.refutes == 1
    # same incarnation but other Meta (a restarted node with other tags): refuted
    feed(m, 4.0, Alive(5, "a", packed(1), PORT, b"\xff\x80", VSN).encode())
    assert m.incarnation == 6
    # higher incarnation: refuted above it
    feed(m, 5.0, Alive(20, "a", packed(1), PORT, b"", VSN).encode())
    assert m.incarnation == 21 and m.nodes["a"].meta == b""
    assert [x.incarnation for x in queued_about(m, "a") if isinstance(x, Alive)] == [21]


def test_refutation_of_a_maximal_incarnation_stays_on_the_wire() -> None:
    """Incarnations are uint32 on the wire: whatever we do about an accusation at 2**32-1, our
    own push/pull state must stay decodable (a peer would otherwise reject every exchange)."""
    m = make("a")
    feed(m, 1.0, Suspect(0xFFFFFFFF, "a", "b").encode())
    state_bytes = m.join_state(False).encode()
    decode_push_pull(state_bytes)
    for raw in drain(m.broadcasts):
        decode(raw)


# -- alive / dead rules for other nodes ------------------------------------------------------


def test_alive_needs_a_higher_incarnation() -> None:
    m = make("a")
    add_peers(m, [("b", 2)])
    feed(m, 1.0, alive("b", 2, 1, meta=b"\xff\x81\xa1k\xa1v").encode())  # equal: ignored
    assert m.nodes["b"].meta == META
    feed(m, 2.0, alive("b", 2, 2, meta=b"\xff\x81\xa1k\xa1v").encode())
    assert m.nodes["b"].meta == b"\xff\x81\xa1k\xa1v" and m.nodes["b"].incarnation == 2


@pytest.mark.parametrize("how", ["alive", "suspect", "dead"])
def test_alive_with_conflicting_address_is_ignored_unless_left(how: str) -> None:
    m = make("a")
    add_peers(m, [("b", 2)])
    if how == "suspect":
        feed(m, 1.0, Suspect(1, "b", "c").encode())
    elif how == "dead":
        feed(m, 1.0, Dead(1, "b", "c").encode())
    before = (state(m, "b"), m.nodes["b"].incarnation)
    feed(m, 2.0, alive("b", 3, 7).encode())
    assert m.nodes["b"].address == addr(2)
    assert (state(m, "b"), m.nodes["b"].incarnation) == before
    assert m.counters.extra.get("conflicts") == 1


def test_alive_with_new_address_is_accepted_for_a_left_node() -> None:
    m = make("a")
    add_peers(m, [("b", 2)])
    feed(m, 1.0, alive("b", 2, 3).encode(), Dead(3, "b", "b").encode())
    assert state(m, "b") == NodeState.LEFT
    # a restart elsewhere starts again at incarnation 1: still accepted (address update)
    feed(m, 2.0, alive("b", 3, 1).encode())
    assert state(m, "b") == NodeState.ALIVE
    assert m.nodes["b"].address == addr(3) and m.nodes["b"].incarnation == 1


def test_dead_from_the_node_itself_means_left() -> None:
    m = make("a")
    add_peers(m, [("b", 2), ("c", 3)])
    feed(m, 1.0, Dead(1, "b", "b").encode(), Dead(1, "c", "b").encode())
    assert state(m, "b") == NodeState.LEFT
    assert state(m, "c") == NodeState.DEAD
    queued = {decode(r) for r in drain(m.broadcasts)}
    assert {Dead(1, "b", "b"), Dead(1, "c", "b")} <= queued
    feed(m, 2.0, Dead(1, "b", "c").encode())  # already left: no change, no gossip
    assert state(m, "b") == NodeState.LEFT and not m.broadcasts.has("b")


def test_stale_dead_is_ignored() -> None:
    m = make("a")
    feed(m, 0.0, alive("b", 2, 4).encode())
    feed(m, 1.0, Dead(3, "b", "c").encode())
    assert state(m, "b") == NodeState.ALIVE


def test_remote_push_pull_dead_only_makes_us_suspect() -> None:
    m = make("a")
    add_peers(m, [("b", 2), ("c", 3), ("d", 4)])
    remote = PushPull(
        join=False,
        nodes=[
            PushNodeState("b", packed(2), PORT, META, 1, NodeState.DEAD, VSN),
            PushNodeState("c", packed(3), PORT, META, 1, NodeState.LEFT, VSN),
            PushNodeState("d", packed(4), PORT, META, 1, NodeState.SUSPECT, VSN),
            PushNodeState("zz", packed(9), PORT, META, 1, NodeState.DEAD, VSN),
        ],
        user_state=b"",
    )
    m.merge_push_pull(remote, 1.0)
    assert state(m, "b") == NodeState.SUSPECT
    assert state(m, "c") == NodeState.LEFT
    assert state(m, "d") == NodeState.SUSPECT
    assert "zz" not in m.nodes  # a dead node we never knew is not learned
    # the suspicions are ours (From = a), so peers count them as our accusation
    queued = {decode(r) for r in drain(m.broadcasts)}
    assert {Suspect(1, "b", "a"), Suspect(1, "d", "a")} <= queued


# -- Lifeguard awareness -----------------------------------------------------------------------


def test_failed_probes_raise_awareness_up_to_max_minus_one_and_slow_probing() -> None:
    m = make("a", config=PROBE_ONLY)
    add_peers(m, [("b", 2)])
    trace = run(m, 200.0, silent=["b"])
    pings = [s.t for s, _ in trace.msgs(Ping)]
    assert len(pings) >= 12
    assert m.awareness.score == PROBE_ONLY.awareness_max_multiplier - 1 == 7
    assert m.counters.probes_failed == len(pings) - 1  # the last one is still in flight
    gaps = [round(y - x, 9) for x, y in itertools.pairwise(pings)]
    # each interval is ProbeInterval * (score + 1); the score grows by one per failed probe
    assert gaps[0] == 1.0
    assert sorted(gaps) == gaps
    assert gaps[-1] == 8.0 and set(gaps) <= {1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0}


def test_successful_probes_lower_awareness_and_the_interval_follows() -> None:
    m = make("a", config=PROBE_ONLY)
    add_peers(m, [("b", 2)])
    trace = Trace()
    while not trace.msgs(Ping):
        run(m, m.next_deadline() or 0.0, trace=trace)
    ((sent, _),) = trace.msgs(Ping)
    first = sent.t
    m.awareness.apply(3)
    assert m.awareness.score == 3
    trace = run(m, first + 30.0)
    pings = [first] + [s.t for s, _ in trace.msgs(Ping)]
    gaps = [round(y - x, 9) for x, y in itertools.pairwise(pings)]
    # the probe after `first` is scheduled with score 0; then 3, 2, 1 as each ack lowers it
    assert gaps[:5] == [1.0, 4.0, 3.0, 2.0, 1.0]
    assert m.awareness.score == 0 and m.counters.probes_failed == 0


def test_awareness_clamps() -> None:
    m = make("a")
    m.awareness.apply(-5)
    assert m.awareness.score == 0
    m.awareness.apply(100)
    assert m.awareness.score == 7
    assert m.awareness.scale(0.5) == 4.0


@pytest.mark.parametrize("nacks", [0, 1, 2, 3])
def test_failed_probe_penalty_is_missing_nacks(nacks: int) -> None:
    """With nack-capable peers, a failed probe costs (expected nacks - nacks received)."""
    m = make("a", config=PROBE_ONLY)
    add_peers(m, [("b", 2), ("c", 3), ("d", 4), ("e", 5), ("f", 6)])
    trace = Trace()
    t0, ping = next_ping_to(m, "b", 30.0, trace)
    assert m.awareness.score == 0
    start = len(trace.sent)
    run(m, t0 + LAN.probe_timeout, silent=["b"], trace=trace)
    reqs = [x for s in trace.sent[start:] for x in s.of(IndirectPing)]
    assert len(reqs) == 3 and all(r.nack for r in reqs)
    for k in range(nacks):
        feed(m, t0 + 0.7, Nack(ping.seq_no).encode(), src=addr(3 + k))
    m.tick(t0 + 1.0)  # the probe's deadline (score 0: one ProbeInterval)
    assert m.awareness.score == 3 - nacks
    assert state(m, "b") == NodeState.SUSPECT


# -- indirect probes ---------------------------------------------------------------------------


def test_indirect_probe_after_probe_timeout() -> None:
    cfg = LAN.with_(suspicion_mult=1000)
    m = make("a", config=cfg)
    add_peers(m, [("b", 2), ("c", 3), ("d", 4), ("g", 7)])
    feed(m, 0.0, alive("e", 5, vsn=VSN3).encode(), alive("f", 6).encode())
    feed(m, 0.0, Suspect(1, "f", "zz").encode())  # f is suspect: never asked to help
    m.take_effects()
    trace = Trace()
    t0, ping = next_ping_to(m, "b", 60.0, trace)
    assert ping == Ping(ping.seq_no, "b", packed(1), PORT, "a")
    mark = len(trace.sent)
    run(m, t0 + cfg.probe_timeout - 1e-6, silent=["b"], trace=trace)
    assert not [x for s in trace.sent[mark:] for x in s.of(IndirectPing)], "indirect too early"
    run(m, t0 + cfg.probe_timeout, silent=["b"], trace=trace)
    reqs = [(s.dest, x) for s in trace.sent[mark:] for x in s.of(IndirectPing)]
    assert len(reqs) == cfg.indirect_checks == 3
    helpers = {dest for dest, _ in reqs}
    assert len(helpers) == 3 and helpers <= {addr(3), addr(4), addr(5), addr(7)}
    for dest, req in reqs:
        assert req == IndirectPing(
            ping.seq_no, packed(2), PORT, "b", dest != addr(5), packed(1), PORT, "a"
        ), "Nack must be asked of PMax >= 4 peers only"
    tcp = [e for t, e in trace.other if isinstance(e, StartTcpPing) and t == t0 + 0.5]
    assert tcp == [StartTcpPing(addr(2), "b", ping.seq_no, t0 + 1.0)]
    # a helper relays b's ack: the probe succeeds and b stays alive
    m.awareness.apply(2)
    feed(m, t0 + 0.7, Ack(ping.seq_no).encode(), src=sorted(helpers)[0])
    assert m.awareness.score == 1
    run(m, t0 + 1.5, silent=["b"], trace=trace)
    assert state(m, "b") == NodeState.ALIVE and m.counters.probes_failed == 0


def test_probe_of_a_suspect_carries_the_suspicion() -> None:
    m = make("a", config=PROBE_ONLY)
    add_peers(m, [("b", 2)])
    feed(m, 0.0, Suspect(1, "b", "zz").encode())
    m.take_effects()
    trace = Trace()
    t0, ping = next_ping_to(m, "b", 30.0, trace)
    (s,) = [s for s in trace.sent if s.t == t0 and ping in s.msgs]
    assert s.msgs == [ping, Suspect(1, "b", "a")]
    assert s.data[0] == 12  # CRC: b advertises PMax 5


def test_tcp_ping_success_saves_the_probe() -> None:
    cfg = LAN.with_(suspicion_mult=1000)
    m = make("a", config=cfg)
    add_peers(m, [("b", 2)])
    trace = Trace()
    t0, ping = next_ping_to(m, "b", 30.0, trace)
    run(m, t0 + 0.5, silent=["b"], trace=trace)
    assert any(isinstance(e, StartTcpPing) for _, e in trace.other)
    m.tcp_ping_result(ping.seq_no, True, t0 + 0.6)
    run(m, t0 + 1.0, silent=["b"], trace=trace)
    assert state(m, "b") == NodeState.ALIVE and m.counters.probes_failed == 0


def relay_setup(nack: bool) -> tuple[Memberlist, IndirectPing, Ping]:
    m = make("a")
    add_peers(m, [("b", 2), ("r", 9)])
    drain(m.broadcasts)  # keep the relayed ping a plain message
    req = IndirectPing(41, packed(2), PORT, "b", nack, packed(9), 7000, "r")
    feed(m, 5.0, req.encode(), src=("10.0.0.99", 1))
    (s,) = collect(m, 5.0, Trace())
    assert s.dest == addr(2)
    (ping,) = s.msgs
    assert isinstance(ping, Ping)
    assert ping.node == "b" and ping.seq_no != 41  # our own sequence number
    assert (ping.source_addr, ping.source_port, ping.source_node) == (packed(1), PORT, "a")
    return m, req, ping


def test_relay_sends_nack_after_probe_timeout_when_target_is_silent() -> None:
    m, _, _ = relay_setup(nack=True)
    m.tick(5.0 + LAN.probe_timeout - 1e-6)
    assert not [s for s in collect(m, 5.4, Trace()) if s.dest == (ip(9), 7000)]
    m.tick(5.0 + LAN.probe_timeout)
    sent = collect(m, 5.5, Trace())
    to_requester = [s for s in sent if s.dest == (ip(9), 7000)]
    assert len(to_requester) == 1 and Nack(41) in to_requester[0].msgs


def test_relay_without_nack_request_stays_quiet() -> None:
    m, _, _ = relay_setup(nack=False)
    m.tick(6.0)
    assert not [s for s in collect(m, 6.0, Trace()) if s.dest == (ip(9), 7000)]


def test_relay_forwards_the_targets_ack() -> None:
    m, _, ping = relay_setup(nack=True)
    feed(m, 5.2, Ack(ping.seq_no).encode(), src=addr(2))
    sent = collect(m, 5.2, Trace())
    assert [s.msgs for s in sent if s.dest == (ip(9), 7000)] == [[Ack(41)]]
    m.tick(6.0)  # acked in time: no nack afterwards
    assert not [s for s in collect(m, 6.0, Trace()) if s.dest == (ip(9), 7000)]


# -- broadcasts and retransmission -------------------------------------------------------------


def count_sent(trace: Trace, raw: bytes) -> int:
    return sum(s.raws.count(raw) for s in trace.sent)


@pytest.mark.parametrize(("n", "limit"), [(2, 4), (9, 4), (10, 8), (99, 8), (100, 12)])
def test_broadcast_is_sent_exactly_retransmit_limit_times(n: int, limit: int) -> None:
    """RetransmitMult * ceil(log10(n + 1)): 4 at n = 2 was checked live against serf."""
    m = cluster_of(n, LAN.with_(push_pull_interval=0))
    news = alive("p2", 2, 2, meta=b"\xff\x81\xa1x\xa1y").encode()
    feed(m, 1.0, news)
    trace = run(m, 60.0)
    assert retransmit_limit(LAN.retransmit_mult, n) == limit
    assert count_sent(trace, news) == limit
    assert not m.broadcasts.has("p2")


def test_newer_news_about_a_node_replaces_the_queued_message() -> None:
    m = cluster_of(3, LAN.with_(push_pull_interval=0))
    old = alive("p3", 3, 2).encode()
    feed(m, 1.0, old)
    trace = run(m, m.next_deadline() or 0.0)
    while count_sent(trace, old) == 0:
        run(m, m.next_deadline() or 0.0, trace=trace)
    early = count_sent(trace, old)
    assert 0 < early < 4
    size = len(m.broadcasts)
    new = Suspect(2, "p3", "p2").encode()
    feed(m, trace.sent[-1].t, new)
    assert len(m.broadcasts) == size  # replaced, not added
    run(m, 60.0, trace=trace)
    assert count_sent(trace, old) == early
    assert count_sent(trace, new) == retransmit_limit(LAN.retransmit_mult, 3)


def test_queue_orders_least_transmitted_then_newest_first() -> None:
    """memberlist's TransmitLimitedQueue: fewest transmits first; among equals, newest first
    (equal sizes here, so its size tie-break does not apply)."""
    q = BroadcastQueue()
    for i in range(5):
        q.queue(bytes([i]) * 10)
    assert q.get(0, 25, 10) == [b"\x04" * 10, b"\x03" * 10]
    assert q.get(0, 1000, 10)[:3] == [b"\x02" * 10, b"\x01" * 10, b"\x00" * 10]
    # everything has now been sent at least once; 0, 1, 2 once and 3, 4 twice
    assert q.get(0, 25, 10) == [b"\x02" * 10, b"\x01" * 10]


# -- gossip targets and reaping ----------------------------------------------------------------


def test_gossip_goes_to_recently_dead_but_never_to_left_nodes() -> None:
    m = make("a", config=LAN.with_(push_pull_interval=0))
    add_peers(m, [("b", 2), ("c", 3), ("d", 4)])
    run(m, 1.0)
    feed(m, 1.0, Dead(1, "c", "c").encode(), Dead(1, "d", "b").encode())
    trace = run(m, 20.0)
    dests = {s.dest for s in trace.sent}
    assert addr(4) in dests  # dead for less than GossipToTheDeadTime: still gossiped to
    assert addr(3) not in dests  # left: memberlist's gossip filter excludes StateLeft


def test_gossip_reaches_the_dead_only_for_gossip_to_the_dead_time() -> None:
    """With 30 members the probe list wraps (and reaps) only every ~30 s, leaving a window in
    which the dead node is still known but past GossipToTheDeadTime."""
    m = cluster_of(30, LAN.with_(push_pull_interval=0))
    run(m, 10.0)
    feed(m, 10.0, Dead(1, "p5", "p2").encode())
    trace = Trace()
    for t in range(11, 70):  # keep news flowing so every gossip round has something to send
        feed(m, float(t), alive("p2", 2, t).encode())
        run(m, float(t), trace=trace)
    to_dead = [s.t for s in trace.sent if s.dest == addr(5)]
    assert to_dead and min(to_dead) < 10.0 + LAN.gossip_to_the_dead_time
    assert max(to_dead) <= 10.0 + LAN.gossip_to_the_dead_time


def test_dead_nodes_are_reaped_after_gossip_to_the_dead_time() -> None:
    m = make("a", config=LAN.with_(push_pull_interval=0))
    add_peers(m, [("b", 2), ("c", 3)])
    run(m, 10.0)
    feed(m, 10.0, Dead(1, "c", "b").encode())
    run(m, 10.0 + LAN.gossip_to_the_dead_time - 1e-6)
    assert state(m, "c") == NodeState.DEAD and m.estimated_nodes() == 3
    trace = run(m, 45.0)
    assert "c" not in m.nodes and m.estimated_nodes() == 2
    assert not [s for s in trace.sent if s.dest == addr(3) and s.t > 40.0]
    # once forgotten, the node can come back as new
    feed(m, 46.0, alive("c", 3, 1).encode())
    assert state(m, "c") == NodeState.ALIVE


def test_left_nodes_are_reaped_too() -> None:
    """memberlist >= 0.2.3 (#254) purges left nodes with dead ones; 0.2.2 kept them forever."""
    m = make("a", config=LAN.with_(push_pull_interval=0))
    add_peers(m, [("b", 2), ("c", 3)])
    run(m, 10.0)
    feed(m, 10.0, Dead(1, "c", "c").encode())
    run(m, 39.0)
    assert state(m, "c") == NodeState.LEFT
    run(m, 45.0)
    assert "c" not in m.nodes


# -- leave -------------------------------------------------------------------------------------


def test_leave_broadcasts_our_dead_from_ourselves() -> None:
    m = make("a", config=LAN.with_(push_pull_interval=0))
    add_peers(m, [("b", 2)])
    run(m, 0.5)
    feed(m, 0.5, Suspect(2, "a", "b").encode())  # refuted: incarnation 3
    run(m, 5.0)
    assert not m.leave_broadcast_pending()
    m.leave(5.0)
    assert state(m, "a") == NodeState.LEFT
    assert m.leave_broadcast_pending()
    trace = run(m, 10.0)
    assert not m.leave_broadcast_pending()
    left = Dead(3, "a", "a").encode()
    assert count_sent(trace, left) == retransmit_limit(LAN.retransmit_mult, 2)
    # while leaving, news about us is no longer refuted
    feed(m, 11.0, alive("a", 1, 9).encode(), Suspect(9, "a", "b").encode())
    assert state(m, "a") == NodeState.LEFT and m.incarnation == 3
    # a peer records the graceful leave
    peer = make("b", 2)
    add_peers(peer, [("a", 1)])
    feed(peer, 6.0, alive("a", 1, 3).encode())
    feed(peer, 7.0, left)
    assert state(peer, "a") == NodeState.LEFT


def serf_with_peers(names: list[str]) -> Serf:
    s = Serf(name="a", addr=ip(1), port=PORT, tags={"role": "x"}, config=LAN, rng=random.Random(3))
    s.start(0.0)
    for k, name in enumerate(names):
        feed(s, 0.0, alive(name, k + 2).encode())
    s.take_effects()
    s.take_events()
    return s


def test_serf_shows_left_after_intent_and_failed_without() -> None:
    s = serf_with_peers(["b", "c"])
    leave_b = bytes((0,)) + bytes.fromhex("83a54c54696d6505a44e6f6465a162a55072756e65c2")
    feed(s, 1.0, b"\x08" + leave_b)
    assert {m.name: m.status for m in s.members()}["b"] == MemberStatus.LEAVING
    feed(s, 2.0, Dead(1, "b", "b").encode(), Dead(1, "c", "c").encode())
    status = {m.name: m.status for m in s.members()}
    assert status["b"] == MemberStatus.LEFT
    assert status["c"] == MemberStatus.FAILED  # memberlist says left, but no intent: failed
    kinds = {(e.type, e.member.name) for e in s.take_events() if isinstance(e, MemberEvent)}
    assert kinds == {(MemberEventType.LEAVE, "b"), (MemberEventType.FAILED, "c")}


def test_graceful_leave_and_crash_in_a_simulated_cluster() -> None:
    net = SimNetwork(20261124)
    a, b, c, d = (net.add_node(x) for x in ("a", "b", "c", "d"))
    for n in (b, c, d):
        net.join(n, a)
    assert net.run_until(15.0, stop=net.all_see_all_alive)
    # graceful: the Serf leave intent first, then memberlist's dead{From=self}, then exit
    c.serf.leave(net.now)
    assert net.run_until(net.now + 5.0, stop=lambda: not c.serf.leave_intent_pending())
    c.serf.memberlist.leave(net.now)
    ml = c.serf.memberlist
    assert net.run_until(net.now + 5.0, stop=lambda: not ml.leave_broadcast_pending())
    net.run_until(net.now + LAN.leave_propagate_delay)
    for obs in (a, b, d):
        assert obs.serf.memberlist.nodes["c"].state == NodeState.LEFT
        assert net.status_of(obs, "c") == MemberStatus.LEFT
    net.crash(c)
    net.crash(d)  # and d just dies
    assert net.run_until(
        net.now + 60.0, stop=lambda: net.all_see("d", {MemberStatus.FAILED}, [a, b])
    ), f"seed {net.seed}"
    for obs in (a, b):
        assert net.status_of(obs, "c") == MemberStatus.LEFT
        assert obs.serf.memberlist.nodes["d"].state == NodeState.DEAD
    assert all(name != "c" for _, name in a.failed_events + b.failed_events)

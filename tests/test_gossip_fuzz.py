"""Hostile input for the gossip core: whatever arrives, nothing raises and membership holds.

A small world (one Serf/Memberlist that knows members in every state) is fed garbage,
truncated, oversized, bit-flipped, mutated and replayed packets. Afterwards member names,
states and incarnations, Serf statuses and intent times, our own incarnation and health are
exactly as before, no event was emitted, whatever we sent is well-formed, and dropped input was
counted. The last tests throw random datagrams and streams at a real `GossipRuntime` on
loopback and check that it still answers a join.
Hypothesis runs derandomized with bounded example counts, so the file is deterministic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import pytest
import structlog
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gossip import packet
from gossip.config import GossipConfig
from gossip.member import MemberStatus
from gossip.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Nack,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    decode,
    decode_push_pull,
    pack,
)
from gossip.runtime import GossipRuntime
from gossip.serf import Serf, SerfType, encode_msg
from gossip.swim import Address, ProtocolError, SendPacket

LAN = GossipConfig.lan()
PORT = 7946
VSN = bytes((1, 5, 2, 2, 5, 5))
META = b"\xff\x80"
NOW = 2.0
SRC: Address = ("10.0.9.9", PORT)

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def ip(i: int) -> str:
    return f"10.0.0.{i}"


def packed(i: int) -> bytes:
    return bytes((10, 0, 0, i))


def alive(name: str, i: int, inc: int, *, meta: bytes = META, vsn: bytes = VSN) -> bytes:
    return Alive(inc, name, packed(i), PORT, meta, vsn).encode()


def udp(*msgs: bytes, crc: bool = False, compress: bool = False) -> bytes:
    body = msgs[0] if len(msgs) == 1 else packet.make_compound(list(msgs))
    if compress:
        body = packet.compress_message(body)
    return packet.encode_udp(body, crc=crc, compress=False, keyring=None)


def user(t: SerfType, fields: dict[str, Any]) -> bytes:
    return b"\x08" + encode_msg(t, fields)


QUERY = user(
    SerfType.QUERY,
    {
        "Addr": packed(9),
        "Filters": None,
        "Flags": 1,
        "ID": 77,
        "LTime": 2,
        "Name": "uptime",
        "Payload": b"",
        "Port": PORT,
        "RelayFactor": 0,
        "SourceNode": "q",
        "Timeout": 2_000_000_000,
    },
)
# What the world was built from: every one of these is stale by the time setup is over.
SETUP: list[bytes] = [
    *(udp(alive("b", 2, inc)) for inc in range(1, 6)),
    udp(alive("c", 3, 3), crc=True),
    udp(Suspect(3, "c", "x").encode(), crc=True),
    udp(alive("d", 4, 2), Dead(2, "d", "x").encode()),
    udp(alive("e", 5, 4), compress=True),
    udp(user(SerfType.LEAVE, {"LTime": 5, "Node": "e", "Prune": False})),
    udp(Dead(4, "e", "e").encode(), crc=True),
    udp(Suspect(2, "a", "b").encode()),  # refuted: our incarnation becomes 3
    udp(user(SerfType.JOIN, {"LTime": 7, "Node": "b"})),
    udp(user(SerfType.USER_EVENT, {"CC": False, "LTime": 3, "Name": "deploy", "Payload": b"v"})),
    udp(QUERY),
    udp(Ping(1, "a", packed(2), PORT, "b").encode(), Ack(12345).encode(), Nack(9).encode()),
    udp(IndirectPing(5, packed(2), PORT, "b", True, packed(3), PORT, "c").encode()),
]
KNOWN = {"a": (1, 3), "b": (2, 5), "c": (3, 3), "d": (4, 2), "e": (5, 4)}  # name: (ip, inc)

Snapshot = tuple[Any, ...]


@pytest.fixture(autouse=True, scope="module")
def _quiet_logs() -> Any:
    """Thousands of examples each log their setup; keep warnings, restore the config after."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**saved)


def snapshot(s: Serf) -> Snapshot:
    ml = s.memberlist
    nodes = {
        n.name: (n.state, n.incarnation, n.addr, n.port, n.meta, n.vsn) for n in ml.nodes.values()
    }
    members = {
        k: (ms.member.status, ms.status_ltime, ms.member.tags)
        for k, ms in s.members_by_name.items()
    }
    clocks = (s.clock.time(), s.event_clock.time())
    return (nodes, members, ml.incarnation, ml.awareness.score, clocks)


@dataclass
class World:
    serf: Serf
    before: Snapshot

    def feed(self, data: bytes, src: Address = SRC) -> None:
        self.serf.receive_packet(data, src, NOW)

    def drops(self) -> int:
        c = self.serf.memberlist.counters
        return (
            c.packets_dropped
            + c.messages_dropped
            + c.pings_misaddressed
            + self.serf.stats["serf_messages_dropped"]
        )

    def check_unchanged(self) -> None:
        s = self.serf
        assert snapshot(s) == self.before
        assert s.take_events() == []
        for e in s.take_effects():
            if isinstance(e, SendPacket):  # whatever comes in, what we send is well-formed
                for raw in packet.decode_udp(e.data, None):
                    decode(raw)


def build() -> World:
    s = Serf(
        name="a", addr=ip(1), port=PORT, tags={"role": "web"}, config=LAN, rng=random.Random(9)
    )
    s.start(0.0)
    for k, data in enumerate(SETUP):
        s.receive_packet(data, SRC, 0.1 * (k + 1))
    ml = s.memberlist
    assert {n: (x.state, x.incarnation) for n, x in ml.nodes.items()} == {
        "a": (NodeState.ALIVE, 3),
        "b": (NodeState.ALIVE, 5),
        "c": (NodeState.SUSPECT, 3),
        "d": (NodeState.DEAD, 2),
        "e": (NodeState.LEFT, 4),
    }
    assert {m.name: m.status for m in s.members()} == {
        "a": MemberStatus.ALIVE,
        "b": MemberStatus.ALIVE,
        "c": MemberStatus.ALIVE,
        "d": MemberStatus.FAILED,
        "e": MemberStatus.LEFT,
    }
    s.take_effects()
    s.take_events()
    return World(s, snapshot(s))


# -- garbage, oversized, truncated -------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=1500))
@example(b"")
@example(b"\x00\x81\x91\x01\x02")  # a map keyed by an array: unhashable in Python
@example(b"\x04\x81\x80\x01")  # ... keyed by a map
@example(b"\x08\x04\x81\x91\x00\xc0")  # the same inside a Serf query
@example(b"\x08\x09\x81\x91\x00\xc0")  # ... and a Serf relay header
def test_random_bytes(data: bytes) -> None:
    w = build()
    w.feed(data)
    w.check_unchanged()


@FUZZ
@given(
    st.sampled_from([0, 1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 244]),
    st.integers(1400, 65536),
    st.integers(0, 2**32),
)
def test_oversized_packets(lead: int, size: int, seed: int) -> None:
    data = bytes((lead,)) + random.Random(seed).randbytes(size - 1)
    w = build()
    before = w.drops()
    w.feed(data)
    w.check_unchanged()
    # a compound may announce zero parts (and cut-short parts are a separate concern, below)
    assert w.drops() > before or lead == 7


def test_oversized_valid_packets_are_handled() -> None:
    w = build()
    big_user = udp(b"\x08" + bytes((SerfType.USER_EVENT,)) + b"\xc1" * 65000)
    w.feed(big_user)
    assert w.serf.stats["serf_messages_dropped"] == 1
    # a valid compound, padded with junk up to 64 KiB: the junk after the parts is ignored
    body = packet.make_compound([alive("b", 2, 1), Suspect(1, "c", "x").encode()])
    w.feed(body + bytes(65536 - len(body)))
    w.check_unchanged()


@FUZZ
@given(st.integers(0, len(SETUP) - 1), st.data())
def test_truncated_packets(which: int, data: st.DataObject) -> None:
    full = SETUP[which]
    cut = data.draw(st.integers(0, len(full) - 1))
    w = build()
    w.feed(full[:cut])
    w.check_unchanged()


def test_truncated_compound_parts_are_counted() -> None:
    w = build()
    body = packet.make_compound([Ping(3, "a").encode(), alive("zz", 9, 1)])
    before = w.serf.memberlist.counters.messages_dropped
    w.feed(body[:-5])  # the second part (a new node) is cut short
    assert "zz" not in w.serf.memberlist.nodes
    acks = [
        decode(raw)
        for e in w.serf.take_effects()
        if isinstance(e, SendPacket)
        for raw in packet.decode_udp(e.data, None)
    ]
    assert Ack(3) in acks  # the part that fit was handled
    assert w.serf.memberlist.counters.messages_dropped == before + 1
    w.check_unchanged()


# -- bit flips of protected packets --------------------------------------------------------------

NEWS: list[bytes] = [
    alive("zz", 9, 1),
    alive("b", 2, 9, meta=b"\xff\x81\xa1k\xa1v"),
    Suspect(5, "b", "x").encode(),
    Dead(5, "b", "x").encode(),
    Dead(3, "a", "b").encode(),
    user(SerfType.LEAVE, {"LTime": 50, "Node": "b", "Prune": False}),
    user(SerfType.USER_EVENT, {"CC": False, "LTime": 9, "Name": "new", "Payload": b"p"}),
]
# Each of these would change something if it arrived intact.
PROTECTED: list[bytes] = [
    *(udp(m, crc=True) for m in NEWS),
    udp(*NEWS, crc=True),
    udp(*NEWS, crc=True, compress=True),
]


def test_protected_packets_are_news_when_intact() -> None:
    for data in PROTECTED:
        w = build()
        w.feed(data)
        assert snapshot(w.serf) != w.before or w.serf.take_events(), data.hex()


@FUZZ
@given(st.sampled_from(PROTECTED), st.data())
def test_bit_flipped_crc_packets_are_dropped(data: bytes, draw: st.DataObject) -> None:
    """CRC-32 catches every error of up to 3 bits in packets this size; byte 0 (the CRC
    wrapper's type) is covered exhaustively below."""
    bits = draw.draw(
        st.sets(st.integers(8, 8 * len(data) - 1), min_size=1, max_size=3), label="bits"
    )
    flipped = bytearray(data)
    for b in bits:
        flipped[b // 8] ^= 1 << (b % 8)
    w = build()
    before = w.serf.memberlist.counters.packets_dropped
    w.feed(bytes(flipped))
    assert w.serf.memberlist.counters.packets_dropped == before + 1
    w.check_unchanged()


def test_flipped_crc_type_byte() -> None:
    for data in PROTECTED:
        for bit in range(8):
            w = build()
            w.feed(bytes((data[0] ^ (1 << bit),)) + data[1:])
            w.check_unchanged()


# -- mutations of valid packets -----------------------------------------------------------------

NOOPS: list[bytes] = [
    alive("b", 2, 3),
    Suspect(1, "b", "x").encode(),
    Dead(1, "d", "x").encode(),
    Suspect(1, "a", "b").encode(),
    Ping(99, "a", packed(2), PORT, "b").encode(),
    Ack(4242).encode(),
    user(SerfType.JOIN, {"LTime": 1, "Node": "b"}),
]


@FUZZ
@given(
    st.lists(st.sampled_from(NOOPS), min_size=2, max_size=8),
    st.data(),
    st.binary(min_size=1, max_size=200),
)
def test_compound_with_one_corrupted_part(
    parts: list[bytes], data: st.DataObject, junk: bytes
) -> None:
    i = data.draw(st.integers(0, len(parts) - 1))
    parts = [*parts[:i], junk, *parts[i + 1 :]]
    pinged = any(p[0] == 0 for k, p in enumerate(parts) if k != i)
    w = build()
    before = w.serf.memberlist.counters.packets_dropped
    w.feed(udp(*parts))
    sent = [
        decode(raw)
        for e in w.serf.take_effects()
        if isinstance(e, SendPacket)
        for raw in packet.decode_udp(e.data, None)
    ]
    if w.serf.memberlist.counters.packets_dropped == before and pinged:
        assert Ack(99) in sent  # the packet was taken, so its other parts were handled
    w.check_unchanged()


@FUZZ
@given(
    st.sampled_from(["zz", "b", "d", "e"]),
    st.binary(min_size=1, max_size=5) | st.binary(min_size=7, max_size=24),
)
def test_alive_with_malformed_vsn_is_dropped(name: str, vsn: bytes) -> None:
    i, inc = KNOWN.get(name, (9, 0))
    w = build()
    before = w.serf.memberlist.counters.messages_dropped
    w.feed(udp(alive(name, i, inc + 5, vsn=vsn)))
    assert w.serf.memberlist.counters.messages_dropped == before + 1
    w.check_unchanged()


@pytest.mark.parametrize(
    "vsn", [bytes((0, 5, 2, 2, 5, 5)), bytes((1, 0, 2, 2, 5, 5)), bytes((5, 1, 2, 2, 5, 5))]
)
def test_alive_with_impossible_protocol_range_is_dropped(vsn: bytes) -> None:
    w = build()
    before = w.serf.memberlist.counters.messages_dropped
    w.feed(udp(alive("zz", 9, 1, vsn=vsn), alive("b", 2, 9, vsn=vsn)))
    assert w.serf.memberlist.counters.messages_dropped == before + 2
    w.check_unchanged()


def test_compound_claiming_255_parts() -> None:
    w = build()
    counters = w.serf.memberlist.counters
    dropped = counters.packets_dropped
    w.feed(b"\x07\xff" + bytes(100))  # the length table alone needs 510 bytes
    assert counters.packets_dropped == dropped + 1
    part = Suspect(1, "b", "x").encode()
    table = len(part).to_bytes(2, "big") * 255
    w.feed(b"\x07\xff" + table + part * 255)  # all there: 255 stale suspicions, handled
    assert counters.packets_dropped == dropped + 1
    w.feed(b"\x07\xff" + b"\xff\xff" * 255 + part)  # every part claims 64 KiB
    w.check_unchanged()


@cache
def bombs() -> list[bytes]:
    big = packet.compress_message(b"\x08" + bytes(packet.UDP_DECOMPRESS_LIMIT + 1))
    small = packet.compress_message(b"\x08" + bytes(200_000))
    six = packet.make_compound([small] * 6)  # 1.2 MB in all
    return [
        big,
        packet.add_crc(big),
        packet.compress_message(packet.make_compound([small] * 20)),
        packet.make_compound([small] * 127),
        packet.compress_message(packet.compress_message(six)),
        packet.compress_message(packet.compress_message(packet.compress_message(six))),
        packet.make_compound([packet.compress_message(packet.make_compound([small] * 10))] * 10),
    ]


def test_nested_compress_bombs_are_dropped_quickly() -> None:
    w = build()
    dropped = w.serf.memberlist.counters.packets_dropped
    for k, bomb in enumerate(bombs()):
        start = time.perf_counter()
        w.feed(bomb)
        assert time.perf_counter() - start < 2.0
        assert w.serf.memberlist.counters.packets_dropped == dropped + k + 1, k
    w.check_unchanged()


# -- replays ------------------------------------------------------------------------------------


@st.composite
def stale_messages(draw: st.DrawFn) -> bytes:
    """News about a known node that is older than what we know (alive: not newer)."""
    name = draw(st.sampled_from(sorted(KNOWN)))
    i, inc = KNOWN[name]
    kind = draw(st.sampled_from(["alive", "suspect", "dead"]))
    if kind == "alive":
        top = inc - 1 if name == "a" else inc  # an equal alive about us with other meta: refuted
        return alive(name, i, draw(st.integers(0, top)), meta=draw(st.sampled_from([META, b""])))
    old = draw(st.integers(0, inc - 1))
    sender = draw(st.sampled_from(["x", "b", "c", "a", "zz"]))
    return (Suspect if kind == "suspect" else Dead)(old, name, sender).encode()


@FUZZ
@given(
    st.lists(
        st.sampled_from(SETUP) | stale_messages().map(lambda m: udp(m)),
        min_size=1,
        max_size=20,
    )
)
def test_replays_change_nothing(replays: list[bytes]) -> None:
    w = build()
    for data in replays:
        w.feed(data)
    w.check_unchanged()


@FUZZ
@given(st.lists(stale_messages(), min_size=1, max_size=40))
def test_stale_news_in_compounds_changes_nothing(msgs: list[bytes]) -> None:
    w = build()
    w.feed(udp(*msgs, crc=True))
    w.feed(udp(*msgs, compress=True))
    w.check_unchanged()


# -- structured junk: right field names, wrong everything else ---------------------------------

FIELDS = [
    "Node", "SeqNo", "Incarnation", "Addr", "Port", "Meta", "Vsn", "From", "Target", "Nack",
    "SourceAddr", "SourcePort", "SourceNode", "Payload", "LTime", "Name", "CC", "Filters",
    "Flags", "ID", "Timeout", "RelayFactor", "Events", "StatusLTimes", "LeftMembers",
    "EventLTime", "QueryLTime", "Key", "Keys", "Result", "Message", "PrimaryKey", "DestAddr",
    "IP", "Prune", "Join", "Nodes", "UserStateLen", "State", "Expr", "Tag",
]  # fmt: skip
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.binary(max_size=24)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)
_bodies = st.dictionaries(st.sampled_from(FIELDS), _values, max_size=8).map(pack)
# Maps keyed by arrays or maps are valid msgpack that Python cannot hash.
_odd_maps = st.builds(
    lambda key, value: b"\x81" + pack(key) + pack(value),
    st.lists(st.integers(0, 3), max_size=2) | st.dictionaries(st.text(max_size=2), st.none()),
    _values,
)
_msgpack = _bodies | _odd_maps | st.binary(max_size=40)


@st.composite
def structured(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return bytes((draw(st.sampled_from([0, 1, 2, 3, 4, 5, 11])),)) + draw(_msgpack)
    serf_type = draw(st.integers(0, 10))
    return bytes((8, serf_type)) + draw(_msgpack) + draw(st.sampled_from([b"", b"\x05\x80"]))


@FUZZ
@given(st.lists(structured(), min_size=1, max_size=4))
@example([b"\x00\x81\x91\x01\x02"])
@example([b"\x08\x09\x81\x91\x00\xc0\x05\x80"])
def test_structured_junk_never_raises(msgs: list[bytes]) -> None:
    """Such messages can be valid news (a new node, a new intent), so only robustness and
    well-formed output are checked here."""
    w = build()
    for m in msgs:
        w.feed(udp(m))
    w.serf.take_events()
    for e in w.serf.take_effects():
        if isinstance(e, SendPacket):
            for raw in packet.decode_udp(e.data, None):
                decode(raw)


def serf_state(fields: dict[str, Any]) -> bytes:
    return encode_msg(SerfType.PUSH_PULL, fields)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(
            ["LTime", "EventLTime", "QueryLTime", "StatusLTimes", "LeftMembers", "Events"]
        ),
        _values,
        max_size=6,
    )
)
@example({"Events": [{"Events": 5, "LTime": 3}]})
@example({"StatusLTimes": {"zz": 2**64 - 1}, "LeftMembers": ["zz"]})
@example({"Events": [{"Events": [{"Name": "x", "Payload": 7}], "LTime": 2}]})
def test_push_pull_user_state_never_raises(fields: dict[str, Any]) -> None:
    w = build()
    w.serf.merge_remote_state(serf_state(fields), False, NOW)
    w.serf.memberlist.join_state(False).encode()  # and we can still describe ourselves


@FUZZ
@given(
    st.lists(
        st.builds(
            PushNodeState,
            st.sampled_from(["b", "c", "d", "e", "zz", "a", ""]),
            st.sampled_from([packed(2), packed(9), b"", bytes(16)]),
            st.integers(0, 65535),
            st.binary(max_size=20),
            st.integers(0, 2**32 - 1),
            st.sampled_from(list(NodeState)),
            st.sampled_from([VSN, b"", bytes((1, 2, 2, 2, 5, 5)), bytes((2, 5, 3, 2, 5, 5))]),
        ),
        max_size=6,
    ),
    st.binary(max_size=60) | _bodies.map(lambda b: b"\x02" + b),
)
def test_push_pull_never_raises_but_protocol_errors(
    nodes: list[PushNodeState], user_state: bytes
) -> None:
    w = build()
    wire = PushPull(join=False, nodes=nodes, user_state=user_state).encode()
    with contextlib.suppress(ProtocolError):
        w.serf.memberlist.handle_push_pull(decode_push_pull(wire), NOW)
    w.serf.memberlist.join_state(False).encode()


# -- the real runtime on loopback ---------------------------------------------------------------

RT_CONFIG = LAN.with_(
    probe_interval=0.2,
    probe_timeout=0.1,
    gossip_interval=0.05,
    suspicion_mult=3,
    push_pull_interval=5.0,
    tcp_timeout=2.0,
)
KILLERS = [
    b"\x00\x81\x91\x01\x02",
    b"\x04\x81\x80\x01",
    b"\x08\x04\x81\x91\x00\xc0",
    b"\x08\x09\x81\x91\x00\xc0\x05\x80",
]


def datagrams(rnd: random.Random) -> list[bytes]:
    valid = [udp(Ping(7, "fz-a").encode()), *PROTECTED, *SETUP]
    out: list[bytes] = [b"", *KILLERS, *bombs()[:3]]
    while len(out) < 500:
        kind = rnd.randrange(5)
        if kind == 0:
            out.append(rnd.randbytes(rnd.randrange(1, 1400)))
        elif kind == 1:
            out.append(rnd.randbytes(rnd.randrange(1400, 65507)) if rnd.random() < 0.1 else b"")
        elif kind == 2:
            flipped = bytearray(rnd.choice(valid))
            for _ in range(rnd.randrange(1, 4)):
                flipped[rnd.randrange(len(flipped))] ^= 1 << rnd.randrange(8)
            out.append(bytes(flipped))
        elif kind == 3:
            whole = rnd.choice(valid)
            out.append(whole[: rnd.randrange(len(whole))])
        else:
            out.append(
                bytes((rnd.choice([0, 1, 2, 3, 4, 5, 7, 8, 9, 11, 12]),)) + rnd.randbytes(30)
            )
    return [d for d in out if d or rnd.random() < 0.5]


def streams(rnd: random.Random) -> list[bytes]:
    weird_node = b"\x81\x91\x00\xc0"  # a node entry whose map key is an array
    out = [
        b"",
        b"\x06" + pack({"Join": False, "Nodes": 1, "UserStateLen": 0}) + weird_node,
        b"\x06" + pack({"Join": True, "Nodes": 100000, "UserStateLen": 2**40}),
        b"\x0a\x00\x00\x03\xe8" + rnd.randbytes(20),  # "encrypted", 1000 bytes promised
        b"\xf4\x05label" + rnd.randbytes(40),
        b"\x09" + pack({"Algo": 0, "Buf": rnd.randbytes(200)}),
        b"\x00" + pack({"Node": "fz-a", "SeqNo": 1}),
        b"\x08" + pack({"UserMsgLen": 6}) + b"\x00\x81\x91\x01\x02\x00",
        PushPull(False, [PushNodeState("x", packed(9), 1, b"", 1, NodeState.ALIVE, b"\x01")], b"")
        .encode(),
    ]  # fmt: skip
    while len(out) < 50:
        lead = rnd.choice([b"", b"\x06", b"\x09", b"\x00", b"\x08", b"\x0a", b"\x01", b"\xf4"])
        out.append(lead + rnd.randbytes(rnd.randrange(0, 3000)))
    return out


async def _send_stream(port: int, data: bytes) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 3)
    except (OSError, TimeoutError):
        return
    try:
        writer.write(data)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(reader.read(), 5)
    except OSError:
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _make_runtime(name: str) -> GossipRuntime:
    return GossipRuntime(
        name=name,
        bind_addr="127.0.0.1",
        bind_port=0,
        advertise_addr=None,
        advertise_port=None,
        tags={"role": "fuzz"},
        config=RT_CONFIG,
    )


def _sees_alive(rt: GossipRuntime, names: set[str]) -> bool:
    return names <= {m.name for m in rt.members() if m.status == MemberStatus.ALIVE}


async def _until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.queue.put_nowait(data)


async def _ping(port: int, seq: int) -> bool:
    """Send a UDP ping to 127.0.0.1:port and wait for the matching ack."""
    loop = asyncio.get_running_loop()
    transport, inbox = await loop.create_datagram_endpoint(
        _Inbox, local_addr=("127.0.0.1", 0), family=socket.AF_INET
    )
    try:
        me = transport.get_extra_info("sockname")[1]
        ping = Ping(seq, "fz-a", bytes((127, 0, 0, 1)), me, "prober").encode()
        transport.sendto(ping, ("127.0.0.1", port))
        end = loop.time() + 3.0
        while loop.time() < end:
            try:
                data = await asyncio.wait_for(inbox.queue.get(), end - loop.time())
            except TimeoutError:
                return False
            with contextlib.suppress(packet.PacketError):
                if Ack(seq) in [decode(r) for r in packet.decode_udp(data, None) if r[0] == 2]:
                    return True
        return False
    finally:
        transport.close()


async def _burst_scenario() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    a, b = _make_runtime("fz-a"), _make_runtime("fz-b")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await a.start()
        await b.start()
        rnd = random.Random(20261124)
        for k, d in enumerate(datagrams(rnd)):
            with contextlib.suppress(BlockingIOError):
                sock.sendto(d, ("127.0.0.1", a.bind_port))
            if k % 10 == 0:
                await asyncio.sleep(0.001)  # let the loop drain the socket
        all_streams = streams(rnd)
        for k in range(0, len(all_streams), 10):
            await asyncio.gather(*(_send_stream(a.bind_port, d) for d in all_streams[k : k + 10]))
        await asyncio.sleep(0.2)
        stats = a.stats()
        assert isinstance(stats["packets_dropped"], int) and stats["packets_dropped"] > 50
        assert isinstance(stats["tcp_errors"], int) and stats["tcp_errors"] > 10
        # (mutated copies of valid news may have taught it made-up members: that is gossip)
        assert await b.join([f"127.0.0.1:{a.bind_port}"]) == 1
        for rt in (a, b):
            await _until(partial(_sees_alive, rt, {"fz-a", "fz-b"}), 5.0, f"{rt.name} to see both")
        assert await _ping(a.bind_port, 4242)
        assert not errors, [e.get("message") or repr(e.get("exception")) for e in errors]
    finally:
        sock.close()
        await b.shutdown()
        await a.shutdown()


def _loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_runtime_survives_a_burst_of_junk(loop_kind: str) -> None:
    coro: Coroutine[Any, Any, None] = asyncio.wait_for(_burst_scenario(), 60)
    with asyncio.Runner(loop_factory=_loop_factory(loop_kind)) as runner:
        runner.run(coro)


async def _rearm_scenario() -> None:
    rt = _make_runtime("fz-t")
    await rt.start()
    try:
        core = rt.serf
        assert core is not None
        fired: list[float] = []
        # a core timer already due: the loop is asked to run it "at" a moment in the past
        core.memberlist.schedule(asyncio.get_running_loop().time() - 1.0, fired.append)
        await rt.user_event("one", b"", False)  # arms the due timer
        await rt.user_event("two", b"", False)  # re-arms before the loop got to run it
        await _until(lambda: bool(fired), 2.0, "the due timer to fire")
    finally:
        await rt.shutdown()


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_runtime_rearms_a_timer_that_is_already_due(loop_kind: str) -> None:
    """uvloop's call_at returns a plain Handle (no .when()) for a deadline < 1 ms away."""
    with asyncio.Runner(loop_factory=_loop_factory(loop_kind)) as runner:
        runner.run(asyncio.wait_for(_rearm_scenario(), 10))

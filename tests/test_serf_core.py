"""The Serf layer of the sans-I/O core against serf 0.9.4's rules (reference §11, vectors §13).

Serf objects are driven directly: Serf messages go in through `notify_msg` (or as real UDP
packets), memberlist news as alive/dead packets, and time as explicit `now` values.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import msgpack
import pytest

from gossip import packet
from gossip.broadcast import BroadcastQueue
from gossip.config import GossipConfig
from gossip.keyring import Keyring
from gossip.lamport import LamportClock
from gossip.member import (
    KeyResponse,
    MemberEvent,
    MemberEventType,
    MemberStatus,
    UserEvent,
)
from gossip.messages import Alive, Dead, NodeState, decode, decode_push_pull, pack
from gossip.serf import (
    QUERY_FLAG_ACK,
    QUERY_FLAG_NO_BROADCAST,
    PendingQuery,
    Serf,
    SerfType,
    decode_tags,
    encode_msg,
    encode_tags,
)
from gossip.swim import Address, SendPacket

LAN = GossipConfig.lan()
PORT = 7946
VSN = bytes((1, 5, 2, 2, 5, 5))
K1 = bytes(range(32))
K2 = bytes(range(1, 33))
K3 = bytes(range(2, 18))


def ip(i: int) -> str:
    return f"10.0.0.{i}"


def packed(i: int) -> bytes:
    return bytes((10, 0, 0, i))


def make(
    name: str = "a",
    i: int = 1,
    *,
    tags: dict[str, str] | None = None,
    keyring: Keyring | None = None,
    changed: list[Keyring] | None = None,
) -> Serf:
    s = Serf(
        name=name,
        addr=ip(i),
        port=PORT,
        tags={"role": "web", "dc": "x"} if tags is None else tags,
        config=LAN,
        keyring=keyring,
        rng=random.Random(11),
        keyring_changed=changed.append if changed is not None else None,
    )
    s.start(0.0)
    s.take_effects()
    s.take_events()
    return s


def udp(s: Serf, *msgs: bytes) -> bytes:
    body = msgs[0] if len(msgs) == 1 else packet.make_compound(list(msgs))
    return packet.encode_udp(body, crc=False, compress=False, keyring=s.keyring)


def feed(s: Serf, now: float, *msgs: bytes) -> None:
    s.receive_packet(udp(s, *msgs), ("10.0.9.9", PORT), now)


def alive(name: str, i: int, inc: int = 1, meta: bytes = b"\xff\x80") -> bytes:
    return Alive(inc, name, packed(i), PORT, meta, VSN).encode()


def add_members(s: Serf, names: list[str], now: float = 0.0) -> None:
    for k, name in enumerate(names):
        feed(s, now, alive(name, k + 2))
    s.take_events()


def status(s: Serf, name: str) -> MemberStatus | None:
    ms = s.members_by_name.get(name)
    return ms.member.status if ms else None


def ltime_of(s: Serf, name: str) -> int:
    return s.members_by_name[name].status_ltime


def body(raw: bytes) -> dict[str, Any]:
    """A Serf message body (after its type byte) with str keys."""
    out = msgpack.unpackb(raw[1:], raw=True)
    assert isinstance(out, dict)
    return {k.decode(): v for k, v in out.items()}


def drain(q: BroadcastQueue) -> list[bytes]:
    return q.get(0, 1 << 30, 1)


def join_msg(node: str, ltime: int) -> bytes:
    return encode_msg(SerfType.JOIN, {"LTime": ltime, "Node": node})


def leave_msg(node: str, ltime: int) -> bytes:
    return encode_msg(SerfType.LEAVE, {"LTime": ltime, "Node": node, "Prune": False})


def event_msg(ltime: int, name: str, payload: bytes = b"", cc: bool = False) -> bytes:
    return encode_msg(
        SerfType.USER_EVENT, {"CC": cc, "LTime": ltime, "Name": name, "Payload": payload}
    )


def user_events(s: Serf) -> list[UserEvent]:
    return [e for e in s.take_events() if isinstance(e, UserEvent)]


def member_events(s: Serf) -> list[tuple[MemberEventType, str]]:
    return [(e.type, e.member.name) for e in s.take_events() if isinstance(e, MemberEvent)]


# -- Lamport clocks ----------------------------------------------------------------------------


def test_lamport_clock() -> None:
    c = LamportClock()
    assert c.time() == 0
    assert c.increment() == 1
    c.witness(5)
    assert c.time() == 6
    c.witness(3)  # older: ignored
    assert c.time() == 6
    c.witness(6)  # equal to ours: still moves one past it
    assert c.time() == 7


def test_serf_clocks_start_at_one() -> None:
    s = Serf(name="a", addr=ip(1), port=PORT, tags={}, config=LAN)
    assert (s.clock.time(), s.event_clock.time(), s.query_clock.time()) == (1, 1, 1)


def test_clock_use_by_intents_events_and_queries() -> None:
    s = make()
    add_members(s, ["b"])
    s.joined(1.0)  # join intent at the current time, then witnessed
    (raw,) = drain(s.intent_broadcasts)
    assert raw[0] == SerfType.JOIN and body(raw) == {"LTime": 1, "Node": b"a"}
    assert s.clock.time() == 2 and ltime_of(s, "a") == 1
    s.notify_msg(join_msg("b", 10), 2.0)
    assert s.clock.time() == 11 and drain(s.intent_broadcasts) == [join_msg("b", 10)]
    s.leave(3.0)  # leave intent at the current time, then increment
    (raw,) = drain(s.intent_broadcasts)
    assert body(raw) == {"LTime": 11, "Node": b"a", "Prune": False}
    assert s.clock.time() == 12 and status(s, "a") == MemberStatus.LEAVING
    s.user_event("deploy", b"v1", False, 3.0)  # event clock: current, then increment
    assert body(drain(s.event_broadcasts)[0])["LTime"] == 1 and s.event_clock.time() == 2
    s.query("uptime", b"", 3.0, lambda pq: None)  # query clock: current, witnessed locally
    assert body(drain(s.query_broadcasts)[0])["LTime"] == 1 and s.query_clock.time() == 2


def test_push_pull_witnesses_remote_clocks_minus_one() -> None:
    s = make()
    state = encode_msg(
        SerfType.PUSH_PULL,
        {
            "EventLTime": 30,
            "Events": [],
            "LTime": 20,
            "LeftMembers": [],
            "QueryLTime": 0,
            "StatusLTimes": {},
        },
    )
    s.merge_remote_state(state, False, 1.0)
    assert (s.clock.time(), s.event_clock.time(), s.query_clock.time()) == (20, 30, 1)


def test_maximal_lamport_time_does_not_break_our_own_state() -> None:
    """LTime is a uint64: witnessing 2**64-1 (Go wraps the +1) must leave every later message
    of ours encodable; Python ints would otherwise grow past what msgpack can pack."""
    s = make()
    add_members(s, ["b"])
    s.notify_msg(join_msg("b", 2**64 - 1), 1.0)
    s.notify_msg(event_msg(2**64 - 1, "x"), 1.0)
    assert s.clock.time() <= 2**64 - 1 and s.event_clock.time() <= 2**64 - 1
    s.memberlist.join_state(False).encode()
    s.user_event("y", b"", False, 2.0)


# -- join / leave intents ----------------------------------------------------------------------


def test_an_old_leave_intent_never_overrides_a_newer_join() -> None:
    s = make()
    add_members(s, ["b"])
    s.notify_msg(join_msg("b", 10), 1.0)
    assert ltime_of(s, "b") == 10 and len(drain(s.intent_broadcasts)) == 1  # new: rebroadcast
    for lt in (7, 10):
        s.notify_msg(leave_msg("b", lt), 2.0)
        assert status(s, "b") == MemberStatus.ALIVE and ltime_of(s, "b") == 10
    assert drain(s.intent_broadcasts) == []
    s.notify_msg(leave_msg("b", 11), 3.0)
    assert status(s, "b") == MemberStatus.LEAVING and ltime_of(s, "b") == 11
    assert drain(s.intent_broadcasts) == [leave_msg("b", 11)]  # the original bytes
    s.notify_msg(join_msg("b", 11), 4.0)  # not newer: still leaving
    assert status(s, "b") == MemberStatus.LEAVING
    s.notify_msg(join_msg("b", 12), 5.0)  # a newer join cancels the leave
    assert status(s, "b") == MemberStatus.ALIVE and ltime_of(s, "b") == 12


def test_leave_intent_then_memberlist_death_means_left() -> None:
    s = make()
    add_members(s, ["b", "c"])
    s.notify_msg(leave_msg("b", 5), 1.0)
    feed(s, 2.0, Dead(1, "b", "b").encode(), Dead(1, "c", "x").encode())
    assert status(s, "b") == MemberStatus.LEFT
    assert status(s, "c") == MemberStatus.FAILED
    assert member_events(s) == [(MemberEventType.LEAVE, "b"), (MemberEventType.FAILED, "c")]


def test_leave_intent_for_a_failed_member_forces_left() -> None:
    s = make()
    add_members(s, ["b"])
    feed(s, 1.0, Dead(1, "b", "x").encode())
    assert status(s, "b") == MemberStatus.FAILED
    s.take_events()
    s.notify_msg(leave_msg("b", 3), 2.0)  # serf force-leave
    assert status(s, "b") == MemberStatus.LEFT
    assert member_events(s) == [(MemberEventType.LEAVE, "b")]
    assert drain(s.intent_broadcasts) == [leave_msg("b", 3)]


def test_intents_for_unknown_members_are_buffered_until_they_appear() -> None:
    s = make()
    s.notify_msg(leave_msg("z", 3), 1.0)
    assert drain(s.intent_broadcasts) == [leave_msg("z", 3)]  # new to us: rebroadcast
    s.notify_msg(leave_msg("z", 3), 1.0)
    s.notify_msg(join_msg("z", 2), 1.0)  # older than the buffered one
    assert drain(s.intent_broadcasts) == []
    s.notify_msg(join_msg("z", 5), 1.0)
    s.notify_msg(leave_msg("z", 6), 1.0)
    assert len(drain(s.intent_broadcasts)) == 2
    s.notify_msg(join_msg("y", 9), 1.0)
    assert "z" not in s.members_by_name and "y" not in s.members_by_name
    feed(s, 2.0, alive("z", 5), alive("y", 6))
    assert status(s, "z") == MemberStatus.LEAVING and ltime_of(s, "z") == 6
    assert status(s, "y") == MemberStatus.ALIVE and ltime_of(s, "y") == 9
    s.notify_msg(leave_msg("y", 8), 3.0)
    assert status(s, "y") == MemberStatus.ALIVE
    feed(s, 4.0, Dead(1, "z", "z").encode())
    assert status(s, "z") == MemberStatus.LEFT


def test_buffered_intents_expire_after_five_minutes() -> None:
    s = make()
    s.notify_msg(leave_msg("w", 4), 1.0)
    s.tick(1.0 + 300.0 + LAN.reap_interval + 1.0)
    feed(s, 400.0, alive("w", 7))
    assert status(s, "w") == MemberStatus.ALIVE and ltime_of(s, "w") == 0


def test_a_leave_intent_about_us_is_refuted_with_a_newer_join() -> None:
    s = make()
    add_members(s, ["b"])
    s.notify_msg(leave_msg("a", 50), 1.0)
    assert status(s, "a") == MemberStatus.ALIVE
    queued = [body(r) for r in drain(s.intent_broadcasts)]
    assert queued == [{"LTime": 51, "Node": b"a"}]  # our join, newer than the accusation
    assert ltime_of(s, "a") == 51


# -- user events -------------------------------------------------------------------------------


def test_user_events_dedupe_by_ltime_name_and_payload() -> None:
    s = make()
    raw = event_msg(3, "deploy", b"v1", cc=True)
    s.notify_msg(raw, 1.0)
    assert user_events(s) == [UserEvent(3, "deploy", b"v1", True)]
    assert drain(s.event_broadcasts) == [raw]  # rebroadcast as received
    s.notify_msg(raw, 1.0)
    s.notify_msg(event_msg(3, "deploy", b"v1", cc=False), 1.0)  # CC is not part of the key
    assert user_events(s) == [] and drain(s.event_broadcasts) == []
    s.notify_msg(event_msg(3, "deploy", b"v2"), 1.0)
    s.notify_msg(event_msg(3, "restart", b"v1"), 1.0)
    s.notify_msg(event_msg(4, "deploy", b"v1"), 1.0)
    assert [(e.ltime, e.name, e.payload) for e in user_events(s)] == [
        (3, "deploy", b"v2"),
        (3, "restart", b"v1"),
        (4, "deploy", b"v1"),
    ]
    assert len(drain(s.event_broadcasts)) == 3  # serf's broadcasts never replace each other


def test_user_events_older_than_the_512_slot_window_are_dropped() -> None:
    s = make()
    s.notify_msg(event_msg(10, "early", b"p"), 1.0)
    s.notify_msg(event_msg(999, "late"), 1.0)
    assert s.event_clock.time() == 1000
    user_events(s)
    drain(s.event_broadcasts)
    s.notify_msg(event_msg(487, "old"), 1.0)  # 487 < 1000 - 512
    assert user_events(s) == [] and drain(s.event_broadcasts) == []
    s.notify_msg(event_msg(488, "edge"), 1.0)
    assert [e.name for e in user_events(s)] == ["edge"]
    s.notify_msg(event_msg(10, "early", b"p"), 1.0)  # a replay from before the window
    assert user_events(s) == []


def test_user_event_size_limit() -> None:
    s = make()
    # 31 bytes of encoding around a 1-byte name: 481 payload bytes make exactly 512
    s.user_event("e", b"x" * 481, False, 1.0)
    assert len(drain(s.event_broadcasts)[0]) == 512
    with pytest.raises(ValueError, match="encoded user event"):
        s.user_event("e", b"x" * 482, False, 1.0)
    with pytest.raises(ValueError, match="before encoding"):
        s.user_event("e", b"x" * 512, False, 1.0)
    assert s.event_clock.time() == 2  # failed attempts used no Lamport time
    assert drain(s.event_broadcasts) == []
    with pytest.raises(ValueError, match="query"):
        s.query("q", b"x" * 1100, 1.0, lambda pq: None)


# -- push/pull user state ----------------------------------------------------------------------


def test_push_pull_state_round_trip() -> None:
    a = make("a", 1)
    add_members(a, ["b", "c", "d", "e"])
    a.notify_msg(join_msg("b", 7), 1.0)
    a.notify_msg(leave_msg("c", 8), 1.0)
    a.notify_msg(leave_msg("e", 9), 1.0)
    feed(a, 2.0, Dead(1, "c", "c").encode(), Dead(1, "d", "x").encode())
    a.user_event("deploy", b"v1", False, 2.0)
    a.notify_msg(event_msg(5, "restart", b"x"), 2.0)
    assert {m.name: m.status for m in a.members()} == {
        "a": MemberStatus.ALIVE,
        "b": MemberStatus.ALIVE,
        "c": MemberStatus.LEFT,
        "d": MemberStatus.FAILED,
        "e": MemberStatus.LEAVING,
    }
    z = make("z", 20)
    add_members(z, ["b", "c", "d", "e"])
    wire = decode_push_pull(a.memberlist.join_state(False).encode())
    z.memberlist.merge_push_pull(wire, 3.0)
    assert {m.name: m.status for m in z.members()} == {
        "z": MemberStatus.ALIVE,
        "a": MemberStatus.ALIVE,  # learned from the memberlist part
        "b": MemberStatus.ALIVE,
        "c": MemberStatus.LEFT,  # memberlist left + LeftMembers
        "d": MemberStatus.ALIVE,  # a remote "dead" is only a suspicion here
        "e": MemberStatus.ALIVE,  # leaving is not carried by push/pull (serf does the same)
    }
    assert z.memberlist.nodes["d"].state == NodeState.SUSPECT
    assert (ltime_of(z, "b"), ltime_of(z, "c"), ltime_of(z, "e")) == (7, 9, 9)
    assert z.clock.time() == a.clock.time()
    assert z.event_clock.time() == a.event_clock.time()
    events = z.take_events()
    assert sorted((e.ltime, e.name, e.payload) for e in events if isinstance(e, UserEvent)) == [
        (1, "deploy", b"v1"),
        (5, "restart", b"x"),
    ]
    kinds = [(e.type, e.member.name) for e in events if isinstance(e, MemberEvent)]
    assert kinds == [
        (MemberEventType.JOIN, "a"),
        (MemberEventType.FAILED, "c"),
        (MemberEventType.LEAVE, "c"),
    ]
    # merging the same state again changes nothing and replays no event
    z.memberlist.merge_push_pull(wire, 4.0)
    assert z.take_events() == []
    # and a fresh node buffers the intents of members it has not met yet
    y = make("y", 30)
    y.merge_remote_state(a.local_state(False), False, 5.0)
    assert set(y.recent_intents) == {"a", "b", "c", "d", "e"}
    feed(y, 6.0, alive("c", 3))
    assert status(y, "c") == MemberStatus.LEAVING and ltime_of(y, "c") == 9


@pytest.mark.parametrize("ignore", [True, False])
def test_join_push_pull_may_skip_old_events(ignore: bool) -> None:
    """serf's eventJoinIgnore: a joining node takes the remote EventLTime as its minimum."""
    a = make("a", 1)
    a.user_event("deploy", b"v1", False, 1.0)
    a.notify_msg(event_msg(5, "restart"), 1.0)
    z = make("z", 20)
    z.event_join_ignore = ignore
    z.merge_remote_state(a.local_state(True), True, 2.0)
    replayed = sorted(e.ltime for e in user_events(z))
    assert replayed == ([] if ignore else [1, 5])
    z.notify_msg(event_msg(5, "late"), 3.0)  # older than the remote clock at join time
    z.notify_msg(event_msg(6, "new"), 3.0)
    assert [e.name for e in user_events(z)] == (["new"] if ignore else ["late", "new"])


def test_real_serf_push_pull_is_merged() -> None:
    """The §13 TCP push/pull b->a at join, LZW-compressed as serf sends it."""
    wire = bytes.fromhex(
        "0982a4416c676f00a3427566da00cd000d0c22a5e44d1a37c34a397943a6cc9c00acaacc2923670a9d3074"
        "ca3029e3a69980248748052143460ea93f0000045895c4cd983072dc604cf3c64d00524dca5c54f52f1029"
        "396fd8941145460c292761da94096514ca1b39749a7d5850ca22c63200465999e3c6548002020414006b48"
        "55113b1ce930a1924669005367d3cee1260000b0bb78f3eaddcbb7afdfbf80030b1e4cb8b0e1c388132b5e"
        "ccb8b1e3c790234b9e4cb970a9b56dcbacdc68864ece366228ce81a42a4a1d8a7930bb6565954e9d39aa1d"
        "06620a2020"
    )
    plain = packet.decompress_message(wire)
    assert len(plain) == 689
    remote = decode_push_pull(plain)
    assert remote.join and len(remote.user_state) == 585
    s = Serf(name="a", addr="127.0.0.1", port=7946, tags={"dc": "x", "role": "web"}, config=LAN)
    s.start(0.0)
    reply = s.memberlist.handle_push_pull(remote, 1.0)
    assert s.stats["serf_messages_dropped"] == 0
    b = s.members_by_name["b"].member
    assert (b.status, b.ip, b.port, b.tags) == (
        MemberStatus.ALIVE,
        "127.0.0.1",
        7947,
        {"role": "db"},
    )
    assert (b.protocol_cur, b.delegate_min, b.delegate_max, b.delegate_cur) == (2, 2, 5, 5)
    assert s.recent_intents == {} and ltime_of(s, "b") == 0
    assert [n.name for n in reply.nodes] == ["a"]  # our reply carries what we knew before


# -- tags --------------------------------------------------------------------------------------


def test_tag_encoding_matches_serf() -> None:
    meta = bytes.fromhex("ff82a26463a178a4726f6c65a3776562")
    assert encode_tags({"role": "web", "dc": "x"}) == meta
    assert decode_tags(meta) == {"dc": "x", "role": "web"}
    assert encode_tags({}) == b"\xff\x80"
    assert decode_tags(b"\xff\x80") == {}
    assert decode_tags(b"") == {"role": ""}  # serf's reading of meta without the magic byte
    assert decode_tags(b"db") == {"role": "db"}
    s = make(tags={"role": "web", "dc": "x"})
    assert s.memberlist.nodes["a"].meta == meta


def test_real_alive_capture_gives_member_with_tags() -> None:
    wire = bytes.fromhex(
        "0486a441646472a47f000001ab496e6361726e6174696f6e01a44d657461b0ff82a26463a178a4726f6c65"
        "a3776562a44e6f6465a161a4506f7274cd1f0aa356736ea6010502020505"
    )
    s = make("b", 2)
    s.receive_packet(wire, ("127.0.0.1", 7946), 1.0)
    m = s.members_by_name["a"].member
    assert (m.tags, m.ip, m.port, m.vsn) == ({"dc": "x", "role": "web"}, "127.0.0.1", 7946, VSN)
    assert member_events(s) == [(MemberEventType.JOIN, "a")]


def test_tags_are_limited_to_512_encoded_bytes() -> None:
    ok = {"k": "x" * 505}
    assert len(encode_tags(ok)) == 512
    make(tags=ok)
    with pytest.raises(ValueError, match="512"):
        make(tags={"k": "x" * 506})
    s = make()
    inc = s.memberlist.incarnation
    with pytest.raises(ValueError):
        s.set_tags({"k": "x" * 506}, 1.0)
    assert s.tags == {"role": "web", "dc": "x"} and s.memberlist.incarnation == inc


def test_set_tags_bumps_incarnation_and_announces() -> None:
    s = make()
    inc = s.memberlist.incarnation
    drain(s.memberlist.broadcasts)
    s.set_tags({"role": "db"}, 1.0)
    assert s.memberlist.incarnation == inc + 1
    (raw,) = drain(s.memberlist.broadcasts)
    a = decode(raw)
    assert (
        isinstance(a, Alive) and a.incarnation == inc + 1 and a.meta == encode_tags({"role": "db"})
    )
    assert s.local_member().tags == {"role": "db"}
    assert member_events(s) == [(MemberEventType.UPDATE, "a")]


# -- real serf vectors (§13) -------------------------------------------------------------------

LEAVE_PACKET = bytes.fromhex("0c4798dcf4080083a54c54696d6503a44e6f6465a162a55072756e65c2")
EVENT_PACKET = bytes.fromhex(
    "0cc127d67a080384a24343c3a54c54696d6501a44e616d65a66465706c6f79a75061796c6f6164a568656c6c6f"
)
QUERY_PACKET = bytes.fromhex(
    "0c25ecd0d008048ba441646472a47f000001a746696c74657273c0a5466c61677301a24944ce15b0d82fa54c54"
    "696d6501a44e616d65a6757074696d65a75061796c6f6164a470696e67a4506f7274cd1f0bab52656c6179466163"
    "746f7200aa536f757263654e6f6465a162a754696d656f7574ce77359400"
)
QUERY_ACK = bytes.fromhex(
    "080585a5466c61677301a446726f6da162a24944ce15b0d82fa54c54696d6501a75061796c6f6164c0"
)


def local(name: str, port: int) -> Serf:
    s = Serf(name=name, addr="127.0.0.1", port=port, tags={}, config=LAN, rng=random.Random(1))
    s.start(0.0)
    s.take_effects()
    s.take_events()
    return s


def test_real_leave_intent() -> None:
    s = local("a", 7946)
    b_alive = Alive(1, "b", bytes((127, 0, 0, 1)), 7947, b"\xff\x80", VSN).encode()
    s.receive_packet(b_alive, ("127.0.0.1", 7947), 0.5)
    s.receive_packet(LEAVE_PACKET, ("127.0.0.1", 7947), 1.0)
    assert status(s, "b") == MemberStatus.LEAVING and ltime_of(s, "b") == 3
    assert s.clock.time() == 4
    assert drain(s.intent_broadcasts) == [LEAVE_PACKET[6:]]  # re-gossiped byte for byte
    s.notify_msg(LEAVE_PACKET[6:], 2.0)  # and the same through the delegate hook: seen already
    assert drain(s.intent_broadcasts) == []


@pytest.mark.parametrize("path", ["packet", "notify_msg"])
def test_real_user_event(path: str) -> None:
    s = local("a", 7946)
    if path == "packet":
        s.receive_packet(EVENT_PACKET, ("127.0.0.1", 7947), 1.0)
    else:
        s.notify_msg(EVENT_PACKET[6:], 1.0)
    assert user_events(s) == [UserEvent(1, "deploy", b"hello", True)]
    assert drain(s.event_broadcasts) == [EVENT_PACKET[6:]]


@pytest.mark.parametrize("path", ["packet", "notify_msg"])
def test_real_query_is_acked_byte_for_byte(path: str) -> None:
    """b's own query (uptime, ack wanted) reaching b: the ack equals serf's captured one."""
    s = local("b", 7947)
    if path == "packet":
        s.receive_packet(QUERY_PACKET, ("127.0.0.1", 7947), 1.0)
    else:
        s.notify_msg(QUERY_PACKET[6:], 1.0)
    sent = [e for e in s.take_effects() if isinstance(e, SendPacket)]
    assert sent == [SendPacket(("127.0.0.1", 7947), QUERY_ACK)]
    assert drain(s.query_broadcasts) == [QUERY_PACKET[6:]]
    assert s.query_clock.time() == 2 and s.stats["queries_handled"] == 1
    s.receive_packet(QUERY_PACKET, ("127.0.0.1", 7947), 1.0)  # a duplicate: neither acked nor
    assert s.take_effects() == [] and drain(s.query_broadcasts) == []  # re-gossiped


# -- queries -----------------------------------------------------------------------------------

_qid = iter(range(1000, 100000))


def query_msg(
    ltime: int,
    *,
    filters: list[bytes] | None = None,
    flags: int = QUERY_FLAG_ACK,
    name: str = "q",
    payload: bytes = b"",
    qid: int | None = None,
) -> bytes:
    return encode_msg(
        SerfType.QUERY,
        {
            "Addr": packed(9),
            "Filters": filters,
            "Flags": flags,
            "ID": next(_qid) if qid is None else qid,
            "LTime": ltime,
            "Name": name,
            "Payload": payload,
            "Port": PORT,
            "RelayFactor": 0,
            "SourceNode": "q",
            "Timeout": 2_000_000_000,
        },
    )


def replies(s: Serf) -> list[dict[str, Any]]:
    out = []
    for e in s.take_effects():
        if isinstance(e, SendPacket) and e.dest == (ip(9), PORT):
            (raw,) = packet.decode_udp(e.data, s.keyring)
            assert raw[:2] == bytes((8, SerfType.QUERY_RESPONSE))
            out.append(body(raw[1:]))
    return out


def node_filter(*names: str) -> bytes:
    return b"\x00" + pack(list(names))


def tag_filter(tag: str, expr: str) -> bytes:
    return b"\x01" + pack({"Expr": expr, "Tag": tag})


@pytest.mark.parametrize(
    ("filters", "processed"),
    [
        (None, True),
        ([], True),
        ([node_filter("x", "a")], True),
        ([node_filter("b", "c")], False),
        ([tag_filter("role", "^we")], True),
        ([tag_filter("role", "^db$")], False),
        ([tag_filter("zone", "")], True),  # a missing tag reads as "", which "" matches
        ([tag_filter("zone", ".")], False),
        ([tag_filter("role", "(")], False),  # a bad regexp never matches
        ([b"\x02" + pack(["a"])], False),  # unknown filter type
        ([node_filter("a"), tag_filter("dc", "^x$")], True),
        ([node_filter("a"), tag_filter("dc", "^y$")], False),  # filters are ANDed
    ],
)
def test_query_filters(filters: list[bytes] | None, processed: bool) -> None:
    s = make()
    raw = query_msg(5, filters=filters)
    s.notify_msg(raw, 1.0)
    acks = replies(s)
    assert len(acks) == int(processed)
    if processed:
        assert acks[0]["Flags"] == QUERY_FLAG_ACK and acks[0]["From"] == b"a"
        assert acks[0]["Payload"] is None and acks[0]["LTime"] == 5
    assert s.stats["queries_handled"] == int(processed)
    assert drain(s.query_broadcasts) == [raw]  # rebroadcast whether or not it applied to us


def test_query_dedupe_window_and_no_broadcast_flag() -> None:
    s = make()
    first = query_msg(7, qid=42)
    s.notify_msg(first, 1.0)
    s.notify_msg(first, 1.0)
    assert len(replies(s)) == 1 and drain(s.query_broadcasts) == [first]
    s.notify_msg(query_msg(7, qid=43), 1.0)  # same LTime, other ID: a different query
    assert len(replies(s)) == 1
    drain(s.query_broadcasts)
    quiet = query_msg(8, flags=QUERY_FLAG_ACK | QUERY_FLAG_NO_BROADCAST)
    s.notify_msg(quiet, 1.0)
    assert len(replies(s)) == 1 and drain(s.query_broadcasts) == []
    s.notify_msg(query_msg(1000), 1.0)
    assert s.query_clock.time() == 1001 and len(replies(s)) == 1
    drain(s.query_broadcasts)
    s.notify_msg(query_msg(488), 1.0)  # 488 < 1001 - 512: older than the window
    assert replies(s) == [] and drain(s.query_broadcasts) == []
    s.notify_msg(query_msg(489), 1.0)
    assert len(replies(s)) == 1


def test_query_responses_are_collected_once_per_node() -> None:
    s = make()
    done: list[PendingQuery] = []
    pq = s.query("uptime", b"", 1.0, done.append, timeout=2.0, ack=True)
    acks = replies(s)
    assert acks == []  # our own ack goes to our own address
    for sender, payload in (("b", b"1"), ("b", b"2"), ("c", b"3")):
        s.notify_msg(
            encode_msg(
                SerfType.QUERY_RESPONSE,
                {"Flags": 0, "From": sender, "ID": pq.id, "LTime": pq.ltime, "Payload": payload},
            ),
            1.5,
        )
    s.notify_msg(
        encode_msg(
            SerfType.QUERY_RESPONSE,
            {"Flags": 0, "From": "d", "ID": pq.id + 1, "LTime": pq.ltime, "Payload": b"x"},
        ),
        1.5,
    )
    s.tick(3.0)
    assert done == [pq] and pq.responses == {"b": b"1", "c": b"3"}


# -- key requests ------------------------------------------------------------------------------


def key_query(s: Serf, op: str, payload: bytes) -> dict[str, Any]:
    s.notify_msg(query_msg(5, flags=0, name="_serf_" + op, payload=payload), 1.0)
    (resp,) = replies(s)
    raw = resp["Payload"]
    assert isinstance(raw, bytes) and raw[0] == SerfType.KEY_RESPONSE
    return body(raw)


def key_req(key: bytes) -> bytes:
    return bytes((SerfType.KEY_REQUEST,)) + pack({"Key": key})


def b64(k: bytes) -> bytes:
    return base64.b64encode(k)


def test_key_requests() -> None:
    ring = Keyring([K1])
    changed: list[Keyring] = []
    s = make(keyring=ring, changed=changed)
    r = key_query(s, "install-key", key_req(K2))
    assert r["Result"] is True and ring.keys == [K1, K2] and len(changed) == 1
    r = key_query(s, "use-key", key_req(K2))
    assert r["Result"] is True and ring.primary_key == K2 and len(changed) == 2
    r = key_query(s, "remove-key", key_req(K2))
    assert r["Result"] is False and b"primary" in r["Message"]
    assert ring.keys == [K2, K1] and len(changed) == 2
    r = key_query(s, "list-keys", key_req(b""))
    assert r["Result"] is True
    assert r["Keys"] == [b64(K2), b64(K1)] and r["PrimaryKey"] == b64(K2)
    r = key_query(s, "use-key", key_req(K3))
    assert r["Result"] is False and r["Message"]
    r = key_query(s, "install-key", key_req(b"short"))
    assert r["Result"] is False and r["Message"]
    r = key_query(s, "install-key", b"\x05garbage")
    assert r["Result"] is False and r["Message"]
    r = key_query(s, "remove-key", key_req(K1))
    assert r["Result"] is True and ring.keys == [K2] and len(changed) == 3


def test_key_request_without_encryption_fails_with_a_message() -> None:
    s = make()
    r = key_query(s, "install-key", key_req(K2))
    assert r["Result"] is False and b"encryption" in r["Message"]


def run_key_op(s: Serf, op: str, key: bytes, now: float) -> KeyResponse:
    """The whole cluster-wide path on a single node: query, own response, aggregation."""
    out: list[KeyResponse] = []
    me: Address = (s.memberlist.nodes[s.name].address[0], PORT)
    s.key_query(op, key, now, out.append)
    for e in s.take_effects():
        if isinstance(e, SendPacket) and e.dest == me:
            s.receive_packet(e.data, me, now)
    assert len(out) == 1, "every member answered: done without waiting for the timeout"
    s.tick(now + s.default_query_timeout())
    assert len(out) == 1
    return out[0]


def test_key_query_aggregates_responses() -> None:
    ring = Keyring([K1])
    s = make(keyring=ring)
    r = run_key_op(s, "install-key", K2, 1.0)
    assert (r.num_nodes, r.num_resp, r.num_err) == (1, 1, 0)
    r = run_key_op(s, "list-keys", b"", 10.0)
    assert r.keys == {b64(K1).decode(): 1, b64(K2).decode(): 1}
    assert r.primary_keys == {b64(K1).decode(): 1}
    r = run_key_op(s, "remove-key", K1, 20.0)
    assert (r.num_resp, r.num_err) == (1, 1) and "primary" in r.messages["a"]
    assert ring.keys == [K1, K2]


def test_key_query_survives_a_malformed_response() -> None:
    ring = Keyring([K1])
    s = make(keyring=ring)
    add_members(s, ["evil", "odd"])
    out: list[KeyResponse] = []
    s.key_query("list-keys", b"", 1.0, out.append)
    (pq,) = s.pending_queries.values()
    for sender, fields in (("evil", {"Keys": 5, "Result": True}), ("odd", {"Result": True})):
        assert out == [], "two of three members answered: still waiting"
        s.notify_msg(
            encode_msg(
                SerfType.QUERY_RESPONSE,
                {
                    "Flags": 0,
                    "From": sender,
                    "ID": pq.id,
                    "LTime": pq.ltime,
                    "Payload": bytes((SerfType.KEY_RESPONSE,)) + pack(fields),
                },
            ),
            1.5,
        )
    s.tick(1.0 + s.default_query_timeout())  # we never answered ourselves: the deadline ends it
    (r,) = out
    assert r.num_nodes == 3 and r.num_resp == 2 and r.num_err == 1 and "evil" in r.messages

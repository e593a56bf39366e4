"""Packet and stream wrappers against real serf captures (spec §13), round trips and fuzzing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gossip import lzw, packet
from gossip.keyring import Keyring, parse_key
from gossip.messages import (
    Ack,
    Alive,
    Dead,
    DecodeError,
    ErrResp,
    IndirectPing,
    Nack,
    NodeState,
    Ping,
    PushNodeState,
    PushPull,
    Suspect,
    User,
    decode,
    decode_push_pull,
    pack,
)
from gossip.packet import PacketError

VSN = bytes((1, 5, 2, 2, 5, 5))
LOCAL = bytes((127, 0, 0, 1))
SPEC_KEY = parse_key("sp8tcdgFQ4Ast2YF5wpEsgvPPYidXYfAEaYkJwXSea4=")
K1 = bytes(range(32))
K2 = bytes(range(100, 116))


def h(s: str) -> bytes:
    return bytes.fromhex(s)


# -- real captures (spec §13) ----------------------------------------------------------------

PING = h(
    "0085a44e6f6465a162a55365714e6f01aa536f7572636541646472a47f000001aa536f757263654e6f6465a161"
    "aa536f75726365506f7274cd1f0a"
)
SUSPECT_CRC = h("0c22f867240383a446726f6da161ab496e6361726e6174696f6e01a44e6f6465a162")
DEAD_CRC = h("0cb399b7bd0583a446726f6da161ab496e6361726e6174696f6e01a44e6f6465a162")
NACK = h("0b81a55365714e6f2f")
LEAVE_CRC = h("0c4798dcf4080083a54c54696d6503a44e6f6465a162a55072756e65c2")
EVENT_CRC = h(
    "0cc127d67a080384a24343c3a54c54696d6501a44e616d65a66465706c6f79a75061796c6f6164a568656c6c6f"
)
QUERY_ACK = h("080585a5466c61677301a446726f6da162a24944ce15b0d82fa54c54696d6501a75061796c6f6164c0")
INDIRECT = h(
    "0188a44e61636bc3a44e6f6465a168a4506f7274cd1f12a55365714e6f2faa536f7572636541646472a47f0000"
    "01aa536f757263654e6f6465a161aa536f75726365506f7274cd1f0aa6546172676574a47f000001"
)
COMPRESSED_ACK = h(
    "0982a4416c676f00a3427566da00620005083a05254c1e366fc290d10640500042aa82905153670e9d3665dcd0"
    "5906a0a3c78ea58ac891f346ceb21ff83e763485a44c9a336836fa2087af16a27168e28db252660c268e2a3b02"
    "0d3a5465d18f473d26151a9469d35253cac471f2264040"
)
PUSH_PULL_STREAM = h(
    "0982a4416c676f00a3427566da00cd000d0c22a5e44d1a37c34a397943a6cc9c00acaacc2923670a9d3074ca30"
    "29e3a69980248748052143460ea93f0000045895c4cd983072dc604cf3c64d00524dca5c54f52f1029396fd894"
    "1145460c292761da94096514ca1b39749a7d5850ca22c63200465999e3c6548002020414006b4855113b1ce930"
    "a1924669005367d3cee1260000b0bb78f3eaddcbb7afdfbf80030b1e4cb8b0e1c388132b5eccb8b1e3c790234b"
    "9e4cb970a9b56dcbacdc68864ece366228ce81a42a4a1d8a7930bb6565954e9d39aa1d06620a2020"
)
ENCRYPTED_UDP = h(
    "01189ace2134265039ae0f8c280839d085131aabe5fb45e06e6b3b175d6612ac2b643746dd32c36b024940133e"
    "b764d97bb39d20534119a0bac9315bf248993b509e979d9e2d9de3bab7d68e7e533e4139e4102b42ac482ebda1"
    "e95a464ac9c5f21eacaac0768de2fb74345411608d256c35f678e83e7a9818cd643524a639e9626ad1507b8caa"
    "0e9f0ee97abe93d04d04b8c3486af917c96bcd278fb62f1eaa85b69a7d556398e271879a17365b4aa1ce561685"
    "50"
)
ALIVE_A = Alive(1, "a", LOCAL, 7946, h("ff82a26463a178a4726f6c65a3776562"), VSN)
ALIVE_B = Alive(1, "b", LOCAL, 7947, h("ff81a4726f6c65a26462"), VSN)


def test_real_ping_passes_through() -> None:
    (msg,) = packet.decode_udp(PING, None)
    assert msg == PING
    assert decode(msg) == Ping(1, "b", LOCAL, 7946, "a")


def test_real_crc_vectors() -> None:
    (msg,) = packet.decode_udp(SUSPECT_CRC, None)
    assert decode(msg) == Suspect(incarnation=1, node="b", from_="a")
    (msg,) = packet.decode_udp(DEAD_CRC, None)
    assert decode(msg) == Dead(incarnation=1, node="b", from_="a")
    (msg,) = packet.decode_udp(LEAVE_CRC, None)
    user = decode(msg)
    assert isinstance(user, User)
    assert user.payload[0] == 0  # serf leave intent
    assert msgpack.unpackb(user.payload[1:], raw=True) == {
        b"LTime": 3,
        b"Node": b"b",
        b"Prune": False,
    }
    (msg,) = packet.decode_udp(EVENT_CRC, None)
    user = decode(msg)
    assert isinstance(user, User)
    assert user.payload[0] == 3
    assert msgpack.unpackb(user.payload[1:], raw=True)[b"Payload"] == b"hello"


def test_real_plain_vectors() -> None:
    assert [decode(m) for m in packet.decode_udp(NACK, None)] == [Nack(47)]
    ip = decode(packet.decode_udp(INDIRECT, None)[0])
    assert ip == IndirectPing(47, LOCAL, 7954, "h", True, LOCAL, 7946, "a")
    (msg,) = packet.decode_udp(QUERY_ACK, None)
    assert msg == QUERY_ACK


def test_real_crc_compound_of_two_alives() -> None:
    # The first gossip packet a->b; rebuilt here, and the real CRC proves it byte-identical.
    data = packet.add_crc(packet.make_compound([ALIVE_A.encode(), ALIVE_B.encode()]))
    assert data[:11] == h("0c43972c2c07020049004304")[:11]
    assert len(data) == 151
    assert [decode(m) for m in packet.decode_udp(data, None)] == [ALIVE_A, ALIVE_B]


def test_real_compressed_ack() -> None:
    (msg,) = packet.decode_udp(COMPRESSED_ACK, None)
    assert len(msg) == 150
    ack = decode(msg)
    assert isinstance(ack, Ack)
    assert ack.payload[0] == 1  # serf coordinate
    coord = msgpack.unpackb(ack.payload[1:], raw=True)
    assert coord[b"Vec"] == [0.0] * 8


def test_real_encrypted_packet() -> None:
    ring = Keyring([SPEC_KEY])
    decoded = packet.decode_packet(ENCRYPTED_UDP, ring)
    msgs = [decode(m) for m in decoded.messages]
    assert decoded.truncated == 0
    assert [type(m) for m in msgs] == [Alive, Alive, User]
    first, second, join = msgs
    assert isinstance(first, Alive) and isinstance(second, Alive) and isinstance(join, User)
    assert (first.node, first.port) == ("c", 7948)
    assert (second.node, second.port) == ("d", 7949)
    assert join.payload[0] == 1  # serf join intent
    assert msgpack.unpackb(join.payload[1:], raw=True) == {b"LTime": 1, b"Node": b"d"}
    with pytest.raises(PacketError, match="decrypt"):
        packet.decode_udp(ENCRYPTED_UDP, Keyring([K1]))
    # GossipVerifyIncoming off: what the wrong key cannot open is passed on as plaintext
    # (its first byte happens to be a valid type), and the message decoder then rejects it.
    (raw,) = packet.decode_udp(ENCRYPTED_UDP, Keyring([K1]), verify_incoming=False)
    assert raw == ENCRYPTED_UDP
    with pytest.raises(DecodeError):
        decode(raw)


def feed(data: bytes, *, eof: bool = False) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


async def read(
    data: bytes,
    keyring: Keyring | None = None,
    *,
    limit: int = packet.STREAM_LIMIT,
    verify_incoming: bool = True,
) -> bytes:
    # No EOF: a serf peer keeps the connection open, so the reader must stop by itself.
    coro = packet.read_stream(feed(data), keyring, limit=limit, verify_incoming=verify_incoming)
    return await asyncio.wait_for(coro, 2)


async def test_real_push_pull_stream() -> None:
    reader = feed(PUSH_PULL_STREAM)
    msg = await asyncio.wait_for(packet.read_stream(reader, None), 2)
    assert len(msg) == 689
    pp = decode_push_pull(msg)
    assert pp.join is True
    (node,) = pp.nodes
    assert (node.name, node.addr, node.port, node.state) == ("b", LOCAL, 7947, NodeState.ALIVE)
    assert node.meta == h("ff81a4726f6c65a26462")
    assert len(pp.user_state) == 585
    assert pp.user_state[0] == 0x02


async def test_real_push_pull_stream_leaves_following_bytes_unread() -> None:
    reader = feed(PUSH_PULL_STREAM + b"next")
    await asyncio.wait_for(packet.read_stream(reader, None), 2)
    assert await reader.readexactly(4) == b"next"


# -- UDP round trips -------------------------------------------------------------------------

SAMPLE = [
    Ping(7, "node-b", LOCAL, 7946, "node-a").encode(),
    ALIVE_A.encode(),
    Suspect(3, "x", "y").encode(),
    User(b"\x00" + b"serf bytes" * 30).encode(),
    Ack(9, b"\x01" + bytes(120)).encode(),
    Nack(5).encode(),
]


@pytest.mark.parametrize("crc", [False, True])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("encrypt", [False, True])
def test_udp_round_trip(crc: bool, compress: bool, encrypt: bool) -> None:
    ring = Keyring([K1, K2]) if encrypt else None
    for msgs in (SAMPLE[:1], SAMPLE):
        msg = msgs[0] if len(msgs) == 1 else packet.make_compound(msgs)
        data = packet.encode_udp(msg, crc=crc, compress=compress, keyring=ring)
        assert packet.decode_udp(data, ring) == msgs
        if not encrypt:
            assert (data[0] == 0x0C) == crc


def test_udp_compresses_only_when_smaller() -> None:
    small = SAMPLE[0]
    assert packet.encode_udp(small, crc=False, compress=True, keyring=None) == small
    big = packet.make_compound(SAMPLE)
    data = packet.encode_udp(big, crc=False, compress=True, keyring=None)
    assert data[0] == 0x09
    assert len(data) < len(big)
    assert packet.decompress_message(data) == big


def test_udp_encryption_layout() -> None:
    ring = Keyring([K1])
    data = packet.encode_udp(SAMPLE[0], crc=True, compress=False, keyring=ring)
    assert data[0] == 1  # version byte, no type byte in front
    assert len(data) == len(SAMPLE[0]) + 5 + 29
    assert ring.decrypt(data)[0] == 0x0C  # CRC inside the encryption
    # Old key still accepted after rotation; unknown key refused.
    ring2 = Keyring([K2, K1])
    assert packet.decode_udp(data, ring2) == [SAMPLE[0]]
    with pytest.raises(PacketError):
        packet.decode_udp(data, Keyring([K2]))


def test_verify_incoming_off_accepts_plaintext() -> None:
    ring = Keyring([K1])
    plain = packet.add_crc(SAMPLE[0])
    with pytest.raises(PacketError, match="decrypt"):
        packet.decode_udp(plain, ring)
    assert packet.decode_udp(plain, ring, verify_incoming=False) == [SAMPLE[0]]
    sealed = packet.encode_udp(SAMPLE[1], crc=False, compress=False, keyring=ring)
    assert packet.decode_udp(sealed, ring, verify_incoming=False) == [SAMPLE[1]]


def test_label_is_stripped() -> None:
    label = b"\xf4\x03dc1"
    assert packet.decode_packet(label + SUSPECT_CRC, None).label == b"dc1"
    assert packet.decode_udp(label + SUSPECT_CRC, None) == [SUSPECT_CRC[5:]]
    # memberlist >= 0.3 binds the label into the AAD of an encrypted packet.
    ring = Keyring([K1])
    sealed = ring.encrypt(SAMPLE[0], b"dc1")
    assert packet.decode_udp(label + sealed, ring) == [SAMPLE[0]]
    with pytest.raises(PacketError):
        packet.decode_udp(sealed, ring)
    with pytest.raises(PacketError, match="empty"):
        packet.decode_udp(b"\xf4\x00" + SAMPLE[0], None)
    with pytest.raises(PacketError):
        packet.decode_udp(b"\xf4\x09dc1", None)


def test_nested_wrappers() -> None:
    inner = packet.make_compound([SAMPLE[0], packet.compress_message(SAMPLE[1])])
    outer = packet.add_crc(packet.compress_message(packet.make_compound([inner, SAMPLE[2]])))
    assert packet.decode_udp(outer, None) == [SAMPLE[0], SAMPLE[1], SAMPLE[2]]


def test_nesting_limit() -> None:
    msg = SAMPLE[0]
    for _ in range(packet.MAX_NESTING):
        msg = packet.make_compound([msg])
    assert packet.decode_udp(msg, None) == [SAMPLE[0]]
    with pytest.raises(PacketError, match="nested"):
        packet.decode_udp(packet.compress_message(msg), None)


def test_truncated_compound_parts_are_counted() -> None:
    data = packet.make_compound(SAMPLE[:3])
    cut = data[: len(data) - len(SAMPLE[2]) - 3]  # the third part gone, the second cut short
    decoded = packet.decode_packet(cut, None)
    assert decoded.messages == [SAMPLE[0]]
    assert decoded.truncated == 2
    assert packet.decode_udp(cut, None) == [SAMPLE[0]]
    assert packet.split_compound(data) == (SAMPLE[:3], 0)
    assert packet.split_compound(data + b"junk") == (SAMPLE[:3], 0)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty"),
        (b"\x07", "count"),
        (b"\x07\x02\x00\x01", "length table"),
        (b"\x07\x01\x00\x00", "empty message"),
        (b"\x06\x80", "type 6"),
        (b"\x0a\x00\x00\x00\x01x", "type 10"),
        (b"\x0d\x80", "type 13"),
        (b"\x0c\x00\x00", "type 12"),
        (b"\x0c\x00\x00\x00\x00\x00\x80", "CRC"),
        (packet.add_crc(packet.add_crc(SAMPLE[0])), "type 12"),
        (b"\x09\x82\xa4Algo\x01\xa3Buf\xa0", "algorithm 1"),
        (b"\x09\x82\xa4Algo\x00\xa3Buf\xa0", "truncated"),
        (b"\x09\x81\xa4Algo\xc3", "integer"),
        (b"\x09\x92\x00\x00", "map"),
        (b"\x09\xc1", "msgpack"),
        (b"\x09\x81\xa3Buf\x01", "Buf"),
    ],
)
def test_malformed_packets(data: bytes, match: str) -> None:
    with pytest.raises(PacketError, match=match):
        packet.decode_udp(data, None)


def test_make_compound_limits() -> None:
    with pytest.raises(ValueError):
        packet.make_compound([])
    with pytest.raises(ValueError):
        packet.make_compound([SAMPLE[0]] * 128)
    with pytest.raises(ValueError, match="empty"):
        packet.make_compound([SAMPLE[0], b""])
    with pytest.raises(ValueError, match="65536"):
        packet.make_compound([b"\x08" + bytes(65535)])
    data = packet.make_compound([SAMPLE[5]] * 127)
    assert len(data) == packet.COMPOUND_OVERHEAD + 127 * (
        packet.COMPOUND_PART_OVERHEAD + len(SAMPLE[5])
    )
    assert packet.decode_udp(data, None) == [SAMPLE[5]] * 127


def test_decompression_budget_bounds_forged_packets() -> None:
    bomb = packet.compress_message(b"\x08" + bytes(packet.UDP_DECOMPRESS_LIMIT))
    assert len(bomb) < 3000
    with pytest.raises(PacketError, match="limit"):
        packet.decode_udp(bomb, None)


# -- streams ---------------------------------------------------------------------------------


def push_pull(n_nodes: int = 3, user: bytes = b"\x02serf state") -> PushPull:
    nodes = [
        PushNodeState(f"n{i}", LOCAL, 7946 + i, b"\xff\x80", i, NodeState(i % 4), VSN)
        for i in range(n_nodes)
    ]
    return PushPull(join=True, nodes=nodes, user_state=user)


STREAM_MESSAGES = [
    push_pull().encode(),
    push_pull(0, b"").encode(),
    push_pull(40, bytes(3000)).encode(),
    Ping(1, "b", LOCAL, 7946, "a").encode(),
    Ack(1).encode(),
    ErrResp("boom").encode(),
    b"\x08" + pack({"UserMsgLen": 5}) + b"hello",
    b"\x08" + pack({"UserMsgLen": 0}),
]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("encrypt", [False, True])
@pytest.mark.parametrize("msg", STREAM_MESSAGES, ids=range(len(STREAM_MESSAGES)))
async def test_stream_round_trip(msg: bytes, compress: bool, encrypt: bool) -> None:
    ring = Keyring([K1]) if encrypt else None
    wire = packet.encode_stream(msg, compress=compress, keyring=ring)
    if encrypt:
        assert wire[0] == 0x0A
        assert int.from_bytes(wire[1:5], "big") == len(wire) - 5
    elif compress:
        assert wire[0] == 0x09
    else:
        assert wire == msg
    reader = feed(wire + b"\x00tail")
    assert await asyncio.wait_for(packet.read_stream(reader, ring), 2) == msg
    assert await reader.readexactly(5) == b"\x00tail"


async def test_push_pull_round_trip_decodes() -> None:
    pp = push_pull(5)
    msg = await read(packet.encode_stream(pp.encode(), compress=True, keyring=None))
    assert decode_push_pull(msg) == pp


async def _trickle(
    reader: asyncio.StreamReader, data: bytes, rnd: random.Random, most: int = 7
) -> None:
    pos = 0
    while pos < len(data):
        n = rnd.randint(1, most)
        reader.feed_data(data[pos : pos + n])
        pos += n
        await asyncio.sleep(0)


@pytest.mark.parametrize("compress", [False, True])
async def test_stream_in_small_chunks(compress: bool) -> None:
    msg = push_pull(12, b"\x02" + bytes(range(256)) * 3).encode()
    wire = packet.encode_stream(msg, compress=compress, keyring=None)
    reader = asyncio.StreamReader()
    writer = asyncio.create_task(_trickle(reader, wire + b"after", random.Random(1)))
    got = await asyncio.wait_for(packet.read_stream(reader, None), 5)
    await writer
    assert got == msg
    assert await reader.readexactly(5) == b"after"


async def test_encryption_mismatches() -> None:
    plain = packet.encode_stream(STREAM_MESSAGES[0], compress=True, keyring=None)
    sealed = packet.encode_stream(STREAM_MESSAGES[0], compress=True, keyring=Keyring([K1]))
    with pytest.raises(PacketError, match=r"^remote state is not encrypted$"):
        await read(plain, Keyring([K1]))
    with pytest.raises(
        PacketError, match=r"^remote state is encrypted and encryption is not configured$"
    ):
        await read(sealed, None)
    with pytest.raises(PacketError, match="decrypt"):
        await read(sealed, Keyring([K2]))
    assert await read(sealed, Keyring([K2, K1])) == STREAM_MESSAGES[0]
    assert await read(plain, Keyring([K1]), verify_incoming=False) == STREAM_MESSAGES[0]


async def test_stream_aad_is_the_header() -> None:
    ring = Keyring([K1])
    msg = STREAM_MESSAGES[3]
    blob = ring.encrypt(msg)  # sealed with an empty AAD: must be refused
    wire = b"\x0a" + len(blob).to_bytes(4, "big") + blob
    with pytest.raises(PacketError, match="decrypt"):
        await read(wire, ring)
    good = packet.encode_stream(msg, compress=False, keyring=ring)
    assert ring.decrypt(good[5:], good[:5]) == msg


async def test_stream_label() -> None:
    msg = STREAM_MESSAGES[3]
    assert await read(b"\xf4\x02dc" + msg) == msg
    ring = Keyring([K1])
    header = b"\x0a" + (len(msg) + 29).to_bytes(4, "big")
    labelled = b"\xf4\x02dc" + header + ring.encrypt(msg, header + b"dc")
    assert await read(labelled, ring) == msg
    with pytest.raises(PacketError, match="empty"):
        await read(b"\xf4\x00" + msg)


@pytest.mark.parametrize("cut", [1, 2, 10, 50, -1])
async def test_premature_eof(cut: int) -> None:
    for ring in (None, Keyring([K1])):
        wire = packet.encode_stream(STREAM_MESSAGES[0], compress=False, keyring=ring)
        with pytest.raises(PacketError, match="EOF"):
            await asyncio.wait_for(packet.read_stream(feed(wire[:cut], eof=True), ring), 2)


async def test_stream_limits() -> None:
    msg = push_pull(0, bytes(5000)).encode()
    with pytest.raises(PacketError, match="limit"):
        await read(msg, limit=1000)
    wire = packet.encode_stream(msg, compress=False, keyring=Keyring([K1]))
    with pytest.raises(PacketError, match="limit"):
        await read(wire, Keyring([K1]), limit=1000)
    huge = b"\x0a\x7f\xff\xff\xff"
    with pytest.raises(PacketError, match="limit"):
        await read(huge, Keyring([K1]))
    bomb = packet.compress_message(b"\x08" + pack({"UserMsgLen": 3}) + bytes(200_000))
    with pytest.raises(PacketError, match="limit"):
        await read(bomb, limit=100_000)
    many = b"\x06" + pack({"Join": False, "Nodes": 10**9, "UserStateLen": 0})
    with pytest.raises(PacketError, match="limit"):
        await read(many)
    deep = b"\x00" + b"\xdd\x7f\xff\xff\xff"
    with pytest.raises(PacketError, match="limit"):
        await read(deep)


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"\x07\x01\x00\x01\x00", "type 7"),
        (b"\x0c\x00", "type 12"),
        (b"\x09" + pack({"Algo": 0, "Buf": lzw.compress(b"\x09\x80")}), "nested"),
        (b"\x09" + pack({"Algo": 0, "Buf": lzw.compress(b"\x0a\x00")}), "type 10"),
        (b"\x06\x83\xa4Join\xc2\xa5Nodes\xff\xacUserStateLen\x00", "Nodes"),
        (b"\x06\x81\xa5Nodes\xa1x", "integer"),
        (b"\x06\xc1", "lead byte"),
        (b"\x09\x81\xa4Algo\x07", "algorithm"),
        (b"\x09" + pack({"Algo": 0, "Buf": lzw.compress(b"\x06\x81")}), "truncated"),
    ],
)
async def test_malformed_streams(wire: bytes, match: str) -> None:
    with pytest.raises(PacketError, match=match):
        await read(wire)


# -- properties ------------------------------------------------------------------------------

_FUZZ_RING = Keyring([K1])
_VALID_PACKETS = [
    PING,
    SUSPECT_CRC,
    EVENT_CRC,
    INDIRECT,
    COMPRESSED_ACK,
    packet.add_crc(packet.make_compound([ALIVE_A.encode(), ALIVE_B.encode()])),
    packet.add_crc(packet.compress_message(packet.make_compound(SAMPLE))),
]


def _only_packet_errors(data: bytes, ring: Keyring | None, verify: bool = True) -> None:
    try:
        decoded = packet.decode_packet(data, ring, verify_incoming=verify)
    except PacketError:
        return
    for m in decoded.messages:
        assert m and m[0] in packet.UDP_MESSAGE_TYPES


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_fuzz_random_bytes(data: bytes, keyed: bool) -> None:
    _only_packet_errors(data, _FUZZ_RING if keyed else None, verify=False)
    _only_packet_errors(data, None)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_VALID_PACKETS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            del data[pos]
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(mutated())
def test_fuzz_mutated_packets(data: bytes) -> None:
    _only_packet_errors(data, None)
    _only_packet_errors(data, _FUZZ_RING, verify=False)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.lists(st.sampled_from(SAMPLE), min_size=1, max_size=5),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)
def test_udp_round_trip_property(
    groups: list[list[bytes]], crc: bool, compress: bool, encrypt: bool
) -> None:
    ring = _FUZZ_RING if encrypt else None
    parts = [g[0] if len(g) == 1 else packet.make_compound(g) for g in groups]
    msg = parts[0] if len(parts) == 1 else packet.make_compound(parts)
    data = packet.encode_udp(msg, crc=crc, compress=compress, keyring=ring)
    assert packet.decode_udp(data, ring) == [m for g in groups for m in g]


def run(coro_fn: Callable[[], Awaitable[bytes]]) -> bytes | PacketError:
    async def main() -> bytes | PacketError:
        try:
            return await asyncio.wait_for(coro_fn(), 2)
        except PacketError as e:
            return e

    return asyncio.run(main())


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200), st.booleans())
def test_fuzz_streams(data: bytes, keyed: bool) -> None:
    ring = _FUZZ_RING if keyed else None

    async def go() -> bytes:
        return await packet.read_stream(feed(data, eof=True), ring, verify_incoming=False)

    result = run(go)
    if isinstance(result, bytes):
        assert data.startswith(result) or data[:1] in (b"\x09", b"\xf4")


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, width=32)
    | st.binary(max_size=300)
    | st.text(max_size=40)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20)),
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_msgpack_values, max_size=6), st.binary(max_size=50), st.booleans(), st.booleans())
def test_stream_reads_exactly_one_message(
    values: list[object], user: bytes, bin_type: bool, single_float: bool
) -> None:
    """Any msgpack content, in any encoding, is delimited exactly (checked with a tail)."""
    body = b"".join(
        msgpack.packb(v, use_bin_type=bin_type, use_single_float=single_float) for v in values
    )
    head = pack({"Join": False, "Nodes": len(values), "UserStateLen": len(user)})
    msg = b"\x06" + head + body + user
    rnd = random.Random(len(msg))

    async def go() -> bytes:
        reader = asyncio.StreamReader()
        task = asyncio.create_task(_trickle(reader, msg + b"TAIL", rnd, 64))
        got = await packet.read_stream(reader, None)
        await task
        assert await reader.readexactly(4) == b"TAIL"
        return got

    assert run(go) == msg

"""The wrappers between memberlist messages and the bytes on the wire.

UDP: message -> optional compress (kept only if smaller) -> optional CRC -> optional encryption.
TCP: message -> optional compress (always) -> optional `0a | len | sealed` framing. Receiving
reverses that. Everything that arrives here comes from the network, so every malformed input
is reported as `PacketError` and nothing else: callers drop the packet and move on.

TCP streams have no framing (unless encrypted) and serf never half-closes, so `read_stream`
parses the message as it arrives and reads exactly its bytes: it never waits for EOF, and never
consumes anything past the message.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from gossip import lzw
from gossip.keyring import DecryptError, Keyring, encrypted_length
from gossip.messages import MessageType, pack

__all__ = [
    "COMPOUND_OVERHEAD",
    "COMPOUND_PART_OVERHEAD",
    "CRC_OVERHEAD",
    "MAX_COMPOUND_PARTS",
    "MAX_NESTING",
    "STREAM_LIMIT",
    "UDP_DECOMPRESS_LIMIT",
    "Decoded",
    "PacketError",
    "add_crc",
    "compress_message",
    "decode_packet",
    "decode_udp",
    "decompress_message",
    "encode_stream",
    "encode_udp",
    "make_compound",
    "read_stream",
    "split_compound",
]

COMPOUND_OVERHEAD = 2  # type byte + part count
COMPOUND_PART_OVERHEAD = 2  # uint16 length per part
CRC_OVERHEAD = 5
# memberlist 0.2.2 computes the length table size in uint8 arithmetic: 128+ parts break it.
MAX_COMPOUND_PARTS = 127
MAX_PART_SIZE = 0xFFFF
MAX_NESTING = 4
# Plain UDP messages are at most a datagram (64 KiB); this leaves room for any honest sender
# while bounding the work one forged packet can cause, summed over all its nested wrappers.
UDP_DECOMPRESS_LIMIT = 1024 * 1024
MAX_UDP_MESSAGES = 4096
STREAM_LIMIT = 20 * 1024 * 1024  # memberlist's maxPushStateBytes

UDP_MESSAGE_TYPES = frozenset(
    {
        MessageType.PING,
        MessageType.INDIRECT_PING,
        MessageType.ACK,
        MessageType.SUSPECT,
        MessageType.ALIVE,
        MessageType.DEAD,
        MessageType.USER,
        MessageType.NACK,
    }
)
_LZW_ALGO = 0
_UNBOUNDED = 1 << 64


class PacketError(ValueError):
    """Received bytes that cannot be unwrapped into messages."""


# -- small pieces ----------------------------------------------------------------------------


def make_compound(parts: Sequence[bytes]) -> bytes:
    """Bundle messages into one compound (7) message; each part keeps its own type byte."""
    if not 1 <= len(parts) <= MAX_COMPOUND_PARTS:
        raise ValueError(
            f"a compound message holds 1..{MAX_COMPOUND_PARTS} parts, not {len(parts)}"
        )
    head = bytearray((MessageType.COMPOUND, len(parts)))
    for p in parts:
        if not p:
            raise ValueError("a compound part must not be empty (memberlist 0.2.2 panics on it)")
        if len(p) > MAX_PART_SIZE:
            raise ValueError(f"a compound part must be under 65536 bytes, not {len(p)}")
        head += len(p).to_bytes(2, "big")
    return bytes(head) + b"".join(parts)


def split_compound(data: bytes) -> tuple[list[bytes], int]:
    """Split a compound message (type byte included) into its parts.

    Returns the parts that fit and how many were cut short, as memberlist does. Bytes after the
    last part are ignored.
    """
    if not data or data[0] != MessageType.COMPOUND:
        raise PacketError("not a compound message")
    if len(data) < 2:
        raise PacketError("compound message: missing part count")
    count = data[1]
    pos = 2 + 2 * count
    if len(data) < pos:
        raise PacketError("compound message: truncated length table")
    parts: list[bytes] = []
    for i in range(count):
        size = int.from_bytes(data[2 + 2 * i : 4 + 2 * i], "big")
        if len(data) - pos < size:
            return parts, count - i
        parts.append(bytes(data[pos : pos + size]))
        pos += size
    return parts, 0


def add_crc(msg: bytes) -> bytes:
    return bytes((MessageType.HAS_CRC,)) + zlib.crc32(msg).to_bytes(4, "big") + msg


def compress_message(msg: bytes) -> bytes:
    """The compress (9) wrapper: msgpack {Algo: 0 (LZW), Buf: lzw(msg)}."""
    return bytes((MessageType.COMPRESS,)) + pack({"Algo": _LZW_ALGO, "Buf": lzw.compress(msg)})


def _unpack(data: bytes) -> Any:
    """The first msgpack value in data (trailing bytes ignored, as Go's decoder does)."""
    up = msgpack.Unpacker(raw=True, strict_map_key=False, max_buffer_size=max(len(data), 1))
    try:
        up.feed(data)
        return up.unpack()
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as e:
        raise PacketError(f"bad msgpack value: {e!r}") from e


def _get(body: Any, key: str) -> Any:
    if not isinstance(body, dict):
        raise PacketError("expected a msgpack map")
    raw = key.encode()
    for k, v in body.items():
        if k in (raw, key):
            return v
    return None


def _get_int(body: Any, key: str, hi: int) -> int:
    v = _get(body, key)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int):
        raise PacketError(f"{key}: expected an integer")
    if not 0 <= v <= hi:
        raise PacketError(f"{key}: {v} is out of range")
    return v


def decompress_message(msg: bytes, limit: int = lzw.DEFAULT_LIMIT) -> bytes:
    """Undo `compress_message` (type byte included); the result is the wrapped message."""
    if not msg or msg[0] != MessageType.COMPRESS:
        raise PacketError("not a compress message")
    body = _unpack(msg[1:])
    algo = _get_int(body, "Algo", hi=255)
    if algo != _LZW_ALGO:
        raise PacketError(f"cannot decompress unknown algorithm {algo}")
    buf = _get(body, "Buf")
    if buf is None:
        buf = b""
    if not isinstance(buf, bytes):
        raise PacketError("compress: Buf is not a byte string")
    try:
        return lzw.decompress(buf, limit)
    except lzw.LZWError as e:
        raise PacketError(f"compress: {e}") from e


def _strip_label(data: bytes) -> tuple[bytes, bytes]:
    """Remove a memberlist >= 0.3.0 label header (244), returning (rest, label)."""
    if not data or data[0] != MessageType.HAS_LABEL:
        return data, b""
    if len(data) < 2:
        raise PacketError("label header: missing length")
    size = data[1]
    if size == 0:
        raise PacketError("label header cannot be empty when present")
    if len(data) < 2 + size:
        raise PacketError("label header: truncated label")
    return data[2 + size :], data[2 : 2 + size]


# -- UDP -------------------------------------------------------------------------------------


def encode_udp(msg: bytes, *, crc: bool, compress: bool, keyring: Keyring | None) -> bytes:
    """Wrap one message (possibly a compound) into a datagram, in memberlist's order."""
    if compress:
        packed = compress_message(msg)
        if len(packed) < len(msg):
            msg = packed
    if crc:
        msg = add_crc(msg)
    if keyring is not None:
        msg = keyring.encrypt(msg)  # UDP: no type byte, empty AAD (memberlist 0.2.2)
    return msg


@dataclass(slots=True)
class Decoded:
    """A datagram's plain messages (type byte first, wire order), truncated parts, label."""

    messages: list[bytes] = field(default_factory=list)
    truncated: int = 0
    label: bytes = b""


def decode_packet(data: bytes, keyring: Keyring | None, *, verify_incoming: bool = True) -> Decoded:
    """Unwrap a datagram down to its plain messages.

    A packet is all or nothing: an unknown type or an empty part anywhere rejects the whole
    datagram (memberlist drops only that part, but such packets come only from broken or
    hostile senders). Compound parts cut short are dropped and counted in `truncated`.
    """
    data = bytes(data)
    if not data:
        raise PacketError("empty packet")
    data, label = _strip_label(data)
    if keyring is not None:
        try:
            data = keyring.decrypt(data, label)
        except DecryptError as e:
            if verify_incoming:
                raise PacketError(f"decrypt failed: {e}") from e
            # GossipVerifyIncoming off: a packet we cannot open is taken as plaintext.
    if len(data) >= CRC_OVERHEAD and data[0] == MessageType.HAS_CRC:
        expected = int.from_bytes(data[1:5], "big")
        data = data[5:]
        if zlib.crc32(data) != expected:
            raise PacketError("bad CRC")
    out = Decoded(label=label)
    _unwrap(data, 0, out, [UDP_DECOMPRESS_LIMIT])
    return out


def decode_udp(
    data: bytes, keyring: Keyring | None, *, verify_incoming: bool = True
) -> list[bytes]:
    """`decode_packet` without the truncation count: just the messages."""
    return decode_packet(data, keyring, verify_incoming=verify_incoming).messages


def _unwrap(msg: bytes, depth: int, out: Decoded, budget: list[int]) -> None:
    if not msg:
        raise PacketError("empty message")
    mtype = msg[0]
    if mtype == MessageType.COMPOUND or mtype == MessageType.COMPRESS:
        if depth >= MAX_NESTING:
            raise PacketError(f"wrappers nested deeper than {MAX_NESTING}")
        if mtype == MessageType.COMPOUND:
            parts, truncated = split_compound(msg)
            out.truncated += truncated
            for p in parts:
                _unwrap(p, depth + 1, out, budget)
        else:
            inner = decompress_message(msg, budget[0])
            budget[0] -= len(inner)
            _unwrap(inner, depth + 1, out, budget)
    elif mtype in UDP_MESSAGE_TYPES:
        if len(out.messages) >= MAX_UDP_MESSAGES:
            raise PacketError("too many messages in one packet")
        out.messages.append(msg)
    else:
        raise PacketError(f"unexpected message type {mtype} in a packet")


# -- TCP -------------------------------------------------------------------------------------


def encode_stream(msg: bytes, *, compress: bool, keyring: Keyring | None) -> bytes:
    """Wrap one stream message: compress with no size check, then `0a | len | sealed`."""
    if compress:
        msg = compress_message(msg)
    if keyring is not None:
        header = bytes((MessageType.ENCRYPT,)) + encrypted_length(len(msg)).to_bytes(4, "big")
        return header + keyring.encrypt(msg, header)
    return msg


# How far a msgpack value with lead byte 0xc4..0xdf extends. _FIXED: that many more bytes.
# _SIZED: (w, extra): a w-byte big-endian length, then length + extra bytes.
# _ITEMS: (w, per): a w-byte count, then count * per nested values (arrays 1, maps 2).
_FIXED: dict[int, int] = {
    0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,
}  # fmt: skip
_SIZED: dict[int, tuple[int, int]] = {
    0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0),  # bin
    0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1),  # ext (plus a type byte)
    0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0),  # str
}  # fmt: skip
_ITEMS: dict[int, tuple[int, int]] = {0xDC: (2, 1), 0xDD: (4, 1), 0xDE: (2, 2), 0xDF: (4, 2)}


class _Exact:
    """Reads exactly the bytes of one stream message, in as few reads as is safe.

    Every read asks for what the parse needs now plus a lower bound of what must still follow
    (each pending msgpack value is at least one byte, plus any raw bytes announced by a
    header), so the reader is never asked for a byte beyond the message.
    """

    def __init__(self, reader: asyncio.StreamReader | None, limit: int, data: bytes = b"") -> None:
        self.reader = reader
        self.limit = limit
        self.buf = bytearray(data)
        self.pos = 0

    async def _fill(self, n: int, ahead: int) -> None:
        deficit = self.pos + n - len(self.buf)
        if deficit <= 0:
            return
        if len(self.buf) + deficit > self.limit:
            raise PacketError(f"stream message is larger than the {self.limit}-byte limit")
        if self.reader is None:
            raise PacketError("message truncated")
        want = min(deficit + ahead, self.limit - len(self.buf))
        try:
            self.buf += await self.reader.readexactly(want)
        except asyncio.IncompleteReadError as e:
            raise PacketError("premature EOF in stream message") from e

    async def peek(self) -> int:
        await self._fill(1, 0)
        return self.buf[self.pos]

    async def take(self, n: int, ahead: int = 0) -> bytes:
        await self._fill(n, ahead)
        chunk = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return chunk

    def _check_room(self, pending: int) -> None:
        if self.pos + pending > self.limit:
            if self.reader is None:
                raise PacketError("message truncated")
            raise PacketError(f"stream message is larger than the {self.limit}-byte limit")

    async def skip_values(self, count: int, reserve: int = 0) -> None:
        """Consume `count` msgpack values, knowing that at least `reserve` bytes follow them."""
        pending = count
        self._check_room(pending + reserve)
        buf = self.buf
        while pending:
            pending -= 1
            ahead = pending + reserve
            if self.pos >= len(buf):
                await self._fill(1, ahead)
            b = buf[self.pos]
            self.pos += 1
            if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
                continue
            if b <= 0x8F:
                pending += 2 * (b & 0x0F)
            elif b <= 0x9F:
                pending += b & 0x0F
            elif b <= 0xBF:
                await self._skip(b & 0x1F, ahead)
            elif b in _FIXED:
                await self._skip(_FIXED[b], ahead)
            elif b in _SIZED:
                width, extra = _SIZED[b]
                size = int.from_bytes(await self.take(width, ahead), "big")
                self._check_room(size + extra + ahead)
                await self._skip(size + extra, ahead)
            elif b in _ITEMS:
                width, per = _ITEMS[b]
                pending += per * int.from_bytes(await self.take(width, ahead), "big")
            else:
                raise PacketError(f"invalid msgpack lead byte 0x{b:02x}")
            self._check_room(pending + reserve)

    async def _skip(self, n: int, ahead: int) -> None:
        if self.pos + n > len(self.buf):
            await self._fill(n, ahead)
        self.pos += n

    async def value(self, reserve: int = 0) -> Any:
        start = self.pos
        await self.skip_values(1, reserve)
        return _unpack(bytes(self.buf[start : self.pos]))


async def read_stream(
    reader: asyncio.StreamReader,
    keyring: Keyring | None,
    *,
    limit: int = STREAM_LIMIT,
    verify_incoming: bool = True,
) -> bytes:
    """Read one stream message and return its plaintext, type byte first.

    For push/pull the result is what `messages.decode_push_pull` takes. The caller owns the
    deadline (wrap in `asyncio.wait_for`); connection errors (OSError) pass through.
    """
    rd = _Exact(reader, limit)
    label = b""
    if await rd.peek() == MessageType.HAS_LABEL:
        await rd.take(1)
        size = (await rd.take(1, 1))[0]
        if size == 0:
            raise PacketError("label header cannot be empty when present")
        label = await rd.take(size, 1)
    if await rd.peek() == MessageType.ENCRYPT:
        if keyring is None:
            raise PacketError("remote state is encrypted and encryption is not configured")
        header = await rd.take(5)
        size = int.from_bytes(header[1:], "big")
        if size > limit:
            raise PacketError(f"remote state is larger than the limit ({size} bytes)")
        blob = await rd.take(size)
        try:
            plain = keyring.decrypt(blob, header + label)
        except DecryptError as e:
            raise PacketError(f"cannot decrypt remote state: {e}") from e
        return await _read_message(_Exact(None, len(plain), plain), limit, allow_compress=True)
    if keyring is not None and verify_incoming:
        raise PacketError("remote state is not encrypted")
    return await _read_message(rd, limit, allow_compress=True)


async def _read_message(rd: _Exact, limit: int, *, allow_compress: bool) -> bytes:
    start = rd.pos
    mtype = (await rd.take(1, 1))[0]
    if mtype == MessageType.COMPRESS:
        if not allow_compress:
            raise PacketError("nested compression in a stream")
        body_start = rd.pos
        await rd.skip_values(1)
        wrapped = bytes((mtype,)) + bytes(rd.buf[body_start : rd.pos])
        plain = decompress_message(wrapped, limit)
        return await _read_message(_Exact(None, len(plain), plain), limit, allow_compress=False)
    if mtype == MessageType.PUSH_PULL:
        head = await rd.value()
        # Sizes are checked against the limit as they are consumed, with a clear message.
        nodes = _get_int(head, "Nodes", hi=_UNBOUNDED)
        user_len = _get_int(head, "UserStateLen", hi=_UNBOUNDED)
        await rd.skip_values(nodes, reserve=user_len)
        await rd.take(user_len)
    elif mtype == MessageType.USER:
        head = await rd.value()
        await rd.take(_get_int(head, "UserMsgLen", hi=_UNBOUNDED))
    elif mtype in (MessageType.PING, MessageType.ACK, MessageType.ERR):
        await rd.skip_values(1)
    else:
        raise PacketError(f"unsupported stream message type {mtype}")
    return bytes(rd.buf[start : rd.pos])

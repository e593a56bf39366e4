"""memberlist message bodies and their msgpack encoding.

Encoding follows go-msgpack 0.5.5 as serf 0.9.4 uses it: structs are maps keyed by the Go field
names, written in sorted key order; byte fields are raw strings (``use_bin_type=False``). Decoding
is strict about types so that a malformed packet is rejected here rather than deep in the core.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Self

import msgpack


class MessageType(enum.IntEnum):
    PING = 0
    INDIRECT_PING = 1
    ACK = 2
    SUSPECT = 3
    ALIVE = 4
    DEAD = 5
    PUSH_PULL = 6
    COMPOUND = 7
    USER = 8
    COMPRESS = 9
    ENCRYPT = 10
    NACK = 11
    HAS_CRC = 12
    ERR = 13
    HAS_LABEL = 244


class NodeState(enum.IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class DecodeError(ValueError):
    """A message body that does not match its type's schema."""


MAX_UINT32 = 0xFFFFFFFF
META_MAX_SIZE = 512
VSN_LEN = 6


def pack(obj: Any) -> bytes:
    """Pack the way go-msgpack does: raw strings for bytes, no str8."""
    return msgpack.packb(obj, use_bin_type=False)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    """Unpack one value; any malformed input (including unhashable map keys) is a DecodeError."""
    try:
        return msgpack.unpackb(data, raw=True, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        if isinstance(e, DecodeError):
            raise
        raise DecodeError(f"bad msgpack: {e}") from e


def encode(mtype: MessageType, body: dict[str, Any]) -> bytes:
    return bytes((mtype,)) + pack(dict(sorted(body.items())))


# -- field readers ---------------------------------------------------------------------------


def _fields(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DecodeError("message body is not a map")
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if isinstance(k, bytes):
            try:
                out[k.decode()] = v
            except UnicodeDecodeError as e:
                raise DecodeError("non-UTF-8 map key") from e
        elif isinstance(k, str):
            out[k] = v
    return out


def _str(f: dict[str, Any], key: str, *, max_len: int = 512) -> str:
    v = f.get(key, b"")
    if isinstance(v, str):
        v = v.encode()
    if not isinstance(v, bytes):
        raise DecodeError(f"{key}: expected a string")
    if len(v) > max_len:
        raise DecodeError(f"{key}: too long")
    try:
        return v.decode()
    except UnicodeDecodeError as e:
        raise DecodeError(f"{key}: not UTF-8") from e


def _bytes(f: dict[str, Any], key: str, *, max_len: int = 65536) -> bytes:
    v = f.get(key, b"")
    if v is None:
        return b""
    if isinstance(v, str):
        v = v.encode()
    if isinstance(v, list) and all(isinstance(x, int) and 0 <= x < 256 for x in v):
        v = bytes(v)
    if not isinstance(v, bytes):
        raise DecodeError(f"{key}: expected bytes")
    if len(v) > max_len:
        raise DecodeError(f"{key}: too long")
    return v


def _int(f: dict[str, Any], key: str, *, hi: int = MAX_UINT32, lo: int = 0) -> int:
    v = f.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int):
        raise DecodeError(f"{key}: expected an integer")
    if not lo <= v <= hi:
        raise DecodeError(f"{key}: out of range")
    return v


def _bool(f: dict[str, Any], key: str) -> bool:
    v = f.get(key, False)
    if isinstance(v, bool):
        return v
    if v in (0, 1):
        return bool(v)
    raise DecodeError(f"{key}: expected a bool")


def _addr(f: dict[str, Any], key: str) -> bytes:
    v = _bytes(f, key, max_len=16)
    if len(v) not in (0, 4, 16):
        raise DecodeError(f"{key}: not an IP address")
    return v


def _vsn(f: dict[str, Any]) -> bytes:
    v = _bytes(f, "Vsn", max_len=16)
    if v and len(v) != VSN_LEN:
        raise DecodeError("Vsn: expected 6 bytes")
    return v


# -- messages --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    seq_no: int
    node: str
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""

    def encode(self) -> bytes:
        body: dict[str, Any] = {"Node": self.node, "SeqNo": self.seq_no}
        if self.source_addr:
            body["SourceAddr"] = self.source_addr
        if self.source_node:
            body["SourceNode"] = self.source_node
        if self.source_port:
            body["SourcePort"] = self.source_port
        return encode(MessageType.PING, body)

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> Ping:
        return cls(
            seq_no=_int(f, "SeqNo"),
            node=_str(f, "Node"),
            source_addr=_addr(f, "SourceAddr"),
            source_port=_int(f, "SourcePort", hi=65535),
            source_node=_str(f, "SourceNode"),
        )


@dataclass(frozen=True, slots=True)
class IndirectPing:
    seq_no: int
    target: bytes
    port: int
    node: str
    nack: bool
    source_addr: bytes = b""
    source_port: int = 0
    source_node: str = ""

    def encode(self) -> bytes:
        body: dict[str, Any] = {
            "Nack": self.nack,
            "Node": self.node,
            "Port": self.port,
            "SeqNo": self.seq_no,
            "Target": self.target,
        }
        if self.source_addr:
            body["SourceAddr"] = self.source_addr
        if self.source_node:
            body["SourceNode"] = self.source_node
        if self.source_port:
            body["SourcePort"] = self.source_port
        return encode(MessageType.INDIRECT_PING, body)

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> IndirectPing:
        return cls(
            seq_no=_int(f, "SeqNo"),
            target=_addr(f, "Target"),
            port=_int(f, "Port", hi=65535),
            node=_str(f, "Node"),
            nack=_bool(f, "Nack"),
            source_addr=_addr(f, "SourceAddr"),
            source_port=_int(f, "SourcePort", hi=65535),
            source_node=_str(f, "SourceNode"),
        )


@dataclass(frozen=True, slots=True)
class Ack:
    seq_no: int
    payload: bytes = b""

    def encode(self) -> bytes:
        return encode(MessageType.ACK, {"Payload": self.payload or None, "SeqNo": self.seq_no})

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> Ack:
        return cls(seq_no=_int(f, "SeqNo"), payload=_bytes(f, "Payload"))


@dataclass(frozen=True, slots=True)
class Nack:
    seq_no: int

    def encode(self) -> bytes:
        return encode(MessageType.NACK, {"SeqNo": self.seq_no})

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> Nack:
        return cls(seq_no=_int(f, "SeqNo"))


@dataclass(frozen=True, slots=True)
class _Accusation:
    """suspect and dead share one body: who accuses which node, at which incarnation."""

    incarnation: int
    node: str
    from_: str
    TYPE: ClassVar[MessageType]

    def encode(self) -> bytes:
        return encode(
            self.TYPE, {"From": self.from_, "Incarnation": self.incarnation, "Node": self.node}
        )

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> Self:
        return cls(incarnation=_int(f, "Incarnation"), node=_str(f, "Node"), from_=_str(f, "From"))


class Suspect(_Accusation):
    __slots__ = ()
    TYPE = MessageType.SUSPECT


class Dead(_Accusation):
    """From == Node means a graceful leave."""

    __slots__ = ()
    TYPE = MessageType.DEAD


@dataclass(frozen=True, slots=True)
class Alive:
    incarnation: int
    node: str
    addr: bytes
    port: int
    meta: bytes
    vsn: bytes

    def encode(self) -> bytes:
        return encode(
            MessageType.ALIVE,
            {
                "Addr": self.addr,
                "Incarnation": self.incarnation,
                "Meta": self.meta,
                "Node": self.node,
                "Port": self.port,
                "Vsn": self.vsn,
            },
        )

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> Alive:
        return cls(
            incarnation=_int(f, "Incarnation"),
            node=_str(f, "Node"),
            addr=_addr(f, "Addr"),
            port=_int(f, "Port", hi=65535),
            meta=_bytes(f, "Meta", max_len=META_MAX_SIZE),
            vsn=_vsn(f),
        )


@dataclass(frozen=True, slots=True)
class PushNodeState:
    name: str
    addr: bytes
    port: int
    meta: bytes
    incarnation: int
    state: NodeState
    vsn: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "Addr": self.addr,
            "Incarnation": self.incarnation,
            "Meta": self.meta,
            "Name": self.name,
            "Port": self.port,
            "State": int(self.state),
            "Vsn": self.vsn,
        }

    @classmethod
    def from_fields(cls, f: dict[str, Any]) -> PushNodeState:
        state = _int(f, "State", hi=255)
        if state > NodeState.LEFT:
            raise DecodeError("State: unknown node state")
        return cls(
            name=_str(f, "Name"),
            addr=_addr(f, "Addr"),
            port=_int(f, "Port", hi=65535),
            meta=_bytes(f, "Meta", max_len=META_MAX_SIZE),
            incarnation=_int(f, "Incarnation"),
            state=NodeState(state),
            vsn=_vsn(f),
        )


@dataclass(frozen=True, slots=True)
class ErrResp:
    error: str

    def encode(self) -> bytes:
        return encode(MessageType.ERR, {"Error": self.error})


@dataclass(frozen=True, slots=True)
class User:
    """A delegate (Serf) message: raw bytes after the type byte."""

    payload: bytes

    def encode(self) -> bytes:
        return bytes((MessageType.USER,)) + self.payload


Message = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | User

_DECODERS: dict[int, Any] = {
    MessageType.PING: Ping,
    MessageType.INDIRECT_PING: IndirectPing,
    MessageType.ACK: Ack,
    MessageType.NACK: Nack,
    MessageType.SUSPECT: Suspect,
    MessageType.ALIVE: Alive,
    MessageType.DEAD: Dead,
}


def decode(data: bytes) -> Message:
    """Decode one plain (unwrapped) UDP message.

    Gossip delivers the same bytes many times (every member re-broadcasts news it accepts), and
    messages are immutable, so recent decodes are cached.
    """
    return _decode_cached(bytes(data))


@functools.lru_cache(maxsize=8192)
def _decode_cached(data: bytes) -> Message:
    if not data:
        raise DecodeError("empty message")
    mtype = data[0]
    if mtype == MessageType.USER:
        return User(bytes(data[1:]))
    cls = _DECODERS.get(mtype)
    if cls is None:
        raise DecodeError(f"unexpected message type {mtype}")
    try:
        body = unpack(data[1:])
    except (ValueError, msgpack.UnpackException) as e:
        raise DecodeError(f"bad msgpack body: {e}") from e
    result: Message = cls.from_fields(_fields(body))
    return result


# -- push/pull stream ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushPull:
    join: bool
    nodes: list[PushNodeState]
    user_state: bytes

    def encode(self) -> bytes:
        head = pack(
            {"Join": self.join, "Nodes": len(self.nodes), "UserStateLen": len(self.user_state)}
        )
        parts = [bytes((MessageType.PUSH_PULL,)), head]
        parts.extend(pack(n.to_wire()) for n in self.nodes)
        parts.append(self.user_state)
        return b"".join(parts)


MAX_PUSH_NODES = 100_000


def decode_push_pull(data: bytes) -> PushPull:
    """Decode a complete push/pull message (type byte included)."""
    if not data or data[0] != MessageType.PUSH_PULL:
        raise DecodeError("not a push/pull message")
    up = msgpack.Unpacker(raw=True, strict_map_key=False, max_buffer_size=len(data) + 1)
    up.feed(data[1:])
    try:
        head = _fields(up.unpack())
        count = _int(head, "Nodes", hi=MAX_PUSH_NODES)
        user_len = _int(head, "UserStateLen", hi=len(data))
        join = _bool(head, "Join")
        nodes = [PushNodeState.from_fields(_fields(up.unpack())) for _ in range(count)]
        user_state = bytes(up.read_bytes(user_len))
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.OutOfData) as e:
        if isinstance(e, DecodeError):
            raise
        raise DecodeError(f"bad push/pull stream: {e}") from e
    if len(user_state) != user_len:
        raise DecodeError("push/pull user state truncated")
    return PushPull(join=join, nodes=nodes, user_state=user_state)

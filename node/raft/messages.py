"""Raft's one message type and its msgpack wire form.

Everything here arrives from the network, so `Message.from_wire` validates every field and turns
any malformation into `MessageError`; the core then only has to judge whether a well-formed
message is stale.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import msgpack

from node.raft.types import Entry, EntryType, SnapshotMeta

__all__ = ["Message", "MessageError", "MessageType"]

#: context value of a VOTE that a leadership transfer started: it bypasses the leader lease.
TRANSFER_CONTEXT = b"transfer"


class MessageError(ValueError):
    """A message from the network that does not decode to a sane Message."""


class MessageType(enum.IntEnum):
    APP = 1  # AppendEntries (entries may be empty: a probe)
    APP_RESP = 2
    VOTE = 3
    VOTE_RESP = 4
    PRE_VOTE = 5
    PRE_VOTE_RESP = 6
    HEARTBEAT = 7
    HEARTBEAT_RESP = 8
    SNAP = 9  # InstallSnapshot, the whole snapshot in one message
    TIMEOUT_NOW = 10  # leadership transfer: campaign now, skipping pre-vote
    READ_INDEX = 11  # a follower forwards a read request to the leader
    READ_INDEX_RESP = 12


@dataclass(slots=True)
class Message:
    type: MessageType
    src: str
    dst: str
    term: int = 0
    log_term: int = 0  # APP: term of entry `index`; VOTE: last log term; reject: hint term
    index: int = 0  # APP: index before entries; APP_RESP: last index / rejected index
    entries: list[Entry] = field(default_factory=list)
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: SnapshotMeta | None = None
    snapshot_data: bytes = b""
    context: bytes = b""

    def to_wire(self) -> list[Any]:
        return [
            int(self.type),
            self.src,
            self.dst,
            self.term,
            self.log_term,
            self.index,
            [e.to_wire() for e in self.entries],
            self.commit,
            self.reject,
            self.reject_hint,
            None if self.snapshot is None else self.snapshot.to_wire(),
            self.snapshot_data,
            self.context,
        ]

    @classmethod
    def from_wire(cls, obj: Any) -> Message:
        """Decode and validate; anything unexpected raises MessageError, never anything else."""
        try:
            return _from_wire(obj)
        except MessageError:
            raise
        except Exception as exc:  # any decoding trouble is the sender's fault
            raise MessageError(f"malformed raft message: {exc!r}") from None

    def encode(self) -> bytes:
        data: bytes = msgpack.packb(self.to_wire(), use_bin_type=True)
        return data

    @classmethod
    def decode(cls, data: bytes) -> Message:
        try:
            obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as exc:
            raise MessageError(f"undecodable raft message: {exc!r}") from None
        return cls.from_wire(obj)


def _int(v: Any, what: str) -> int:
    if type(v) is not int or v < 0:
        raise MessageError(f"{what} must be a non-negative integer, got {v!r}")
    return v


def _str(v: Any, what: str) -> str:
    if type(v) is not str or len(v) > 256:
        raise MessageError(f"{what} must be a short string")
    return v


def _bytes(v: Any, what: str) -> bytes:
    if not isinstance(v, bytes | bytearray):
        raise MessageError(f"{what} must be bytes")
    return bytes(v)


def _entry(w: Any) -> Entry:
    if not isinstance(w, list | tuple) or len(w) != 4:
        raise MessageError("entry must be a 4-element list")
    index = _int(w[0], "entry index")
    term = _int(w[1], "entry term")
    typ = _int(w[2], "entry type")
    if typ not in EntryType._value2member_map_:
        raise MessageError(f"unknown entry type {typ}")
    if index == 0 or term == 0:
        raise MessageError("entry index and term start at 1")
    return Entry(index, term, EntryType(typ), _bytes(w[3], "entry data"))


def _from_wire(obj: Any) -> Message:
    if not isinstance(obj, list | tuple) or len(obj) != 13:
        raise MessageError("raft message must be a 13-element list")
    typ = _int(obj[0], "type")
    if typ not in MessageType._value2member_map_:
        raise MessageError(f"unknown message type {typ}")
    src = _str(obj[1], "src")
    dst = _str(obj[2], "dst")
    if not src or not dst:
        raise MessageError("src and dst must be set")
    raw_entries = obj[6]
    if not isinstance(raw_entries, list | tuple):
        raise MessageError("entries must be a list")
    entries = [_entry(w) for w in raw_entries]
    index = _int(obj[5], "index")
    log_term = _int(obj[4], "log_term")
    for i, e in enumerate(entries):
        if e.index != index + 1 + i:
            raise MessageError("entries must follow index contiguously")
        prev = entries[i - 1].term if i else log_term
        if e.term < prev:
            raise MessageError("entry terms must not decrease")
    if type(obj[8]) is not bool:
        raise MessageError("reject must be a boolean")
    snap_w = obj[10]
    snapshot = None if snap_w is None else SnapshotMeta.from_wire(snap_w)
    if snapshot is not None and (snapshot.index < 0 or snapshot.term < 0):
        raise MessageError("snapshot index and term must be non-negative")
    return Message(
        type=MessageType(typ),
        src=src,
        dst=dst,
        term=_int(obj[3], "term"),
        log_term=log_term,
        index=index,
        entries=entries,
        commit=_int(obj[7], "commit"),
        reject=obj[8],
        reject_hint=_int(obj[9], "reject_hint"),
        snapshot=snapshot,
        snapshot_data=_bytes(obj[11], "snapshot_data"),
        context=_bytes(obj[12], "context"),
    )

"""The values Raft's core, its storage and its runtime exchange.

Plain frozen dataclasses with msgpack-friendly `to_wire`/`from_wire`, so the core stays free of
I/O and the storage and transport agree on one encoding.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class EntryType(enum.IntEnum):
    NORMAL = 0  # a command for the state machine
    CONFIG = 1  # data is a Configuration (to_wire, msgpack)
    NOOP = 2  # a new leader's first entry, which commits the entries of earlier terms


@dataclass(frozen=True, slots=True)
class Entry:
    index: int
    term: int
    type: EntryType = EntryType.NORMAL
    data: bytes = b""

    def to_wire(self) -> list[Any]:
        return [self.index, self.term, int(self.type), self.data]

    @classmethod
    def from_wire(cls, w: list[Any]) -> Entry:
        index, term, typ, data = w
        return cls(int(index), int(term), EntryType(int(typ)), bytes(data))


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be on disk before a message that depends on it leaves the node."""

    term: int = 0
    vote: str = ""  # "" = no vote in this term
    commit: int = 0

    def to_wire(self) -> list[Any]:
        return [self.term, self.vote, self.commit]

    @classmethod
    def from_wire(cls, w: list[Any]) -> HardState:
        return cls(int(w[0]), str(w[1]), int(w[2]))


@dataclass(frozen=True, slots=True)
class Server:
    """One member of the Raft configuration, with the fields Consul's
    /v1/operator/raft/configuration shows."""

    id: str  # the agent's node ID (a UUID), stable across renames
    node: str  # the node name
    address: str  # "ip:server-port"
    voter: bool = True

    def to_wire(self) -> list[Any]:
        return [self.id, self.node, self.address, self.voter]

    @classmethod
    def from_wire(cls, w: list[Any]) -> Server:
        return cls(str(w[0]), str(w[1]), str(w[2]), bool(w[3]))


@dataclass(frozen=True, slots=True)
class Configuration:
    """The servers of the cluster: voters decide, learners (voter=False) only replicate."""

    servers: Mapping[str, Server] = field(default_factory=dict)

    @property
    def voters(self) -> frozenset[str]:
        return frozenset(s.id for s in self.servers.values() if s.voter)

    @property
    def learners(self) -> frozenset[str]:
        return frozenset(s.id for s in self.servers.values() if not s.voter)

    def with_server(self, server: Server) -> Configuration:
        return Configuration({**self.servers, server.id: server})

    def without(self, server_id: str) -> Configuration:
        return Configuration({k: v for k, v in self.servers.items() if k != server_id})

    def to_wire(self) -> list[Any]:
        return [s.to_wire() for s in sorted(self.servers.values(), key=lambda s: s.id)]

    @classmethod
    def from_wire(cls, w: list[Any]) -> Configuration:
        servers = [Server.from_wire(x) for x in w]
        return cls({s.id: s for s in servers})


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """Where a snapshot ends in the log and the configuration in force at that point."""

    index: int = 0
    term: int = 0
    config: Configuration = field(default_factory=Configuration)

    def to_wire(self) -> list[Any]:
        return [self.index, self.term, self.config.to_wire()]

    @classmethod
    def from_wire(cls, w: list[Any]) -> SnapshotMeta:
        return cls(int(w[0]), int(w[1]), Configuration.from_wire(w[2]))

"""What the gossip layer reports upwards: members as Serf sees them, and the events it emits."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field


class MemberStatus(enum.IntEnum):
    """Serf's member status; the numbers are what Consul's /v1/agent/members returns."""

    NONE = 0
    ALIVE = 1
    LEAVING = 2
    LEFT = 3
    FAILED = 4

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    addr: bytes
    port: int
    tags: dict[str, str]
    status: MemberStatus
    vsn: bytes = bytes((1, 5, 2, 2, 5, 5))

    @property
    def ip(self) -> str:
        if not self.addr:
            return ""
        return str(ipaddress.ip_address(self.addr))

    @property
    def protocol_min(self) -> int:
        return self.vsn[0] if len(self.vsn) == 6 else 0

    @property
    def protocol_max(self) -> int:
        return self.vsn[1] if len(self.vsn) == 6 else 0

    @property
    def protocol_cur(self) -> int:
        return self.vsn[2] if len(self.vsn) == 6 else 0

    @property
    def delegate_min(self) -> int:
        return self.vsn[3] if len(self.vsn) == 6 else 0

    @property
    def delegate_max(self) -> int:
        return self.vsn[4] if len(self.vsn) == 6 else 0

    @property
    def delegate_cur(self) -> int:
        return self.vsn[5] if len(self.vsn) == 6 else 0


class MemberEventType(enum.Enum):
    JOIN = "member-join"
    LEAVE = "member-leave"
    FAILED = "member-failed"
    UPDATE = "member-update"
    REAP = "member-reap"


@dataclass(frozen=True, slots=True)
class MemberEvent:
    type: MemberEventType
    member: Member


@dataclass(frozen=True, slots=True)
class UserEvent:
    ltime: int
    name: str
    payload: bytes
    coalesce: bool


GossipEvent = MemberEvent | UserEvent


@dataclass(slots=True)
class KeyResponse:
    """Outcome of a cluster-wide keyring query, shaped like `serf keys` output."""

    num_nodes: int = 0
    num_resp: int = 0
    num_err: int = 0
    messages: dict[str, str] = field(default_factory=dict)
    keys: dict[str, int] = field(default_factory=dict)
    primary_keys: dict[str, int] = field(default_factory=dict)

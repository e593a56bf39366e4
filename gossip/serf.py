"""Sans-I/O Serf layer on top of `Memberlist`: tags, intents, user events, queries, keyring.

Serf turns memberlist's alive/dead into the member statuses operators see (alive, leaving, left,
failed), orders join/leave intents with Lamport clocks so a late "left" never overrides a newer
rejoin, and spreads user events and queries through the same gossip. Wire format: a user message
`08 | serf type | msgpack body`, as serf 0.9.4 speaks it.
"""

from __future__ import annotations

import base64
import enum
import functools
import ipaddress
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import structlog

from gossip.broadcast import BroadcastQueue
from gossip.config import GossipConfig, retransmit_limit
from gossip.keyring import Keyring, KeyringError
from gossip.lamport import LamportClock
from gossip.member import (
    GossipEvent,
    KeyResponse,
    Member,
    MemberEvent,
    MemberEventType,
    MemberStatus,
    UserEvent,
)
from gossip.messages import DecodeError, NodeState, _fields, pack, unpack
from gossip.swim import Address, Effect, Memberlist, NodeInfo, StartPushPull

log = structlog.get_logger("gossip.serf")

EVENT_BUFFER = 512
QUERY_BUFFER = 512
USER_EVENT_SIZE_LIMIT = 512
QUERY_SIZE_LIMIT = 1024
QUERY_RESPONSE_SIZE_LIMIT = 1024
QUERY_TIMEOUT_MULT = 16
RECENT_INTENT_TIMEOUT = 300.0
INTERNAL_PREFIX = "_serf_"
TAGS_MAGIC = 0xFF
QUERY_FLAG_ACK = 1
QUERY_FLAG_NO_BROADCAST = 2


class SerfType(enum.IntEnum):
    LEAVE = 0
    JOIN = 1
    PUSH_PULL = 2
    USER_EVENT = 3
    QUERY = 4
    QUERY_RESPONSE = 5
    CONFLICT_RESPONSE = 6
    KEY_REQUEST = 7
    KEY_RESPONSE = 8
    RELAY = 9


def encode_msg(t: SerfType, body: dict[str, Any]) -> bytes:
    return bytes((t,)) + pack(dict(sorted(body.items())))


def encode_tags(tags: dict[str, str]) -> bytes:
    return bytes((TAGS_MAGIC,)) + pack(dict(sorted(tags.items())))


@functools.lru_cache(maxsize=4096)
def decode_tags(meta: bytes) -> dict[str, str]:
    """Tags from memberlist Meta. Cached and shared between members: callers must not mutate."""
    if not meta or meta[0] != TAGS_MAGIC:
        return {"role": meta.decode(errors="replace")}
    try:
        raw = unpack(meta[1:])
    except (ValueError, msgpack.UnpackException):
        return {}
    if not isinstance(raw, dict):
        return {}
    out: dict[str, str] = {}
    for k, v in raw.items():
        if isinstance(k, bytes) and isinstance(v, bytes):
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def _uint(f: dict[str, Any], key: str, hi: int = 2**64 - 1) -> int:
    v = f.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise DecodeError(f"{key}: expected an unsigned integer")
    return v


def _text(f: dict[str, Any], key: str) -> str:
    v = f.get(key, b"")
    if isinstance(v, str):
        return v
    if not isinstance(v, bytes):
        raise DecodeError(f"{key}: expected a string")
    return v.decode(errors="replace")


def _raw(f: dict[str, Any], key: str) -> bytes:
    v = f.get(key)
    if v is None:
        return b""
    if isinstance(v, str):
        return v.encode()
    if not isinstance(v, bytes):
        raise DecodeError(f"{key}: expected bytes")
    return v


@dataclass(slots=True)
class _MemberState:
    member: Member
    status_ltime: int = 0
    leave_time: float = 0.0


@dataclass(slots=True)
class _Intent:
    type: SerfType
    ltime: int
    when: float


@dataclass(slots=True)
class PendingQuery:
    """A query we originated: responses collected until the deadline, then `on_done`.

    With `expect` set, it is done as soon as that many nodes answered (serf's key manager
    does the same: a keyring change need not wait out the timeout once everyone replied).
    """

    id: int
    ltime: int
    deadline: float
    on_done: Callable[[PendingQuery], None]
    expect: int = 0
    acks: set[str] = field(default_factory=set)
    responses: dict[str, bytes] = field(default_factory=dict)
    finished: bool = False


class Serf:
    def __init__(
        self,
        *,
        name: str,
        addr: str,
        port: int,
        tags: dict[str, str],
        config: GossipConfig,
        keyring: Keyring | None = None,
        rng: random.Random | None = None,
        keyring_changed: Callable[[Keyring], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.tags = dict(tags)
        self.keyring = keyring
        self.keyring_changed = keyring_changed
        self.rng = rng or random.Random()
        self.clock = LamportClock()
        self.event_clock = LamportClock()
        self.query_clock = LamportClock()
        for c in (self.clock, self.event_clock, self.query_clock):
            c.increment()
        self.members_by_name: dict[str, _MemberState] = {}
        self.recent_intents: dict[str, _Intent] = {}
        self.event_buffer: list[tuple[int, list[tuple[str, bytes]]] | None] = [None] * EVENT_BUFFER
        self.query_buffer: list[tuple[int, list[int]] | None] = [None] * QUERY_BUFFER
        self.intent_broadcasts = BroadcastQueue()
        self.event_broadcasts = BroadcastQueue()
        self.query_broadcasts = BroadcastQueue()
        self.pending_queries: dict[int, PendingQuery] = {}
        self.leaving = False
        # While set, a join push/pull tells us to ignore events older than the peer's clock:
        # joining a cluster should not replay its history (serf's default, as Consul joins).
        self.event_join_ignore = False
        self.event_min_time = 0
        self.events: list[GossipEvent] = []
        self.stats: dict[str, int] = {"serf_messages_dropped": 0, "queries_handled": 0}
        self.memberlist = Memberlist(
            name=name,
            addr=addr,
            port=port,
            config=config,
            delegate=self,
            keyring=keyring,
            rng=self.rng,
        )
        check = encode_tags(self.tags)
        if len(check) > 512:
            raise ValueError(f"encoded tags are {len(check)} bytes, over the 512-byte limit")

    # -- driving interface --------------------------------------------------------------------

    def start(self, now: float) -> None:
        self.memberlist.start(now)
        self.memberlist.schedule(now + self.config.reap_interval, self._reap_tick)
        self.memberlist.schedule(now + self.config.reconnect_interval, self._reconnect_tick)

    def tick(self, now: float) -> None:
        self.memberlist.tick(now)

    def next_deadline(self) -> float | None:
        return self.memberlist.next_deadline()

    def receive_packet(self, data: bytes, src: Address, now: float) -> None:
        self.memberlist.receive_packet(data, src, now)

    def take_effects(self) -> list[Effect]:
        return self.memberlist.take_effects()

    def take_events(self) -> list[GossipEvent]:
        out, self.events = self.events, []
        return out

    # -- operations ---------------------------------------------------------------------------

    def joined(self, now: float) -> None:
        """After a successful memberlist join: announce ourselves and our join intent."""
        self.memberlist.announce()
        self._broadcast_join(self.clock.time(), now)

    def leave(self, now: float) -> None:
        """Start a graceful leave: the leave intent first, so peers record "left" not "failed"."""
        self.leaving = True
        ltime = self.clock.time()
        self.clock.increment()
        msg = {"LTime": ltime, "Node": self.name, "Prune": False}
        self._handle_leave_intent(msg, now)
        if self.memberlist.num_alive_peers() > 0:
            self.intent_broadcasts.queue(encode_msg(SerfType.LEAVE, msg))

    def leave_intent_pending(self) -> bool:
        return len(self.intent_broadcasts) > 0 and self.memberlist.num_alive_peers() > 0

    def set_tags(self, tags: dict[str, str], now: float) -> None:
        if len(encode_tags(tags)) > 512:
            raise ValueError("encoded tags exceed 512 bytes")
        self.tags = dict(tags)
        self.memberlist.update_meta(now)

    def user_event(self, name: str, payload: bytes, coalesce: bool, now: float) -> None:
        if len(name) + len(payload) > USER_EVENT_SIZE_LIMIT:
            raise ValueError(
                f"user event exceeds the limit of {USER_EVENT_SIZE_LIMIT} bytes before encoding"
            )
        msg = {"CC": coalesce, "LTime": self.event_clock.time(), "Name": name, "Payload": payload}
        raw = encode_msg(SerfType.USER_EVENT, msg)
        if len(raw) > USER_EVENT_SIZE_LIMIT:
            raise ValueError(
                f"encoded user event exceeds the limit of {USER_EVENT_SIZE_LIMIT} bytes"
            )
        self.event_clock.increment()
        self._handle_user_event(msg)
        self.event_broadcasts.queue(raw)

    def default_query_timeout(self) -> float:
        n = self.memberlist.estimated_nodes()
        return self.config.gossip_interval * QUERY_TIMEOUT_MULT * math.ceil(math.log10(n + 1))

    def query(
        self,
        name: str,
        payload: bytes,
        now: float,
        on_done: Callable[[PendingQuery], None],
        *,
        timeout: float | None = None,
        ack: bool = False,
        expect: int = 0,
    ) -> PendingQuery:
        timeout = timeout if timeout is not None else self.default_query_timeout()
        qid = self.rng.getrandbits(31)
        ltime = self.query_clock.time()
        msg = {
            "Addr": self.memberlist.addr,
            "Filters": None,
            "Flags": QUERY_FLAG_ACK if ack else 0,
            "ID": qid,
            "LTime": ltime,
            "Name": name,
            "Payload": payload,
            "Port": self.memberlist.port,
            "RelayFactor": 0,
            "SourceNode": self.name,
            "Timeout": int(timeout * 1e9),
        }
        raw = encode_msg(SerfType.QUERY, msg)
        if len(raw) > QUERY_SIZE_LIMIT:
            raise ValueError(f"query exceeds the limit of {QUERY_SIZE_LIMIT} bytes")
        pq = PendingQuery(qid, ltime, now + timeout, on_done, expect)
        self.pending_queries[ltime] = pq
        self.memberlist.schedule(pq.deadline, lambda t: self._finish_query(pq))
        self._handle_query(msg, now)
        self.query_broadcasts.queue(raw)
        return pq

    def _finish_query(self, pq: PendingQuery) -> None:
        if self.pending_queries.get(pq.ltime) is pq:
            del self.pending_queries[pq.ltime]
        if not pq.finished:
            pq.finished = True
            pq.on_done(pq)

    def key_query(
        self, op: str, key: bytes, now: float, on_done: Callable[[KeyResponse], None]
    ) -> None:
        """Cluster-wide keyring operation, answered like `serf keys`."""
        payload = bytes((SerfType.KEY_REQUEST,)) + pack({"Key": key})
        num_nodes = self.num_alive()

        def done(pq: PendingQuery) -> None:
            resp = KeyResponse(num_nodes=num_nodes)
            for node, raw in pq.responses.items():
                resp.num_resp += 1
                try:
                    if not raw or raw[0] != SerfType.KEY_RESPONSE:
                        raise DecodeError("not a key response")
                    f = _fields(unpack(raw[1:]))
                    if not isinstance(f.get("Keys") or [], list):
                        raise DecodeError("Keys: expected a list")
                except (DecodeError, ValueError, msgpack.UnpackException):
                    resp.num_err += 1
                    resp.messages[node] = "failed to decode key response"
                    continue
                if not f.get("Result"):
                    resp.num_err += 1
                    resp.messages[node] = _text(f, "Message")
                    continue
                msg = _text(f, "Message")
                if msg:
                    resp.messages[node] = msg
                for k in f.get("Keys") or []:
                    ks = k.decode() if isinstance(k, bytes) else str(k)
                    resp.keys[ks] = resp.keys.get(ks, 0) + 1
                pk = _text(f, "PrimaryKey")
                if pk:
                    resp.primary_keys[pk] = resp.primary_keys.get(pk, 0) + 1
            on_done(resp)

        self.query(INTERNAL_PREFIX + op, payload, now, done, expect=num_nodes)

    # -- views --------------------------------------------------------------------------------

    def members(self) -> list[Member]:
        return [m.member for m in self.members_by_name.values()]

    def local_member(self) -> Member:
        ms = self.members_by_name.get(self.name)
        if ms is not None:
            return ms.member
        return Member(
            self.name, self.memberlist.addr, self.memberlist.port, self.tags, MemberStatus.ALIVE
        )

    def num_alive(self) -> int:
        return sum(
            1 for m in self.members_by_name.values() if m.member.status == MemberStatus.ALIVE
        )

    # -- memberlist delegate ------------------------------------------------------------------

    def node_meta(self, limit: int) -> bytes:
        return encode_tags(self.tags)

    def notify_join(self, node: NodeInfo, now: float) -> None:
        ms = self.members_by_name.get(node.name)
        tags = decode_tags(node.meta)
        if ms is None:
            status = MemberStatus.ALIVE
            ms = _MemberState(Member(node.name, node.addr, node.port, tags, status, node.vsn))
            intent = self.recent_intents.pop(node.name, None)
            if intent is not None:
                ms.status_ltime = intent.ltime
                if intent.type == SerfType.LEAVE:
                    ms.member = _with_status(ms.member, MemberStatus.LEAVING)
            self.members_by_name[node.name] = ms
        else:
            ms.member = Member(node.name, node.addr, node.port, tags, MemberStatus.ALIVE, node.vsn)
            ms.leave_time = 0.0
        log.info("gossip.member_joined", node=node.name, addr=f"{ms.member.ip}:{node.port}")
        self.events.append(MemberEvent(MemberEventType.JOIN, ms.member))

    def notify_leave(self, node: NodeInfo, now: float) -> None:
        ms = self.members_by_name.get(node.name)
        if ms is None:
            return
        if ms.member.status == MemberStatus.LEAVING:
            status, etype = MemberStatus.LEFT, MemberEventType.LEAVE
        elif ms.member.status == MemberStatus.ALIVE:
            status, etype = MemberStatus.FAILED, MemberEventType.FAILED
        else:
            return
        ms.member = _with_status(ms.member, status)
        ms.leave_time = now
        log.info(
            "gossip.member_left" if status == MemberStatus.LEFT else "gossip.member_failed",
            node=node.name,
        )
        self.events.append(MemberEvent(etype, ms.member))

    def notify_update(self, node: NodeInfo, now: float) -> None:
        ms = self.members_by_name.get(node.name)
        if ms is None:
            return
        ms.member = Member(
            node.name, node.addr, node.port, decode_tags(node.meta), ms.member.status, node.vsn
        )
        self.events.append(MemberEvent(MemberEventType.UPDATE, ms.member))

    def get_broadcasts(self, overhead: int, limit: int) -> list[bytes]:
        tx = retransmit_limit(self.config.retransmit_mult, self.memberlist.estimated_nodes())
        out: list[bytes] = []
        for q in (self.intent_broadcasts, self.event_broadcasts, self.query_broadcasts):
            used = sum(len(m) + overhead for m in out)
            if limit - used <= overhead:
                break
            out.extend(q.get(overhead, limit - used, tx))
        return out

    def has_broadcasts(self) -> bool:
        return bool(
            len(self.intent_broadcasts) or len(self.event_broadcasts) or len(self.query_broadcasts)
        )

    def local_state(self, join: bool) -> bytes:
        events = [
            {"Events": [{"Name": n, "Payload": p} for n, p in evs], "LTime": lt}
            for slot in self.event_buffer
            if slot is not None
            for lt, evs in (slot,)
        ]
        body = {
            "EventLTime": self.event_clock.time(),
            "Events": events,
            "LTime": self.clock.time(),
            "LeftMembers": [
                n for n, m in self.members_by_name.items() if m.member.status == MemberStatus.LEFT
            ],
            "QueryLTime": self.query_clock.time(),
            "StatusLTimes": {n: m.status_ltime for n, m in self.members_by_name.items()},
        }
        return encode_msg(SerfType.PUSH_PULL, body)

    def merge_remote_state(self, buf: bytes, join: bool, now: float) -> None:
        if not buf or buf[0] != SerfType.PUSH_PULL:
            self.stats["serf_messages_dropped"] += 1
            return
        try:
            f = _fields(unpack(buf[1:]))
            ltime = _uint(f, "LTime")
            event_ltime = _uint(f, "EventLTime")
            query_ltime = _uint(f, "QueryLTime")
            status = f.get("StatusLTimes") or {}
            left = f.get("LeftMembers") or []
            events = f.get("Events") or []
            if not isinstance(status, dict) or not isinstance(left, list):
                raise DecodeError("bad push/pull state")
            if not isinstance(events, list):
                raise DecodeError("bad push/pull events")
        except (DecodeError, ValueError, msgpack.UnpackException):
            self.stats["serf_messages_dropped"] += 1
            return
        if ltime > 0:
            self.clock.witness(ltime - 1)
        if event_ltime > 0:
            self.event_clock.witness(event_ltime - 1)
        if query_ltime > 0:
            self.query_clock.witness(query_ltime - 1)
        if join and self.event_join_ignore:
            self.event_min_time = max(self.event_min_time, event_ltime)
        times: dict[str, int] = {}
        for k, v in status.items():
            if isinstance(k, bytes) and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                times[k.decode(errors="replace")] = v
        left_names = {x.decode(errors="replace") for x in left if isinstance(x, bytes)}
        for name in left_names:
            self._handle_leave_intent(
                {
                    "LTime": (times.get(name, 0) + 1) & 0xFFFFFFFFFFFFFFFF,
                    "Node": name,
                    "Prune": False,
                },
                now,
            )
        for name, lt in times.items():
            if name not in left_names:
                self._handle_join_intent({"LTime": lt, "Node": name}, now)
        for slot in events:
            if not isinstance(slot, dict):
                continue
            try:
                sf = _fields(slot)
                slot_ltime = _uint(sf, "LTime")
                slot_events = sf.get("Events") or []
                if not isinstance(slot_events, list):
                    raise DecodeError("Events: expected a list")
                for e in slot_events:
                    ef = _fields(e)
                    self._handle_user_event(
                        {
                            "LTime": slot_ltime,
                            "Name": _text(ef, "Name"),
                            "Payload": _raw(ef, "Payload"),
                            "CC": False,
                        }
                    )
            except DecodeError:
                self.stats["serf_messages_dropped"] += 1

    def notify_msg(self, msg: bytes, now: float) -> None:
        try:
            t = SerfType(msg[0])
            body = _fields(unpack(msg[1:])) if t != SerfType.RELAY else {}
        except (ValueError, DecodeError, msgpack.UnpackException):
            self.stats["serf_messages_dropped"] += 1
            return
        try:
            rebroadcast = False
            queue = self.intent_broadcasts
            if t == SerfType.LEAVE:
                rebroadcast = self._handle_leave_intent(body, now)
            elif t == SerfType.JOIN:
                rebroadcast = self._handle_join_intent(body, now)
            elif t == SerfType.USER_EVENT:
                rebroadcast = self._handle_user_event(body)
                queue = self.event_broadcasts
            elif t == SerfType.QUERY:
                rebroadcast = self._handle_query(body, now)
                queue = self.query_broadcasts
            elif t == SerfType.QUERY_RESPONSE:
                self._handle_query_response(body)
            elif t == SerfType.RELAY:
                self._handle_relay(msg[1:])
            else:
                self.stats["serf_messages_dropped"] += 1
        except DecodeError:
            self.stats["serf_messages_dropped"] += 1
            return
        if rebroadcast:
            queue.queue(bytes(msg))

    # -- intents ------------------------------------------------------------------------------

    def _broadcast_join(self, ltime: int, now: float) -> None:
        msg = {"LTime": ltime, "Node": self.name}
        self.clock.witness(ltime)
        self._handle_join_intent(msg, now)
        self.intent_broadcasts.queue(encode_msg(SerfType.JOIN, msg))

    def _handle_join_intent(self, body: dict[str, Any], now: float) -> bool:
        ltime, node = _uint(body, "LTime"), _text(body, "Node")
        self.clock.witness(ltime)
        ms = self.members_by_name.get(node)
        if ms is None:
            return self._upsert_intent(node, SerfType.JOIN, ltime, now)
        if ltime <= ms.status_ltime:
            return False
        ms.status_ltime = ltime
        if ms.member.status == MemberStatus.LEAVING:
            ms.member = _with_status(ms.member, MemberStatus.ALIVE)
        return True

    def _handle_leave_intent(self, body: dict[str, Any], now: float) -> bool:
        ltime, node = _uint(body, "LTime"), _text(body, "Node")
        self.clock.witness(ltime)
        ms = self.members_by_name.get(node)
        if ms is None:
            return self._upsert_intent(node, SerfType.LEAVE, ltime, now)
        if ltime <= ms.status_ltime:
            return False
        if node == self.name and not self.leaving:
            # someone says we left, but we're here: refute with a newer join intent
            self._broadcast_join(self.clock.time(), now)
            return False
        status = ms.member.status
        if status == MemberStatus.ALIVE:
            ms.member = _with_status(ms.member, MemberStatus.LEAVING)
            ms.status_ltime = ltime
            return True
        if status == MemberStatus.FAILED:
            ms.member = _with_status(ms.member, MemberStatus.LEFT)
            ms.status_ltime = ltime
            self.events.append(MemberEvent(MemberEventType.LEAVE, ms.member))
            return True
        return status in (MemberStatus.LEAVING, MemberStatus.LEFT)

    def _upsert_intent(self, node: str, t: SerfType, ltime: int, now: float) -> bool:
        cur = self.recent_intents.get(node)
        if cur is None or ltime > cur.ltime:
            self.recent_intents[node] = _Intent(t, ltime, now)
            return True
        return False

    # -- events -------------------------------------------------------------------------------

    def _handle_user_event(self, body: dict[str, Any]) -> bool:
        ltime = _uint(body, "LTime")
        name = _text(body, "Name")
        payload = _raw(body, "Payload")
        coalesce = bool(body.get("CC", False))
        self.event_clock.witness(ltime)
        if ltime < self.event_min_time:
            return False
        cur = self.event_clock.time()
        if cur > EVENT_BUFFER and ltime < cur - EVENT_BUFFER:
            return False
        idx = ltime % EVENT_BUFFER
        slot = self.event_buffer[idx]
        if slot is not None and slot[0] == ltime:
            if (name, payload) in slot[1]:
                return False
        else:
            slot = (ltime, [])
            self.event_buffer[idx] = slot
        slot[1].append((name, payload))
        log.info("gossip.user_event", name=name, ltime=ltime)
        self.events.append(UserEvent(ltime, name, payload, coalesce))
        return True

    # -- queries ------------------------------------------------------------------------------

    def _handle_query(self, body: dict[str, Any], now: float) -> bool:
        ltime = _uint(body, "LTime")
        qid = _uint(body, "ID", 0xFFFFFFFF)
        self.query_clock.witness(ltime)
        cur = self.query_clock.time()
        if cur > QUERY_BUFFER and ltime < cur - QUERY_BUFFER:
            return False
        idx = ltime % QUERY_BUFFER
        slot = self.query_buffer[idx]
        if slot is not None and slot[0] == ltime:
            if qid in slot[1]:
                return False
        else:
            slot = (ltime, [])
            self.query_buffer[idx] = slot
        slot[1].append(qid)
        flags = _uint(body, "Flags", 0xFFFFFFFF)
        rebroadcast = not flags & QUERY_FLAG_NO_BROADCAST
        if not self._should_process(body.get("Filters")):
            return rebroadcast
        addr = _raw(body, "Addr")
        port = _uint(body, "Port", 65535)
        if len(addr) not in (4, 16) or not port:
            return rebroadcast
        dest = (str(ipaddress.ip_address(addr)), port)
        if flags & QUERY_FLAG_ACK:
            self._respond(dest, ltime, qid, None, ack=True)
        name = _text(body, "Name")
        timeout = _uint(body, "Timeout", 2**63 - 1) / 1e9
        self.stats["queries_handled"] += 1
        if name.startswith(INTERNAL_PREFIX) and timeout > 0:
            resp = self._internal_query(name[len(INTERNAL_PREFIX) :], _raw(body, "Payload"))
            if resp is not None:
                self._respond(dest, ltime, qid, resp, ack=False)
        return rebroadcast

    def _respond(
        self, dest: Address, ltime: int, qid: int, payload: bytes | None, *, ack: bool
    ) -> None:
        msg = {
            "Flags": QUERY_FLAG_ACK if ack else 0,
            "From": self.name,
            "ID": qid,
            "LTime": ltime,
            "Payload": payload,
        }
        raw = encode_msg(SerfType.QUERY_RESPONSE, msg)
        if len(raw) > QUERY_RESPONSE_SIZE_LIMIT:
            log.warning("gossip.query_response_too_large", size=len(raw))
            return
        self.memberlist.send_user(dest, raw)

    def _should_process(self, filters: Any) -> bool:
        if not filters:
            return True
        if not isinstance(filters, list):
            return False
        for f in filters:
            if not isinstance(f, bytes) or not f:
                return False
            try:
                body = unpack(f[1:])
            except (ValueError, msgpack.UnpackException):
                return False
            if f[0] == 0:
                names = (
                    {x.decode(errors="replace") for x in body if isinstance(x, bytes)}
                    if (isinstance(body, list))
                    else set()
                )
                if self.name not in names:
                    return False
            elif f[0] == 1:
                tf = _fields(body)
                expr, tag = _text(tf, "Expr"), _text(tf, "Tag")
                try:
                    if not re.search(expr, self.tags.get(tag, "")):
                        return False
                except re.error:
                    return False
            else:
                return False
        return True

    def _handle_query_response(self, body: dict[str, Any]) -> None:
        ltime = _uint(body, "LTime")
        pq = self.pending_queries.get(ltime)
        if pq is None or pq.finished or pq.id != _uint(body, "ID", 0xFFFFFFFF):
            return
        sender = _text(body, "From")
        if _uint(body, "Flags", 0xFFFFFFFF) & QUERY_FLAG_ACK:
            pq.acks.add(sender)
        elif sender not in pq.responses:
            pq.responses[sender] = _raw(body, "Payload")
            if pq.expect and len(pq.responses) >= pq.expect:
                self._finish_query(pq)

    def _handle_relay(self, data: bytes) -> None:
        """Forward a relayed query response to its destination, unchanged."""
        up = msgpack.Unpacker(raw=True, strict_map_key=False)
        up.feed(data)
        try:
            head = _fields(up.unpack())
            dest = _fields(head.get("DestAddr") or {})
            ip = _raw(dest, "IP")
            port = _uint(dest, "Port", 65535)
        except (ValueError, TypeError, msgpack.UnpackException, msgpack.OutOfData) as e:
            raise DecodeError(str(e)) from e
        inner = data[up.tell() :]
        if len(ip) in (4, 16) and port and inner:
            self.memberlist.send_user((str(ipaddress.ip_address(ip)), port), inner)

    def _internal_query(self, op: str, payload: bytes) -> bytes | None:
        if op == "ping":
            return None
        if op == "conflict":
            ms = self.members_by_name.get(payload.decode(errors="replace"))
            if ms is None:
                return None
            m = ms.member
            body = {
                "Addr": m.addr,
                "DelegateCur": m.delegate_cur,
                "DelegateMax": m.delegate_max,
                "DelegateMin": m.delegate_min,
                "Name": m.name,
                "Port": m.port,
                "ProtocolCur": m.protocol_cur,
                "ProtocolMax": m.protocol_max,
                "ProtocolMin": m.protocol_min,
                "Status": int(m.status),
                "Tags": m.tags,
            }
            return encode_msg(SerfType.CONFLICT_RESPONSE, body)
        if op in ("install-key", "use-key", "remove-key", "list-keys"):
            return self._key_request(op, payload)
        return None

    def _key_request(self, op: str, payload: bytes) -> bytes:
        resp: dict[str, Any] = {"Keys": [], "Message": "", "PrimaryKey": "", "Result": False}
        try:
            if not payload or payload[0] != SerfType.KEY_REQUEST:
                raise KeyringError("malformed key request")
            key = _raw(_fields(unpack(payload[1:])), "Key")
            if self.keyring is None:
                raise KeyringError("Keyring is empty (encryption not enabled)")
            if op == "install-key":
                self.keyring.install(key)
            elif op == "use-key":
                self.keyring.use(key)
            elif op == "remove-key":
                self.keyring.remove(key)
            else:
                resp["Keys"] = [base64.b64encode(k).decode() for k in self.keyring.keys]
                resp["PrimaryKey"] = base64.b64encode(self.keyring.primary_key).decode()
            if op != "list-keys" and self.keyring_changed is not None:
                self.keyring_changed(self.keyring)
            resp["Result"] = True
            log.info("gossip.keyring_" + op.replace("-", "_"))
        except (KeyringError, DecodeError, ValueError, msgpack.UnpackException) as e:
            resp["Message"] = str(e)
        return encode_msg(SerfType.KEY_RESPONSE, resp)

    # -- housekeeping -------------------------------------------------------------------------

    def _reap_tick(self, now: float) -> None:
        self.memberlist.schedule(now + self.config.reap_interval, self._reap_tick)
        for name, ms in list(self.members_by_name.items()):
            st = ms.member.status
            limit = (
                self.config.reconnect_timeout
                if st == MemberStatus.FAILED
                else self.config.tombstone_timeout
                if st == MemberStatus.LEFT
                else None
            )
            if limit is not None and now - ms.leave_time > limit:
                del self.members_by_name[name]
                log.info("gossip.member_reaped", node=name)
                self.events.append(MemberEvent(MemberEventType.REAP, ms.member))
        for name, intent in list(self.recent_intents.items()):
            if now - intent.when > RECENT_INTENT_TIMEOUT:
                del self.recent_intents[name]

    def _reconnect_tick(self, now: float) -> None:
        self.memberlist.schedule(now + self.config.reconnect_interval, self._reconnect_tick)
        failed = [
            m for m in self.members_by_name.values() if m.member.status == MemberStatus.FAILED
        ]
        if not failed or self.leaving:
            return
        alive = max(1, self.num_alive())
        if self.rng.random() > len(failed) / alive:
            return
        target = self.rng.choice(failed).member
        node = self.memberlist.nodes.get(target.name)
        if node is not None and node.state == NodeState.ALIVE:
            return
        log.debug("gossip.reconnect_attempt", node=target.name)
        self.memberlist.add_effect(StartPushPull((target.ip, target.port), join=True))


def _with_status(m: Member, status: MemberStatus) -> Member:
    return Member(m.name, m.addr, m.port, m.tags, status, m.vsn)

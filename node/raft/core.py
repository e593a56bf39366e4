"""The sans-I/O Raft state machine (etcd-raft's design: step/tick in, Ready out).

No sockets, clocks or global randomness: time is `tick()`, the network is `step()`, durability
is the runtime's job between `ready()` and `advance()`. That keeps every behaviour replayable in
the deterministic simulation (tests/sim/raft_network.py), which is where safety is checked.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack
import structlog

from node.raft.messages import TRANSFER_CONTEXT, Message, MessageType
from node.raft.types import Configuration, Entry, EntryType, HardState, SnapshotMeta

__all__ = [
    "ConfigChangeError",
    "NotLeader",
    "ProgressState",
    "ProgressView",
    "ProposalDropped",
    "RaftConfig",
    "RaftError",
    "RaftNode",
    "ReadState",
    "Ready",
    "Role",
    "SoftState",
]

log = structlog.get_logger("raft.core")

MT = MessageType


class RaftError(Exception):
    """Base of the errors the core raises to its caller (never for network input)."""


class NotLeader(RaftError):
    def __init__(self, leader_id: str | None) -> None:
        super().__init__(f"not the leader (leader: {leader_id or 'unknown'})")
        self.leader_id = leader_id


class ProposalDropped(RaftError):
    """The leader is handing leadership over; retry against the next leader."""


class ConfigChangeError(RaftError):
    """The change is not a single-server change, or another one is still in flight."""


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre-candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


class ProgressState(enum.Enum):
    PROBE = "probe"  # one append in flight until the follower answers
    REPLICATE = "replicate"  # pipelined appends, up to max_inflight
    SNAPSHOT = "snapshot"  # an InstallSnapshot is in flight


@dataclass(frozen=True, slots=True)
class RaftConfig:
    heartbeat_ticks: int = 1
    election_ticks: int = 10
    pre_vote: bool = True
    check_quorum: bool = True
    max_entries_per_msg: int = 512
    max_bytes_per_msg: int = 1 << 20
    max_inflight: int = 64
    #: ticks an InstallSnapshot may stay unanswered before the leader probes again
    snapshot_timeout_ticks: int = 20


@dataclass(frozen=True, slots=True)
class SoftState:
    leader_id: str | None
    role: Role
    term: int


@dataclass(frozen=True, slots=True)
class ReadState:
    """Reads with this context are linearizable once the state machine applied `index`."""

    ctx: bytes
    index: int


@dataclass(frozen=True, slots=True)
class ProgressView:
    match: int
    next: int
    state: ProgressState
    last_contact_ticks: int  # ticks since the peer last answered the leader
    voter: bool


@dataclass(slots=True)
class Ready:
    """Work for the runtime: persist, send, apply, serve reads -- in that order -- then advance."""

    soft_state: SoftState | None
    hard_state: HardState | None
    snapshot: tuple[SnapshotMeta, bytes] | None
    entries: list[Entry]
    committed: list[Entry]
    messages: list[Message]
    read_states: list[ReadState]


class _Progress:
    """The leader's view of one follower (etcd's tracker.Progress)."""

    __slots__ = (
        "contact_ticks",
        "inflights",
        "match",
        "next",
        "paused",
        "pending_snapshot",
        "recent_active",
        "sent_commit",
        "snap_elapsed",
        "state",
    )

    def __init__(self, next_index: int) -> None:
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        self.paused = False
        self.inflights: deque[int] = deque()
        self.recent_active = False
        self.contact_ticks = 0
        self.pending_snapshot = 0
        self.snap_elapsed = 0
        self.sent_commit = 0  # highest commit index this follower was told

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            self.next = max(self.match + 1, self.pending_snapshot + 1)
        else:
            self.next = self.match + 1
        self.state = ProgressState.PROBE
        self.paused = False
        self.pending_snapshot = 0
        self.inflights.clear()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next = self.match + 1
        self.paused = False
        self.pending_snapshot = 0
        self.inflights.clear()

    def maybe_update(self, index: int) -> bool:
        updated = False
        if index > self.match:
            self.match = index
            updated = True
            self.paused = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decr_to(self, rejected: int, hint: int) -> bool:
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False  # stale
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False  # stale: not the probe we are waiting for
        self.next = max(min(rejected, hint + 1), self.match + 1)
        self.paused = False
        return True


def decode_config(data: bytes) -> Configuration | None:
    """A CONFIG entry's payload; None for garbage (the entry then changes nothing)."""
    try:
        return Configuration.from_wire(msgpack.unpackb(data, raw=False))
    except Exception:
        return None


def encode_config(config: Configuration) -> bytes:
    data: bytes = msgpack.packb(config.to_wire(), use_bin_type=True)
    return data


def _seq_ctx(seq: int) -> bytes:
    return seq.to_bytes(8, "big")


class RaftNode:
    """One Raft server. Single-threaded; every call is cheap and never blocks."""

    def __init__(
        self,
        id: str,
        config: RaftConfig,
        *,
        hard_state: HardState,
        snapshot: SnapshotMeta,
        entries: list[Entry],
        rng: random.Random,
        applied: int | None = None,
        snapshot_data: bytes | None = None,
    ) -> None:
        if entries and entries[0].index != snapshot.index + 1:
            raise ValueError("entries must start right after the snapshot")
        self.id = id
        self.cfg = config
        self._rng = rng
        self.term = hard_state.term
        self.vote = hard_state.vote
        self._snap = snapshot
        # None: bytes unknown (the runtime did not hand them over); followers that need a
        # snapshot then wait until the application compacts again.
        self._snap_data = snapshot_data
        self._ents: list[Entry] = list(entries)
        self._conf_entries: list[tuple[int, Configuration]] = []
        for e in self._ents:
            if e.type is EntryType.CONFIG:
                c = decode_config(e.data)
                if c is not None:
                    self._conf_entries.append((e.index, c))
        self._config = self._conf_entries[-1][1] if self._conf_entries else snapshot.config
        self._voters = self._config.voters
        self.commit_index = min(max(hard_state.commit, snapshot.index), self.last_index)
        self.applied = snapshot.index if applied is None else max(applied, snapshot.index)
        self._applying = self.applied
        self._unstable = self.last_index + 1
        self.role = Role.FOLLOWER
        self.leader_id: str | None = None
        self.lead_transferee: str | None = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._timeout = 0
        self._votes: dict[str, bool] = {}
        self._prs: dict[str, _Progress] = {}
        self._term_start = 0  # index of this leader's NOOP
        self._bcast_pending = False
        # ReadIndex: requests waiting for this term's NOOP, then ones waiting for a quorum ack.
        self._reads_before_commit: list[tuple[bytes, str]] = []
        self._read_seq = 0
        self._read_reqs: deque[tuple[int, int, bytes, str]] = deque()
        self._read_acks: dict[str, int] = {}
        # reads arrived since the last heartbeat: one round (sent at the next ready) serves all
        self._read_round_pending = False
        self._msgs: list[Message] = []
        self._read_states: list[ReadState] = []
        self._pending_snapshot: tuple[SnapshotMeta, bytes] | None = None
        self._prev_hs = HardState(self.term, self.vote, self.commit_index)
        self._prev_ss = SoftState(None, Role.FOLLOWER, self.term)
        self._outstanding = False
        self._reset_timeout()

    # ---------------------------------------------------------------- views

    @property
    def first_index(self) -> int:
        return self._snap.index + 1

    @property
    def last_index(self) -> int:
        return self._snap.index + len(self._ents)

    @property
    def last_term(self) -> int:
        return self._ents[-1].term if self._ents else self._snap.term

    @property
    def configuration(self) -> Configuration:
        return self._config

    @property
    def configuration_index(self) -> int:
        """Index of the entry (or snapshot) the current configuration comes from."""
        return self._conf_entries[-1][0] if self._conf_entries else self._snap.index

    @property
    def snapshot(self) -> SnapshotMeta:
        return self._snap

    @property
    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.commit_index)

    @property
    def progress(self) -> Mapping[str, ProgressView]:
        """Leader only (empty otherwise): what autopilot needs to judge server health."""
        return {
            pid: ProgressView(pr.match, pr.next, pr.state, pr.contact_ticks, pid in self._voters)
            for pid, pr in self._prs.items()
        }

    def match_indexes(self) -> dict[str, int]:
        """Leader only (empty otherwise): how far each server's log is known to match ours."""
        return {pid: pr.match for pid, pr in self._prs.items()}

    def term_at(self, index: int) -> int | None:
        """The term of the entry at index; None when compacted away or beyond the log."""
        off = index - self._snap.index
        if off == 0:
            return self._snap.term
        if off < 0 or off > len(self._ents):
            return None
        return self._ents[off - 1].term

    def entry(self, index: int) -> Entry | None:
        off = index - self._snap.index
        if off <= 0 or off > len(self._ents):
            return None
        return self._ents[off - 1]

    def configuration_at(self, index: int) -> Configuration:
        """The configuration in force at index (for the SnapshotMeta of a compaction)."""
        conf = self._snap.config
        for i, c in self._conf_entries:
            if i > index:
                break
            conf = c
        return conf

    def snapshot_meta(self, index: int) -> SnapshotMeta:
        """The SnapshotMeta the application should pass to compact() for a snapshot at index."""
        term = self.term_at(index)
        if term is None:
            raise ValueError(f"index {index} is not in the log")
        return SnapshotMeta(index, term, self.configuration_at(index))

    # ---------------------------------------------------------------- inputs

    def bootstrap(self, config: Configuration) -> None:
        if self.term != 0 or self._ents or self._snap.index != 0:
            raise RaftError("bootstrap needs a pristine node")
        if not config.voters:
            raise ConfigChangeError("a bootstrap configuration needs at least one voter")
        self.term = 1
        self._append([Entry(1, 1, EntryType.CONFIG, encode_config(config))])
        # every bootstrap member holds this same entry, so it is committed by construction
        self.commit_index = 1

    def tick(self) -> None:
        if self.role is Role.LEADER:
            self._tick_leader()
            return
        self._election_elapsed += 1
        if self._election_elapsed >= self._timeout and self._promotable():
            self._election_elapsed = 0
            self._campaign(transfer=False)

    def leader_unreachable(self) -> None:
        """The transport saw the leader's port refuse connections: its process is gone.

        Rather than wait out a full election timeout, the follower forgets the leader (which
        also ends its lease, so it grants votes) and campaigns within a few ticks, staggered
        by rank among the other voters so that the survivors do not split the vote. A false
        alarm cannot disrupt a working leader: pre-vote still needs a quorum that has not
        heard from it.
        """
        if self.role is not Role.FOLLOWER or self.leader_id is None:
            return
        others = sorted(v for v in self._voters if v != self.leader_id)
        self.leader_id = None
        if self.id in others:
            rank = others.index(self.id)
            self._election_elapsed = max(self._election_elapsed, self._timeout - 1 - 2 * rank)

    def campaign(self) -> None:
        """Start an election now instead of after a timeout (etcd's MsgHup): a sole voter has
        nobody to wait for."""
        if self.role is not Role.LEADER and self._promotable():
            self._election_elapsed = 0
            self._campaign(transfer=False)

    def propose(self, data: bytes) -> int:
        return self._propose(EntryType.NORMAL, data)

    def change_config(self, new: Configuration) -> int:
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader_id)
        if self._conf_entries and self._conf_entries[-1][0] > self.commit_index:
            raise ConfigChangeError("a configuration change is still uncommitted")
        if self.commit_index < self._term_start:
            raise ConfigChangeError("the leader has not committed an entry in its term yet")
        old = self._config.servers
        changed = {k for k in old.keys() | new.servers.keys() if old.get(k) != new.servers.get(k)}
        if len(changed) != 1:
            raise ConfigChangeError(f"exactly one server must change, not {len(changed)}")
        if not new.voters:
            raise ConfigChangeError("the configuration would have no voters")
        return self._propose(EntryType.CONFIG, encode_config(new))

    def read_index(self, ctx: bytes) -> None:
        if self.role is Role.LEADER:
            self._leader_read(ctx, self.id)
        elif self.leader_id is None:
            raise NotLeader(None)
        else:
            self._send(MT.READ_INDEX, self.leader_id, context=ctx)

    def transfer_leadership(self, target: str) -> None:
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader_id)
        if target == self.id:
            return
        if target not in self._voters or target not in self._prs:
            raise ConfigChangeError(f"{target} is not a voter")
        if self.lead_transferee == target:
            return
        self.lead_transferee = target
        self._election_elapsed = 0  # the transfer must finish within one election timeout
        log.info("raft.transfer_started", node=self.id, term=self.term, target=target)
        pr = self._prs[target]
        if pr.match == self.last_index:
            self._send(MT.TIMEOUT_NOW, target)
        else:
            self._send_append(target, True)

    def compact(self, meta: SnapshotMeta, data: bytes) -> None:
        if meta.index > self.applied:
            raise ValueError(f"snapshot index {meta.index} is beyond applied {self.applied}")
        if meta.index <= self._snap.index:
            return
        if self.term_at(meta.index) != meta.term:
            raise ValueError("snapshot term does not match the log")
        drop = meta.index - self._snap.index
        del self._ents[:drop]
        self._conf_entries = [(i, c) for i, c in self._conf_entries if i > meta.index]
        self._snap = meta
        self._snap_data = data

    def step(self, m: Message) -> None:
        """Handle a message from the network; anything stale or nonsensical is dropped."""
        if m.dst != self.id or m.src == self.id or not m.src:
            return
        if m.entries and (
            m.entries[0].index != m.index + 1 or m.entries[-1].index != m.index + len(m.entries)
        ):
            return
        if m.term > self.term:
            if m.type is MT.VOTE or m.type is MT.PRE_VOTE:
                force = m.context == TRANSFER_CONTEXT
                in_lease = (
                    self.cfg.check_quorum
                    and self.leader_id is not None
                    and self._election_elapsed < self.cfg.election_ticks
                )
                if in_lease and not force:
                    return  # the leader lease: we heard from a leader recently
            if m.type is MT.PRE_VOTE or (m.type is MT.PRE_VOTE_RESP and not m.reject):
                pass  # pre-votes never change terms (the granted answer carries term+1)
            elif m.type in (MT.APP, MT.HEARTBEAT, MT.SNAP):
                self._become_follower(m.term, m.src)
            else:
                self._become_follower(m.term, None)
        elif m.term < self.term:
            if m.type in (MT.APP, MT.HEARTBEAT) and (self.cfg.check_quorum or self.cfg.pre_vote):
                # a stale leader (or one cut off and back): tell it our term so it steps down
                self._send(MT.APP_RESP, m.src)
            elif m.type is MT.PRE_VOTE:
                self._send(MT.PRE_VOTE_RESP, m.src, reject=True)
            return
        if m.type is MT.VOTE or m.type is MT.PRE_VOTE:
            self._handle_vote(m)
        elif self.role is Role.LEADER:
            self._step_leader(m)
        elif self.role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    # ---------------------------------------------------------------- Ready

    def has_ready(self) -> bool:
        if self._outstanding:
            return False
        return bool(
            self._msgs
            or self._read_states
            or self._bcast_pending
            or self._read_round_pending
            or self._pending_snapshot is not None
            or self._unstable <= self.last_index
            or self._applying < self.commit_index
            or self._prev_hs.term != self.term
            or self._prev_hs.vote != self.vote
            or self._prev_hs.commit != self.commit_index
            or self._prev_ss.leader_id != self.leader_id
            or self._prev_ss.role is not self.role
        )

    def ready(self) -> Ready:
        if self._outstanding:
            raise RaftError("advance() the previous Ready first")
        if self._bcast_pending:
            self._bcast_pending = False
            self._bcast_append()
        if self._read_round_pending:
            self._bcast_heartbeat()
        hs: HardState | None = None
        if (
            self._prev_hs.term != self.term
            or self._prev_hs.vote != self.vote
            or self._prev_hs.commit != self.commit_index
        ):
            hs = HardState(self.term, self.vote, self.commit_index)
            self._prev_hs = hs
        ss: SoftState | None = None
        if (
            self._prev_ss.leader_id != self.leader_id
            or self._prev_ss.role is not self.role
            or self._prev_ss.term != self.term
        ):
            ss = SoftState(self.leader_id, self.role, self.term)
            self._prev_ss = ss
        off = self._snap.index + 1
        entries = self._ents[self._unstable - off :] if self._unstable <= self.last_index else []
        committed: list[Entry] = []
        if self._applying < self.commit_index:
            committed = self._ents[self._applying + 1 - off : self.commit_index + 1 - off]
            self._applying = self.commit_index
        rd = Ready(
            ss, hs, self._pending_snapshot, entries, committed, self._msgs, self._read_states
        )
        self._pending_snapshot = None
        self._msgs = []
        self._read_states = []
        self._outstanding = True
        return rd

    def advance(self, rd: Ready) -> None:
        self._outstanding = False
        if rd.snapshot is not None:
            self.applied = max(self.applied, rd.snapshot[0].index)
        if rd.committed:
            self.applied = max(self.applied, rd.committed[-1].index)
        if rd.entries:
            last = rd.entries[-1]
            if self.term_at(last.index) == last.term and last.index >= self._unstable:
                self._unstable = last.index + 1
        if self.role is Role.LEADER:
            me = self._prs.get(self.id)
            if me is not None and me.maybe_update(self._unstable - 1) and self._maybe_commit():
                self._bcast_pending = True

    # ---------------------------------------------------------------- internals: roles

    def _promotable(self) -> bool:
        return self.id in self._voters

    def _reset_timeout(self) -> None:
        e = self.cfg.election_ticks
        self._timeout = self._rng.randrange(e, 2 * e)

    def _reset(self, term: int) -> None:
        if term != self.term:
            self.term = term
            self.vote = ""
        self.leader_id = None
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._reset_timeout()
        self._votes = {}
        self._prs = {}
        self.lead_transferee = None
        self._bcast_pending = False
        self._reads_before_commit = []
        self._read_reqs.clear()
        self._read_acks = {}
        self._read_round_pending = False

    def _become_follower(self, term: int, leader: str | None) -> None:
        was = self.role
        self._reset(term)
        self.role = Role.FOLLOWER
        self.leader_id = leader
        if was is Role.LEADER:
            log.info("raft.stepped_down", node=self.id, term=term, leader=leader)

    def _campaign(self, *, transfer: bool) -> None:
        if self.cfg.pre_vote and not transfer:
            self._reset(self.term)
            self.role = Role.PRE_CANDIDATE
            log.info("raft.pre_campaign", node=self.id, term=self.term + 1)
            self._votes[self.id] = True
            if self._tally() == 1:
                self._real_campaign(b"")
                return
            self._request_votes(MT.PRE_VOTE, self.term + 1, b"")
        else:
            self._real_campaign(TRANSFER_CONTEXT if transfer else b"")

    def _real_campaign(self, ctx: bytes) -> None:
        self._reset(self.term + 1)
        self.role = Role.CANDIDATE
        self.vote = self.id
        log.info("raft.campaign", node=self.id, term=self.term, transfer=bool(ctx))
        self._votes[self.id] = True
        if self._tally() == 1:
            self._become_leader()
            return
        self._request_votes(MT.VOTE, self.term, ctx)

    def _request_votes(self, mtype: MessageType, term: int, ctx: bytes) -> None:
        lt, li = self.last_term, self.last_index
        for v in sorted(self._voters):
            if v != self.id:
                self._msgs.append(
                    Message(mtype, self.id, v, term, log_term=lt, index=li, context=ctx)
                )

    def _tally(self) -> int:
        """1 won, -1 lost, 0 undecided."""
        q = len(self._voters) // 2 + 1
        granted = sum(1 for v, ok in self._votes.items() if ok and v in self._voters)
        rejected = sum(1 for v, ok in self._votes.items() if not ok and v in self._voters)
        if granted >= q:
            return 1
        if rejected > len(self._voters) - q:
            return -1
        return 0

    def _become_leader(self) -> None:
        self._reset(self.term)
        self.role = Role.LEADER
        self.leader_id = self.id
        nxt = self.last_index + 1
        self._prs = {sid: _Progress(nxt) for sid in self._config.servers}
        me = self._prs.setdefault(self.id, _Progress(nxt))
        me.match = self._unstable - 1
        me.become_replicate()
        me.recent_active = True
        log.info("raft.became_leader", node=self.id, term=self.term)
        self._term_start = self.last_index + 1
        self._append([Entry(self._term_start, self.term, EntryType.NOOP)])
        self._bcast_pending = True

    def _tick_leader(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        for pid, pr in self._prs.items():
            if pid != self.id:
                pr.contact_ticks += 1
                if pr.state is ProgressState.SNAPSHOT:
                    pr.snap_elapsed += 1
                    if pr.snap_elapsed >= self.cfg.snapshot_timeout_ticks:
                        pr.become_probe()  # the snapshot was lost: probe (and maybe resend)
        if self._election_elapsed >= self.cfg.election_ticks:
            self._election_elapsed = 0
            if self.cfg.check_quorum:
                active = sum(
                    1
                    for v in self._voters
                    if v == self.id or (v in self._prs and self._prs[v].recent_active)
                )
                if active < len(self._voters) // 2 + 1:
                    log.info("raft.check_quorum_failed", node=self.id, term=self.term)
                    self._become_follower(self.term, None)
                    return
                for pid, pr in self._prs.items():
                    pr.recent_active = pid == self.id
            if self.lead_transferee is not None:
                log.info("raft.transfer_aborted", node=self.id, target=self.lead_transferee)
                self.lead_transferee = None
        if self._heartbeat_elapsed >= self.cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat()

    # ---------------------------------------------------------------- internals: log

    def _append(self, entries: list[Entry]) -> None:
        """Append entries that follow last_index (callers truncated first)."""
        self._ents.extend(entries)
        for e in entries:
            if e.type is EntryType.CONFIG:
                c = decode_config(e.data)
                if c is not None:
                    self._conf_entries.append((e.index, c))
                    self._apply_config(c)

    def _truncate(self, index: int) -> None:
        """Drop entries >= index (never committed ones: callers check)."""
        del self._ents[index - self._snap.index - 1 :]
        self._unstable = min(self._unstable, index)
        if self._conf_entries and self._conf_entries[-1][0] >= index:
            while self._conf_entries and self._conf_entries[-1][0] >= index:
                self._conf_entries.pop()
            conf = self._conf_entries[-1][1] if self._conf_entries else self._snap.config
            self._apply_config(conf)

    def _apply_config(self, c: Configuration) -> None:
        """A configuration takes effect as soon as it is in the log (dissertation 4.1)."""
        self._config = c
        self._voters = c.voters
        if self.role is not Role.LEADER:
            return
        nxt = self.last_index + 1
        for sid in c.servers:
            if sid not in self._prs:
                self._prs[sid] = _Progress(nxt)
        for sid in list(self._prs):
            if sid not in c.servers and sid != self.id:
                del self._prs[sid]
                self._read_acks.pop(sid, None)
        if self.lead_transferee is not None and self.lead_transferee not in self._voters:
            self.lead_transferee = None
        if self._maybe_commit():
            self._bcast_pending = True

    def _commit_to(self, index: int) -> None:
        if index > self.commit_index:
            self.commit_index = index

    def _maybe_commit(self) -> bool:
        """Commit the quorum's match index if it is from the current term (Raft 5.4.2)."""
        voters = self._voters
        if not voters:
            return False
        matches = sorted(
            (self._prs[v].match if v in self._prs else 0 for v in voters), reverse=True
        )
        mci = matches[len(voters) // 2]
        if mci <= self.commit_index or self.term_at(mci) != self.term:
            return False
        self.commit_index = mci
        self._on_leader_commit()
        return True

    def _on_leader_commit(self) -> None:
        if self._reads_before_commit and self.commit_index >= self._term_start:
            pending, self._reads_before_commit = self._reads_before_commit, []
            for ctx, src in pending:
                self._leader_read(ctx, src)
        if (
            self.id not in self._voters
            and self._conf_entries
            and self._conf_entries[-1][0] <= self.commit_index
        ):
            # removed (or demoted) and the change is committed: hand over (dissertation 4.2.2)
            log.info("raft.removed_leader_steps_down", node=self.id, term=self.term)
            self._become_follower(self.term, None)

    def _propose(self, typ: EntryType, data: bytes) -> int:
        if self.role is not Role.LEADER:
            raise NotLeader(self.leader_id)
        if self.lead_transferee is not None:
            raise ProposalDropped(f"leadership is moving to {self.lead_transferee}")
        index = self.last_index + 1
        self._append([Entry(index, self.term, typ, data)])
        self._bcast_pending = True  # batched: one append per follower per Ready
        return index

    # ---------------------------------------------------------------- internals: sending

    def _send(
        self,
        typ: MessageType,
        to: str,
        *,
        index: int = 0,
        log_term: int = 0,
        commit: int = 0,
        reject: bool = False,
        reject_hint: int = 0,
        context: bytes = b"",
        term: int | None = None,
    ) -> None:
        self._msgs.append(
            Message(
                typ,
                self.id,
                to,
                self.term if term is None else term,
                log_term=log_term,
                index=index,
                commit=commit,
                reject=reject,
                reject_hint=reject_hint,
                context=context,
            )
        )

    def _send_append(self, to: str, send_if_empty: bool) -> bool:
        pr = self._prs.get(to)
        if pr is None:
            return False
        if pr.state is ProgressState.SNAPSHOT:
            return False
        if pr.state is ProgressState.PROBE:
            if pr.paused:
                return False
        elif len(pr.inflights) >= self.cfg.max_inflight:
            return False
        prev = pr.next - 1
        prev_term = self.term_at(prev)
        if prev_term is None:
            if prev < self._snap.index:
                return self._send_snapshot(to, pr)
            pr.next = self.last_index + 1  # beyond our log (stale next): start from the end
            prev = pr.next - 1
            prev_term = self.last_term
        entries = self._slice(pr.next)
        if not entries and not send_if_empty and pr.sent_commit >= self.commit_index:
            return False
        pr.sent_commit = max(pr.sent_commit, min(self.commit_index, prev + len(entries)))
        self._msgs.append(
            Message(
                MT.APP,
                self.id,
                to,
                self.term,
                log_term=prev_term,
                index=prev,
                entries=entries,
                commit=self.commit_index,
            )
        )
        if pr.state is ProgressState.REPLICATE:
            if entries:
                last = entries[-1].index
                pr.next = last + 1
                pr.inflights.append(last)
        else:
            pr.paused = True
        return True

    def _slice(self, start: int) -> list[Entry]:
        off = start - self._snap.index - 1
        if off >= len(self._ents):
            return []
        chunk = self._ents[off : off + self.cfg.max_entries_per_msg]
        size = 0
        for i, e in enumerate(chunk):
            size += len(e.data) + 16
            if size > self.cfg.max_bytes_per_msg and i > 0:
                return chunk[:i]
        return chunk

    def _send_snapshot(self, to: str, pr: _Progress) -> bool:
        if self._snap_data is None:
            return False
        self._msgs.append(
            Message(
                MT.SNAP,
                self.id,
                to,
                self.term,
                snapshot=self._snap,
                snapshot_data=self._snap_data,
            )
        )
        pr.state = ProgressState.SNAPSHOT
        pr.pending_snapshot = self._snap.index
        pr.snap_elapsed = 0
        pr.inflights.clear()
        return True

    def _bcast_append(self) -> None:
        for pid in self._prs:
            if pid != self.id:
                self._send_append(pid, True)

    def _bcast_heartbeat(self) -> None:
        self._read_round_pending = False
        ctx = _seq_ctx(self._read_seq) if self._read_reqs else b""
        for pid, pr in self._prs.items():
            if pid != self.id:
                self._msgs.append(
                    Message(
                        MT.HEARTBEAT,
                        self.id,
                        pid,
                        self.term,
                        commit=min(pr.match, self.commit_index),
                        context=ctx,
                    )
                )

    # ---------------------------------------------------------------- internals: receiving

    def _handle_vote(self, m: Message) -> None:
        pre = m.type is MT.PRE_VOTE
        can_vote = (
            self.vote == m.src
            or (self.vote == "" and self.leader_id is None)
            or (pre and m.term > self.term)
        )
        lt = self.last_term
        up_to_date = m.log_term > lt or (m.log_term == lt and m.index >= self.last_index)
        resp = MT.PRE_VOTE_RESP if pre else MT.VOTE_RESP
        if can_vote and up_to_date:
            self._send(resp, m.src, term=m.term)
            if not pre:
                self._election_elapsed = 0
                self.vote = m.src
        else:
            self._send(resp, m.src, reject=True)

    def _step_candidate(self, m: Message) -> None:
        t = m.type
        if t in (MT.APP, MT.HEARTBEAT, MT.SNAP):
            self._become_follower(self.term, m.src)
            self._step_follower(m)
            return
        want = MT.PRE_VOTE_RESP if self.role is Role.PRE_CANDIDATE else MT.VOTE_RESP
        if t is not want or m.src not in self._voters:
            return
        self._votes.setdefault(m.src, not m.reject)
        res = self._tally()
        if res == 1:
            if self.role is Role.PRE_CANDIDATE:
                self._real_campaign(b"")
            else:
                self._become_leader()
        elif res == -1:
            self._become_follower(self.term, None)

    def _step_follower(self, m: Message) -> None:
        t = m.type
        if t is MT.APP:
            self._election_elapsed = 0
            self.leader_id = m.src
            self._handle_append(m)
        elif t is MT.HEARTBEAT:
            self._election_elapsed = 0
            self.leader_id = m.src
            self._commit_to(min(m.commit, self.last_index))
            self._send(MT.HEARTBEAT_RESP, m.src, context=m.context)
        elif t is MT.SNAP:
            self._election_elapsed = 0
            self.leader_id = m.src
            self._handle_snapshot(m)
        elif t is MT.TIMEOUT_NOW:
            if self._promotable():
                log.info("raft.timeout_now", node=self.id, term=self.term, src=m.src)
                self._campaign(transfer=True)
        elif t is MT.READ_INDEX_RESP and m.src == self.leader_id:
            self._read_states.append(ReadState(m.context, m.index))
        # READ_INDEX to a follower: only leaders answer; the requester times out and retries

    def _handle_append(self, m: Message) -> None:
        if m.index < self.commit_index:
            self._send(MT.APP_RESP, m.src, index=self.commit_index)
            return
        if self.term_at(m.index) != m.log_term:
            hint = min(m.index, self.last_index)
            hint, hint_term = self._find_conflict_by_term(hint, m.log_term)
            self._send(
                MT.APP_RESP, m.src, index=m.index, reject=True, reject_hint=hint, log_term=hint_term
            )
            return
        ents = m.entries
        last_new = m.index + len(ents)
        for k, e in enumerate(ents):
            if e.index > self.last_index:
                self._append(ents[k:])
                break
            if self.term_at(e.index) != e.term:
                if e.index <= self.commit_index:
                    log.error("raft.conflict_below_commit", node=self.id, index=e.index)
                    return
                self._truncate(e.index)
                self._append(ents[k:])
                break
        self._commit_to(min(m.commit, last_new))
        self._send(MT.APP_RESP, m.src, index=last_new)

    def _find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The last index <= index whose term is <= term (etcd's fast backtracking hint)."""
        index = min(index, self.last_index)
        while index > 0:
            t = self.term_at(index)
            if t is None:
                return index, 0
            if t <= term:
                return index, t
            index -= 1
        return 0, 0

    def _handle_snapshot(self, m: Message) -> None:
        s = m.snapshot
        if s is None:
            return
        if s.index <= self.commit_index:
            self._send(MT.APP_RESP, m.src, index=self.commit_index)
            return
        if self.term_at(s.index) == s.term:
            self._commit_to(s.index)  # we have it all: fast-forward instead of wiping the log
            self._send(MT.APP_RESP, m.src, index=self.commit_index)
            return
        log.info("raft.snapshot_installed", node=self.id, index=s.index, term=s.term)
        self._snap = s
        self._snap_data = m.snapshot_data
        self._ents = []
        self._conf_entries = []
        self._unstable = s.index + 1
        self.commit_index = s.index
        self._applying = s.index
        self._pending_snapshot = (s, m.snapshot_data)
        self._config = s.config
        self._voters = s.config.voters
        self._send(MT.APP_RESP, m.src, index=self.last_index)

    def _step_leader(self, m: Message) -> None:
        t = m.type
        if t is MT.READ_INDEX:
            self._leader_read(m.context, m.src)
            return
        pr = self._prs.get(m.src)
        if pr is None:
            return
        pr.recent_active = True
        pr.contact_ticks = 0
        if t is MT.APP_RESP:
            self._handle_append_resp(m, pr)
        elif t is MT.HEARTBEAT_RESP:
            if pr.state is ProgressState.PROBE:
                pr.paused = False
            elif pr.state is ProgressState.REPLICATE and len(pr.inflights) >= self.cfg.max_inflight:
                pr.inflights.popleft()
            if pr.match < self.last_index:
                self._send_append(m.src, True)
            if len(m.context) == 8 and self._read_reqs:
                seq = int.from_bytes(m.context, "big")
                if seq > self._read_acks.get(m.src, 0):
                    self._read_acks[m.src] = seq
                    self._release_reads()

    def _handle_append_resp(self, m: Message, pr: _Progress) -> None:
        to = m.src
        if m.reject:
            hint = m.reject_hint
            if m.log_term > 0:
                hint, _ = self._find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decr_to(m.index, hint):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(to, True)
            return
        if pr.maybe_update(m.index) or (pr.match == m.index and pr.state is ProgressState.PROBE):
            if pr.state is ProgressState.PROBE or (
                pr.state is ProgressState.SNAPSHOT and pr.match + 1 >= self.first_index
            ):
                pr.become_replicate()
            elif pr.state is ProgressState.REPLICATE:
                while pr.inflights and pr.inflights[0] <= m.index:
                    pr.inflights.popleft()
            if self._maybe_commit():
                self._bcast_pending = True
                if self.role is not Role.LEADER:
                    return
            while self._send_append(to, False):
                pass
            if to == self.lead_transferee and pr.match == self.last_index:
                self._send(MT.TIMEOUT_NOW, to)

    def _leader_read(self, ctx: bytes, src: str) -> None:
        if self.commit_index < self._term_start:
            self._reads_before_commit.append((ctx, src))
            return
        if self._voters == {self.id}:
            self._read_done(ctx, self.commit_index, src)
            return
        if not self._read_round_pending:
            self._read_seq += 1
            self._read_round_pending = True
        self._read_reqs.append((self._read_seq, self.commit_index, ctx, src))

    def _release_reads(self) -> None:
        """Answer every request whose heartbeat round a quorum of voters acknowledged."""
        q = len(self._voters) // 2 + 1
        acks = sorted(
            (self._read_seq if v == self.id else self._read_acks.get(v, 0) for v in self._voters),
            reverse=True,
        )
        confirmed = acks[q - 1] if len(acks) >= q else 0
        while self._read_reqs and self._read_reqs[0][0] <= confirmed:
            _, index, ctx, src = self._read_reqs.popleft()
            self._read_done(ctx, index, src)

    def _read_done(self, ctx: bytes, index: int, src: str) -> None:
        if src == self.id:
            self._read_states.append(ReadState(ctx, index))
        else:
            self._send(MT.READ_INDEX_RESP, src, index=index, context=ctx)


def describe(node: RaftNode) -> dict[str, Any]:
    """A compact status dict for logs and the operator API."""
    return {
        "id": node.id,
        "term": node.term,
        "role": node.role.value,
        "leader": node.leader_id,
        "commit": node.commit_index,
        "applied": node.applied,
        "last_index": node.last_index,
        "first_index": node.first_index,
    }

"""A deterministic simulated cluster for the sans-I/O Raft core, with incremental safety checks.

One seeded RNG drives message loss, duplication, random delays, reordering, partitions,
crash-restarts, client proposals, reads, configuration changes, leadership transfers and
compactions, so a failure replays exactly from its seed. Links are FIFO like the runtime's TCP
streams, except for the `reorder` fraction of messages, which overtake or get overtaken (a
reconnect); fully random order would turn pipelined appends into a retransmission storm that no
real transport produces.

Storage is modelled faithfully: a node restarts only from what it persisted out of `Ready`
(snapshot, entries, hard state); a crash may land between persisting a Ready and sending its
messages / advancing, and right after a vote was granted (the targeted nemesis).

The checkers are plain classes so a test can feed them a broken history and see them fail.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from node.raft.core import (
    ConfigChangeError,
    NotLeader,
    ProposalDropped,
    RaftConfig,
    RaftNode,
    Ready,
    Role,
)
from node.raft.messages import Message, MessageType
from node.raft.types import Configuration, Entry, HardState, Server, SnapshotMeta

NODE_IDS = ("n1", "n2", "n3", "n4", "n5")
TICK = 10  # simulated time units per tick


class SafetyViolation(AssertionError):
    pass


class SafetyChecker:
    """Raft's safety properties, checked incrementally so every step stays O(new work)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.leaders: dict[int, str] = {}  # term -> the one leader of that term
        # (index, term) -> (type, data, term of index-1): equal keys => equal prefixes (induction)
        self.log_keys: dict[tuple[int, int], tuple[int, bytes, int]] = {}
        self.committed_terms: dict[int, int] = {}  # index -> term of the committed entry there
        self.commit_marks: dict[int, int] = {}  # term -> highest index committed in that term
        self.applied: dict[int, tuple[int, bytes]] = {}  # index -> (term, data) applied there
        self.digests: dict[int, int] = {}  # index -> state digest after applying it
        self.max_commit = 0

    def fail(self, what: str) -> None:
        raise SafetyViolation(f"seed={self.seed}: {what}")

    def leader(self, term: int, node_id: str) -> None:
        """Election safety: at most one leader per term, ever."""
        got = self.leaders.setdefault(term, node_id)
        if got != node_id:
            self.fail(f"election safety: {got} and {node_id} both lead term {term}")

    def appended(self, entries: list[Entry], prev_term: int) -> None:
        """Log matching: an (index, term) pair always names the same entry and predecessor."""
        keys = self.log_keys
        for e in entries:
            want = (int(e.type), e.data, prev_term)
            got = keys.setdefault((e.index, e.term), want)
            if got != want:
                self.fail(f"log matching: two different entries at index {e.index} term {e.term}")
            prev_term = e.term

    def snapshot_installed(self, index: int, term: int) -> None:
        want = self.committed_terms.get(index)
        if want is not None and want != term:
            self.fail(f"snapshot at {index} has term {term}, committed term is {want}")

    def committed(self, node_id: str, term: int, index: int, entry_term: int | None) -> None:
        """Committed entries never change (entry_term None: below the node's snapshot)."""
        if entry_term is not None:
            got = self.committed_terms.setdefault(index, entry_term)
            if got != entry_term:
                self.fail(f"{node_id} committed term {entry_term} at {index}, others {got}")
        if index > self.commit_marks.get(term, 0):
            self.commit_marks[term] = index
        if index > self.max_commit:
            self.max_commit = index

    def new_leader(
        self, node_id: str, term: int, term_at: Callable[[int], int | None], snap_index: int
    ) -> None:
        """Leader completeness: the last entry committed in an earlier term is in our log (log
        matching, checked separately, then gives the whole prefix)."""
        idx = max((i for t, i in self.commit_marks.items() if t < term), default=0)
        if idx == 0 or idx < snap_index:
            return
        want = self.committed_terms.get(idx)
        got = term_at(idx)
        if want is not None and got != want:
            self.fail(
                f"leader completeness: {node_id} leads term {term} without committed entry "
                f"{idx} (term {want}; has {got})"
            )

    def apply(self, node_id: str, e: Entry, digest: int) -> None:
        """State machine safety: every node applies the same entry at each index."""
        want = (e.term, e.data)
        got = self.applied.setdefault(e.index, want)
        if got != want:
            self.fail(f"state machine safety: {node_id} applied {want} at {e.index}, others {got}")
        d = self.digests.setdefault(e.index, digest)
        if d != digest:
            self.fail(f"state machine safety: {node_id} state diverged at {e.index}")

    def restored(self, node_id: str, index: int, digest: int) -> None:
        d = self.digests.get(index)
        if index and d is not None and d != digest:
            self.fail(f"{node_id} restored a snapshot at {index} whose state differs")


@dataclass
class Disk:
    """What a node has persisted through Ready: all it has after a crash."""

    hard_state: HardState = field(default_factory=HardState)
    snapshot: SnapshotMeta = field(default_factory=SnapshotMeta)
    snapshot_data: bytes | None = None
    entries: list[Entry] = field(default_factory=list)

    def term_at(self, index: int) -> int | None:
        off = index - self.snapshot.index
        if off == 0:
            return self.snapshot.term
        if off < 0 or off > len(self.entries):
            return None
        return self.entries[off - 1].term


@dataclass
class SimNode:
    id: str
    disk: Disk = field(default_factory=Disk)
    core: RaftNode | None = None
    generation: int = 0  # bumps on crash: events of an earlier life are void
    outstanding: Ready | None = None
    fsm_index: int = 0
    digest: int = 0
    seen_commit: int = 0
    was_leader_term: int = 0


def _digest(prev: int, e: Entry) -> int:
    return hash((prev, e.index, e.term, e.data)) & 0xFFFFFFFFFFFF


class RaftSim:
    """Five nodes, one event heap; `step()` is one event (a tick, a delivery, a Ready phase...)."""

    def __init__(self, seed: int, *, cfg: RaftConfig | None = None) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.cfg = cfg or RaftConfig(election_ticks=10, heartbeat_ticks=1, max_inflight=8)
        self.check = SafetyChecker(seed)
        self.now = 0
        self.steps = 0
        self._seq = 0
        self._heap: list[tuple[int, int, int, object]] = []
        self.nodes = {i: SimNode(i) for i in NODE_IDS}
        self.group: dict[str, int] = {i: 0 for i in NODE_IDS}
        self._link_clock: dict[tuple[str, str], int] = {}
        self.loss = 0.0
        self.dup = 0.0
        self.max_delay = 4
        self.reorder = 0.0
        self.defer_ready = 0.2
        self.crash_after_vote = 0.0  # targeted nemesis: crash right after granting a vote
        self.proposed = 0
        self.reads: dict[bytes, int] = {}  # ctx -> max commit seen when the read was issued
        self.reads_served = 0
        self.snapshots_installed = 0
        self.config_changes = 0
        self.transfers = 0
        self.crashes = 0
        for n in self.nodes.values():
            self._boot(n)
            self._at(self.rng.randrange(1, TICK + 1), _TICK, (n.id, n.generation))
        conf = Configuration({i: Server(i, i, i, True) for i in NODE_IDS[:3]})
        for i in NODE_IDS[:3]:
            core = self.nodes[i].core
            assert core is not None
            core.bootstrap(conf)
            self._pump(self.nodes[i])

    # ------------------------------------------------------------ plumbing

    def _at(self, t: int, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _boot(self, n: SimNode) -> None:
        d = n.disk
        n.core = RaftNode(
            n.id,
            self.cfg,
            hard_state=d.hard_state,
            snapshot=d.snapshot,
            entries=list(d.entries),
            rng=random.Random(self.rng.getrandbits(64)),
            snapshot_data=d.snapshot_data,
        )
        n.outstanding = None
        n.fsm_index = d.snapshot.index
        n.digest = int.from_bytes(d.snapshot_data[:8], "big") if d.snapshot_data else 0
        n.seen_commit = n.core.commit_index
        n.was_leader_term = 0

    def crash(self, n: SimNode) -> None:
        self.crashes += 1
        n.core = None
        n.outstanding = None
        n.generation += 1

    def restart(self, n: SimNode) -> None:
        if n.core is not None:
            return
        self._boot(n)
        self._at(self.now + self.rng.randrange(1, TICK + 1), _TICK, (n.id, n.generation))

    def _send(self, m: Message) -> None:
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            return
        if self.group[m.src] != self.group[m.dst]:
            return
        copies = 2 if self.dup and rng.random() < self.dup else 1
        link = (m.src, m.dst)
        for _ in range(copies):
            t = self.now + rng.randint(1, self.max_delay)
            if self.reorder and rng.random() < self.reorder:
                t += rng.randint(1, 3 * TICK)  # overtaken by later messages (a reconnect)
            else:
                # the runtime's transport is one TCP stream per peer: FIFO per link
                t = max(t, self._link_clock.get(link, 0))
                self._link_clock[link] = t
            if rng.random() < 0.01:
                m = Message.decode(m.encode())  # keep the wire path honest
            self._at(t, _DELIVER, m)

    def _pump(self, n: SimNode) -> None:
        """Persist a Ready at once; send/apply/advance now or later (a crash may fall between)."""
        core = n.core
        while core is not None and n.outstanding is None and core.has_ready():
            rd = core.ready()
            self._persist(n, rd)
            n.outstanding = rd
            if self.rng.random() < self.defer_ready:
                self._at(self.now + self.rng.randint(1, 3), _FINISH, (n.id, n.generation))
                break
            self._finish(n)

    def _persist(self, n: SimNode, rd: Ready) -> None:
        d = n.disk
        if rd.snapshot is not None:
            meta, data = rd.snapshot
            self.check.snapshot_installed(meta.index, meta.term)
            d.snapshot, d.snapshot_data, d.entries = meta, data, []
        if rd.entries:
            first = rd.entries[0].index
            keep = first - d.snapshot.index - 1
            if keep < 0 or keep > len(d.entries):
                self.check.fail(f"{n.id}: Ready entries from {first} do not fit the stored log")
            del d.entries[keep:]
            prev = d.term_at(first - 1)
            self.check.appended(rd.entries, prev if prev is not None else -1)
            d.entries.extend(rd.entries)
        if rd.hard_state is not None:
            d.hard_state = rd.hard_state

    def _finish(self, n: SimNode) -> None:
        rd, core = n.outstanding, n.core
        if rd is None or core is None:
            return
        voted = False
        for m in rd.messages:
            self._send(m)
            voted = voted or (m.type is MessageType.VOTE_RESP and not m.reject)
        if rd.snapshot is not None:
            meta, data = rd.snapshot
            self.snapshots_installed += 1
            n.fsm_index = meta.index
            n.digest = int.from_bytes(data[:8], "big")
            self.check.restored(n.id, meta.index, n.digest)
        for e in rd.committed:
            if e.index != n.fsm_index + 1:
                self.check.fail(f"{n.id} applies {e.index} after {n.fsm_index}")
            n.digest = _digest(n.digest, e)
            n.fsm_index = e.index
            self.check.apply(n.id, e, n.digest)
        for rs in rd.read_states:
            want = self.reads.pop(rs.ctx, None)
            if want is not None:
                self.reads_served += 1
                if rs.index < want:
                    self.check.fail(
                        f"read {rs.ctx!r} on {n.id} got index {rs.index} < commit {want} seen "
                        "before it was issued"
                    )
        n.outstanding = None
        core.advance(rd)
        if voted and self.crash_after_vote and self.rng.random() < self.crash_after_vote:
            self.crash(n)
            self.schedule(self.rng.randint(1, 3), lambda: self.restart(n))
            return
        self._after(n)

    def _after(self, n: SimNode) -> None:
        """Per-step checks for the node the step touched, then flush its Ready."""
        core = n.core
        if core is None:
            return
        if core.role is Role.LEADER:
            self.check.leader(core.term, n.id)
            if n.was_leader_term != core.term:
                n.was_leader_term = core.term
                self.check.new_leader(n.id, core.term, core.term_at, core.snapshot.index)
        c = core.commit_index
        if c > n.seen_commit:
            for i in range(n.seen_commit + 1, c + 1):
                self.check.committed(n.id, core.term, i, core.term_at(i))
            n.seen_commit = c
        self._pump(n)

    # ------------------------------------------------------------ driving

    def step(self) -> bool:
        """Run one event; False when nothing is scheduled."""
        if not self._heap:
            return False
        t, _, kind, payload = heapq.heappop(self._heap)
        self.now = t
        self.steps += 1
        if kind == _DELIVER:
            assert isinstance(payload, Message)
            n = self.nodes[payload.dst]
            if n.core is not None and self.group[payload.src] == self.group[payload.dst]:
                n.core.step(payload)
                self._after(n)
        elif kind == _TICK:
            nid, gen = cast(tuple[str, int], payload)
            n = self.nodes[nid]
            if n.core is not None and n.generation == gen:
                n.core.tick()
                self._after(n)
                self._at(t + TICK, _TICK, payload)
        elif kind == _FINISH:
            nid, gen = cast(tuple[str, int], payload)
            n = self.nodes[nid]
            if n.generation == gen:
                self._finish(n)
        elif kind == _ACTION:
            assert callable(payload)
            payload()
        return True

    def schedule(self, delay: int, action: Callable[[], None]) -> None:
        self._at(self.now + delay, _ACTION, action)

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes.values() if n.core is not None]

    def leader(self) -> SimNode | None:
        best: SimNode | None = None
        for n in self.live():
            assert n.core is not None
            if n.core.role is Role.LEADER and (best is None or n.core.term > best.core.term):  # type: ignore[union-attr]
                best = n
        return best

    # ------------------------------------------------------------ client and operator actions

    def propose(self, n: SimNode) -> int | None:
        if n.core is None:
            return None
        self.proposed += 1
        try:
            index = n.core.propose(b"v%d" % self.proposed)
        except (NotLeader, ProposalDropped):
            return None
        self._after(n)
        return index

    def read(self, n: SimNode) -> None:
        if n.core is None:
            return
        ctx = b"r%d" % self.steps
        try:
            n.core.read_index(ctx)
        except NotLeader:
            return
        self.reads[ctx] = self.check.max_commit
        self._after(n)

    def leader_unreachable(self, n: SimNode) -> None:
        """The transport's hint that the leader's port refuses connections; the sim sends it
        to anyone, so it is as often a false alarm (the leader is fine) as a true one."""
        if n.core is None:
            return
        n.core.leader_unreachable()
        self._after(n)

    def change_config(self) -> None:
        ldr = self.leader()
        if ldr is None or ldr.core is None:
            return
        conf = ldr.core.configuration
        voters, learners = conf.voters, conf.learners
        rng = self.rng
        options: list[Configuration] = []
        for i in NODE_IDS:
            if i not in conf.servers:
                options.append(conf.with_server(Server(i, i, i, False)))
        for i in sorted(learners):
            options.append(conf.without(i))
            if len(voters) < 5:
                options.append(conf.with_server(Server(i, i, i, True)))
        if len(voters) > 3:
            for i in sorted(voters):
                options.append(conf.with_server(Server(i, i, i, False)))
                options.append(conf.without(i))
        if not options:
            return
        try:
            ldr.core.change_config(rng.choice(options))
        except (NotLeader, ProposalDropped, ConfigChangeError):
            return
        self.config_changes += 1
        self._after(ldr)

    def transfer(self) -> None:
        ldr = self.leader()
        if ldr is None or ldr.core is None:
            return
        targets = sorted(v for v in ldr.core.configuration.voters if v != ldr.id)
        if not targets:
            return
        try:
            ldr.core.transfer_leadership(self.rng.choice(targets))
        except (NotLeader, ConfigChangeError):
            return
        self.transfers += 1
        self._after(ldr)

    def compact(self, n: SimNode) -> None:
        core = n.core
        if core is None or n.outstanding is not None:
            return
        idx = core.applied
        if idx <= core.snapshot.index or idx != n.fsm_index:
            return
        meta = core.snapshot_meta(idx)
        data = n.digest.to_bytes(8, "big")
        core.compact(meta, data)
        d = n.disk
        drop = idx - d.snapshot.index
        del d.entries[:drop]
        d.snapshot, d.snapshot_data = meta, data

    def partition(self) -> None:
        ids = list(NODE_IDS)
        self.rng.shuffle(ids)
        cut = self.rng.randint(1, 2)
        for k, i in enumerate(ids):
            self.group[i] = 1 if k < cut else 0

    def heal(self) -> None:
        for i in NODE_IDS:
            self.group[i] = 0


_DELIVER, _TICK, _FINISH, _ACTION = range(4)


@dataclass
class RunStats:
    seed: int
    steps: int
    proposed: int
    committed: int
    leaders: int
    reads: int
    snapshots_installed: int
    config_changes: int
    transfers: int
    crashes: int


def run_seed(seed: int, steps: int = 10_000, *, heal_steps: int = 20_000) -> RunStats:
    """The randomized scenario: a nemesis phase of `steps` events, then heal and check liveness."""
    knobs = random.Random(seed * 7919 + 1)  # flow-control limits vary per seed
    cfg = RaftConfig(
        election_ticks=10,
        heartbeat_ticks=1,
        max_entries_per_msg=knobs.choice((1, 4, 64)),
        max_inflight=knobs.choice((1, 4, 64)),
    )
    sim = RaftSim(seed, cfg=cfg)
    rng = sim.rng
    sim.loss = rng.choice((0.0, 0.02, 0.05, 0.1))
    sim.dup = rng.choice((0.0, 0.02, 0.05))
    sim.reorder = rng.choice((0.0, 0.05, 0.2))
    sim.max_delay = rng.randint(2, 8)
    nodes = list(sim.nodes.values())
    sim.crash_after_vote = rng.choice((0.0, 0.5))
    nemesis_on = [True]

    def chaos() -> None:
        if not nemesis_on[0]:
            return
        r = rng.random()
        if r < 0.45:
            # clients write to whoever claims leadership, stale leaders too (divergent tails)
            claim = [n for n in nodes if n.core is not None and n.core.role is Role.LEADER]
            for _ in range(rng.randint(1, 3)):
                sim.propose(rng.choice(claim or nodes))
        elif r < 0.55:
            sim.read(rng.choice(nodes))
        elif r < 0.64:
            sim.compact(rng.choice(nodes))
        elif r < 0.68:
            sim.change_config()
        elif r < 0.70:
            sim.transfer()
        elif r < 0.78:
            down = [n for n in nodes if n.core is None]
            if len(down) < 2:
                # mostly short outages (a crash mid-election), sometimes long ones (snapshots)
                victim = rng.choice(nodes)
                sim.crash(victim)
                short = rng.random() < 0.7
                dt = rng.randint(1, 3 * TICK) if short else rng.randint(TICK, 80 * TICK)
                sim.schedule(dt, lambda: sim.restart(victim))
        elif r < 0.80:
            sim.partition()
            sim.schedule(rng.randint(5 * TICK, 60 * TICK), sim.heal)
        elif r < 0.82:
            sim.leader_unreachable(rng.choice(nodes))
        sim.schedule(rng.randint(1, 2 * TICK), chaos)

    sim.schedule(1, chaos)
    while sim.steps < steps:
        if not sim.step():
            break
    # heal: no more faults, everybody up, then a leader must emerge and new writes commit.
    nemesis_on[0] = False
    sim.crash_after_vote = 0.0
    sim.loss = sim.dup = sim.reorder = 0.0
    sim.heal()
    for n in nodes:
        sim.restart(n)
    limit = sim.steps + heal_steps
    target: int | None = None
    ldr: SimNode | None = None
    while sim.steps < limit:
        if not sim.step():
            break
        if sim.steps % 50:
            continue
        ldr = sim.leader()
        if ldr is None or ldr.core is None:
            continue
        if target is None or ldr.core.term_at(target) is None:
            target = sim.propose(ldr)
            continue
        members = ldr.core.configuration.servers
        if all(sim.nodes[i].fsm_index >= target for i in members):
            break
    else:
        sim.check.fail(
            f"liveness: no leader or write {target} not applied on all members after healing "
            f"(leader {ldr.id if ldr else None})"
        )
    return RunStats(
        seed,
        sim.steps,
        sim.proposed,
        sim.check.max_commit,
        len(sim.check.leaders),
        sim.reads_served,
        sim.snapshots_installed,
        sim.config_changes,
        sim.transfers,
        sim.crashes,
    )

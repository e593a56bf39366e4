"""Focused behaviours of the sans-I/O Raft core, on a tiny synchronous in-memory network.

Each test drives the core through its public API only (tick/step/propose/ready/advance), so
these double as executable documentation of the Ready contract the runtime relies on.
"""

from __future__ import annotations

import contextlib
import random
from collections import deque
from collections.abc import Callable

import msgpack
import pytest

from node.raft.core import (
    ConfigChangeError,
    NotLeader,
    ProgressState,
    ProposalDropped,
    RaftConfig,
    RaftNode,
    ReadState,
    Role,
    encode_config,
)
from node.raft.messages import Message, MessageError, MessageType
from node.raft.types import Configuration, Entry, EntryType, HardState, Server, SnapshotMeta
from tests.sim.raft_network import Disk

MT = MessageType
CFG = RaftConfig(election_ticks=10, heartbeat_ticks=1, max_inflight=4)


def conf(*voters: str, learners: tuple[str, ...] = ()) -> Configuration:
    servers = {i: Server(i, i, i, True) for i in voters}
    servers.update({i: Server(i, i, i, False) for i in learners})
    return Configuration(servers)


class Net:
    """Synchronous delivery; `isolated` nodes neither send nor receive; `drop` filters more."""

    def __init__(
        self, n: int = 3, *, learners: tuple[str, ...] = (), cfg: RaftConfig = CFG
    ) -> None:
        self.cfg = cfg
        ids = [f"n{i}" for i in range(1, n + 1)]
        voters = tuple(i for i in ids if i not in learners)
        self.nodes: dict[str, RaftNode] = {}
        self.disks: dict[str, Disk] = {}
        self.applied: dict[str, list[Entry]] = {}
        self.reads: dict[str, list[ReadState]] = {}
        self.sent: list[Message] = []
        self.queue: deque[Message] = deque()
        self.isolated: set[str] = set()
        self.drop: Callable[[Message], bool] = lambda m: False
        self.hold = False  # keep messages queued (to inspect what is in flight)
        for i in ids:
            self.add(i)
            self.nodes[i].bootstrap(conf(*voters, learners=learners))
        self.flush()

    def add(self, i: str) -> RaftNode:
        d = self.disks.setdefault(i, Disk())
        node = RaftNode(
            i,
            self.cfg,
            hard_state=d.hard_state,
            snapshot=d.snapshot,
            entries=list(d.entries),
            rng=random.Random(i),
            snapshot_data=d.snapshot_data,
        )
        self.nodes[i] = node
        self.applied.setdefault(i, [])
        self.reads.setdefault(i, [])
        return node

    def restart(self, i: str) -> RaftNode:
        return self.add(i)

    def process(self, i: str) -> bool:
        node = self.nodes[i]
        did = False
        while node.has_ready():
            did = True
            rd = node.ready()
            d = self.disks[i]
            if rd.snapshot is not None:
                d.snapshot, d.snapshot_data = rd.snapshot
                d.entries = []
            if rd.entries:
                del d.entries[rd.entries[0].index - d.snapshot.index - 1 :]
                d.entries.extend(rd.entries)
            if rd.hard_state is not None:
                d.hard_state = rd.hard_state
            for m in rd.messages:
                self.sent.append(m)
                self.queue.append(m)
            self.applied[i].extend(rd.committed)
            self.reads[i].extend(rd.read_states)
            node.advance(rd)
        return did

    def flush(self) -> None:
        for _ in range(100_000):
            did = any([self.process(i) for i in self.nodes])
            if self.hold:
                return
            if self.queue:
                m = self.queue.popleft()
                if (
                    m.dst in self.nodes
                    and m.src not in self.isolated
                    and m.dst not in self.isolated
                    and not self.drop(m)
                ):
                    self.nodes[m.dst].step(m)
                did = True
            if not did:
                return
        raise AssertionError("network did not quiesce")

    def tick(self, *ids: str, times: int = 1) -> None:
        for _ in range(times):
            for i in ids or tuple(self.nodes):
                self.nodes[i].tick()
            self.flush()

    def expire_lease(self, *ids: str) -> None:
        """Let the leader lease lapse on ids (cut off meanwhile, so nobody wins an election)."""
        saved = self.isolated
        self.isolated = saved | set(ids)
        self.tick(*ids, times=self.cfg.election_ticks)
        self.isolated = saved

    def elect(self, i: str) -> RaftNode:
        node = self.nodes[i]
        for _ in range(3 * self.cfg.election_ticks):
            node.tick()
            self.flush()
            if node.role is Role.LEADER:
                return node
        raise AssertionError(f"{i} did not become leader")

    def count(self, typ: MessageType, **match: object) -> int:
        items = match.items()
        return sum(
            1 for m in self.sent if m.type is typ and all(getattr(m, k) == v for k, v in items)
        )


# ------------------------------------------------------------------- election


def test_election_with_pre_vote_elects_one_leader_and_commits_a_noop() -> None:
    net = Net(3)
    leader = net.elect("n1")
    assert leader.term == 2  # bootstrap term 1, one real election
    for i in ("n2", "n3"):
        assert net.nodes[i].role is Role.FOLLOWER
        assert net.nodes[i].leader_id == "n1"
        assert net.nodes[i].term == 2
    assert net.count(MT.PRE_VOTE) == 2 and net.count(MT.VOTE) == 2
    noop = [e for e in net.applied["n2"] if e.type is EntryType.NOOP]
    assert [(e.index, e.term) for e in noop] == [(2, 2)]
    assert all(n.commit_index == 2 for n in net.nodes.values())
    assert net.disks["n2"].hard_state == HardState(2, "n1", 2)


def test_single_voter_elects_itself_and_commits_alone() -> None:
    net = Net(1)
    node = net.elect("n1")
    idx = node.propose(b"x")
    net.flush()
    assert node.commit_index == idx
    assert net.applied["n1"][-1].data == b"x"


def test_pre_vote_keeps_a_partitioned_node_from_inflating_terms() -> None:
    net = Net(3)
    net.elect("n1")
    net.isolated = {"n3"}
    net.tick("n3", times=100)
    n3 = net.nodes["n3"]
    assert n3.term == 2, "pre-vote never bumps the term without a quorum"
    assert n3.role is Role.PRE_CANDIDATE
    net.isolated = set()
    net.tick("n1", times=2)
    assert net.nodes["n1"].role is Role.LEADER and net.nodes["n1"].term == 2
    assert net.nodes["n3"].leader_id == "n1" and net.nodes["n3"].role is Role.FOLLOWER


def test_without_pre_vote_the_partitioned_node_does_inflate_terms() -> None:
    net = Net(3, cfg=RaftConfig(election_ticks=10, pre_vote=False))
    net.elect("n1")
    net.isolated = {"n3"}
    net.tick("n3", times=100)
    assert net.nodes["n3"].term > 4  # the contrast that shows what pre-vote buys


def test_check_quorum_steps_down_an_isolated_leader() -> None:
    net = Net(3)
    leader = net.elect("n1")
    net.isolated = {"n1"}
    net.tick("n1", times=CFG.election_ticks - 1)
    assert leader.role is Role.LEADER
    net.tick("n1", times=CFG.election_ticks + 1)
    assert net.nodes["n1"].role is Role.FOLLOWER and leader.leader_id is None
    with pytest.raises(NotLeader):
        leader.propose(b"x")


def test_leader_lease_makes_followers_ignore_votes() -> None:
    net = Net(3)
    net.elect("n1")
    n2 = net.nodes["n2"]
    n2.step(Message(MT.VOTE, "n3", "n2", term=9, log_term=99, index=99))
    n2.step(Message(MT.PRE_VOTE, "n3", "n2", term=9, log_term=99, index=99))
    assert n2.term == 2 and n2.leader_id == "n1"
    rd = n2.ready()
    assert not [m for m in rd.messages if m.type in (MT.VOTE_RESP, MT.PRE_VOTE_RESP)]
    n2.advance(rd)


def test_votes_go_only_to_up_to_date_logs_and_are_persisted_before_the_answer() -> None:
    net = Net(3)
    net.elect("n1")
    net.nodes["n1"].propose(b"a")
    net.flush()
    n2 = net.nodes["n2"]
    n2.tick()
    for _ in range(CFG.election_ticks):  # lease over
        n2.tick()
    n2.step(Message(MT.VOTE, "n3", "n2", term=5, log_term=2, index=2))  # stale log
    rd = n2.ready()
    resp = [m for m in rd.messages if m.type is MT.VOTE_RESP]
    assert resp and resp[0].reject and n2.vote == ""
    n2.advance(rd)
    n2.step(Message(MT.VOTE, "n3", "n2", term=5, log_term=2, index=3))
    rd = n2.ready()
    assert rd.hard_state is not None and rd.hard_state.vote == "n3"  # persisted with the grant
    assert [m.reject for m in rd.messages if m.type is MT.VOTE_RESP] == [False]
    n2.advance(rd)
    n2.step(Message(MT.VOTE, "n1", "n2", term=5, log_term=2, index=3))  # one vote per term
    rd = n2.ready()
    assert [m.reject for m in rd.messages if m.type is MT.VOTE_RESP] == [True]
    n2.advance(rd)


def test_restart_keeps_term_vote_and_log() -> None:
    net = Net(3)
    net.elect("n1")
    net.nodes["n1"].propose(b"a")
    net.flush()
    n2 = net.restart("n2")
    assert (n2.term, n2.vote, n2.last_index) == (2, "n1", 3)
    assert n2.commit_index >= 2
    net.tick(times=3)
    assert net.nodes["n1"].role is Role.LEADER and n2.leader_id == "n1"


# ------------------------------------------------------------------- replication


def test_proposals_between_readies_are_batched_into_one_append() -> None:
    net = Net(3)
    leader = net.elect("n1")
    before = len(net.sent)
    for k in range(5):
        leader.propose(b"%d" % k)
    net.flush()
    apps = [m for m in net.sent[before:] if m.type is MT.APP and m.dst == "n2" and m.entries]
    assert len(apps) == 1
    assert [e.data for e in apps[-1].entries] == [b"0", b"1", b"2", b"3", b"4"]
    assert [e.data for e in net.applied["n3"][-5:]] == [b"0", b"1", b"2", b"3", b"4"]


def test_pipelining_is_bounded_by_max_inflight() -> None:
    net = Net(3)
    leader = net.elect("n1")
    assert leader.progress["n2"].state is ProgressState.REPLICATE
    net.hold = True
    for k in range(10):
        leader.propose(b"%d" % k)
        net.flush()  # one Ready per proposal: one append each, until the window is full
    in_flight = [m for m in net.queue if m.type is MT.APP and m.dst == "n2"]
    assert len(in_flight) == CFG.max_inflight
    net.hold = False
    net.flush()
    net.tick("n1", times=2)
    assert net.nodes["n2"].last_index == leader.last_index
    assert leader.commit_index == leader.last_index


def test_lost_appends_are_recovered_by_probing() -> None:
    net = Net(3)
    leader = net.elect("n1")
    net.drop = lambda m: m.type is MT.APP and m.dst == "n3"
    for k in range(20):
        leader.propose(b"%d" % k)
        net.flush()
    assert net.nodes["n3"].last_index < leader.last_index
    assert leader.commit_index == leader.last_index  # n1+n2 are a quorum
    net.drop = lambda m: False
    net.tick("n1", times=3)
    assert net.nodes["n3"].last_index == leader.last_index
    assert [e.data for e in net.applied["n3"]] == [e.data for e in net.applied["n1"]]


def test_divergent_follower_is_repaired_with_few_round_trips() -> None:
    net = Net(3, cfg=RaftConfig(election_ticks=10, max_entries_per_msg=1000))
    old = net.elect("n1")
    net.isolated = {"n1"}
    for k in range(200):  # never committed: n1 is alone
        old.propose(b"old%d" % k)
    net.flush()
    net.expire_lease("n2", "n3")
    new = net.elect("n2")
    for k in range(50):
        new.propose(b"new%d" % k)
    net.flush()
    assert new.commit_index == new.last_index
    # hand over to n3 while n1 is still away: n3 starts probing n1 at its own log's end
    new.transfer_leadership("n3")
    net.flush()
    new = net.nodes["n3"]
    assert new.role is Role.LEADER and new.progress["n1"].next == new.last_index
    rejects_before = net.count(MT.APP_RESP, src="n1", reject=True)
    net.isolated = set()
    net.tick("n3", times=3)
    assert old.role is Role.FOLLOWER and old.leader_id == "n3"
    assert old.last_index == new.last_index and old.term_at(old.last_index) == new.term
    # 50 mismatching entries, but the hint skips the whole term at once
    assert net.count(MT.APP_RESP, src="n1", reject=True) - rejects_before == 1
    data = [e.data for e in net.applied["n1"] if e.type is EntryType.NORMAL]
    assert data == [b"new%d" % k for k in range(50)]


def test_entries_of_earlier_terms_commit_only_through_a_current_term_entry() -> None:
    """Raft 5.4.2 (figure 8): counting replicas of an old-term entry is not enough."""
    c = conf("n1", "n2", "n3")
    ents = [Entry(1, 1, EntryType.CONFIG, encode_config(c)), Entry(2, 2, EntryType.NORMAL, b"x")]
    node = RaftNode(
        "n1",
        CFG,
        hard_state=HardState(3, "", 1),
        snapshot=SnapshotMeta(),
        entries=ents,
        rng=random.Random(1),
    )
    for _ in range(2 * CFG.election_ticks):
        node.tick()
        if node.role is Role.PRE_CANDIDATE:
            break
    node.step(Message(MT.PRE_VOTE_RESP, "n2", "n1", term=4))
    node.step(Message(MT.VOTE_RESP, "n2", "n1", term=4))
    assert node.role is Role.LEADER and node.term == 4
    rd = node.ready()  # persists the NOOP at 3
    node.advance(rd)
    node.step(Message(MT.APP_RESP, "n2", "n1", term=4, index=2))
    assert node.commit_index == 1, "entry 2 is on a quorum but from term 2: not committed yet"
    node.step(Message(MT.APP_RESP, "n2", "n1", term=4, index=3))
    assert node.commit_index == 3


def test_leader_counts_itself_only_once_its_entries_are_persisted() -> None:
    net = Net(3)
    leader = net.elect("n1")
    idx = leader.propose(b"a")
    # a follower acks before the leader advanced: n2 alone is not a quorum
    leader.step(Message(MT.APP_RESP, "n2", "n1", term=leader.term, index=idx))
    assert leader.commit_index < idx
    net.flush()
    assert leader.commit_index == idx


# ------------------------------------------------------------------- learners and config


def test_learners_replicate_but_never_vote_campaign_or_count() -> None:
    net = Net(4, learners=("n4",))
    leader = net.elect("n1")
    assert net.count(MT.PRE_VOTE, dst="n4") == 0 and net.count(MT.VOTE, dst="n4") == 0
    leader.propose(b"a")
    net.flush()
    assert net.applied["n4"][-1].data == b"a"
    n4 = net.nodes["n4"]
    net.isolated = {"n1"}
    net.tick("n4", times=10 * CFG.election_ticks)
    assert n4.role is Role.FOLLOWER and net.count(MT.PRE_VOTE, src="n4") == 0
    net.isolated = {"n2", "n3"}  # only the learner can answer: no quorum, no commit
    idx = leader.propose(b"b")
    net.flush()
    assert n4.last_index == idx and leader.commit_index < idx


def test_add_learner_then_promote_it() -> None:
    net = Net(3)
    leader = net.elect("n1")
    net.add("n4")
    leader.change_config(leader.configuration.with_server(Server("n4", "n4", "n4", False)))
    net.flush()
    net.tick("n1", times=2)
    n4 = net.nodes["n4"]
    assert n4.configuration.learners == {"n4"} and n4.commit_index == leader.commit_index
    leader.change_config(leader.configuration.with_server(Server("n4", "n4", "n4", True)))
    net.flush()
    assert n4.configuration.voters == {"n1", "n2", "n3", "n4"}
    net.isolated = {"n2", "n3"}  # 2 of 4 voters: no quorum any more
    idx = leader.propose(b"x")
    net.flush()
    assert leader.commit_index < idx


def test_config_change_rules() -> None:
    net = Net(3)
    leader = net.elect("n1")
    c = leader.configuration
    with pytest.raises(NotLeader):
        net.nodes["n2"].change_config(c.without("n3"))
    with pytest.raises(ConfigChangeError):  # two servers at once
        leader.change_config(c.without("n3").without("n2"))
    with pytest.raises(ConfigChangeError):  # nothing changes
        leader.change_config(c)
    net.isolated = {"n2", "n3"}
    leader.change_config(c.with_server(Server("n4", "n4", "n4", False)))
    net.flush()
    with pytest.raises(ConfigChangeError):  # the first one is not committed yet
        leader.change_config(c.with_server(Server("n5", "n5", "n5", False)))
    net.isolated = set()
    net.tick("n1", times=2)
    leader.change_config(leader.configuration.with_server(Server("n5", "n5", "n5", False)))


def test_config_takes_effect_when_appended_and_reverts_on_truncation() -> None:
    net = Net(3)
    old = net.elect("n1")
    net.isolated = {"n1"}
    old.change_config(old.configuration.with_server(Server("n9", "n9", "n9", False)))
    net.flush()
    assert "n9" in old.configuration.servers  # uncommitted, yet in force
    net.expire_lease("n2", "n3")
    net.elect("n2")
    net.isolated = set()
    net.tick("n2", times=3)
    assert old.leader_id == "n2" and "n9" not in old.configuration.servers


def test_removed_leader_steps_down_once_its_removal_commits() -> None:
    net = Net(3)
    leader = net.elect("n1")
    leader.change_config(leader.configuration.without("n1"))
    net.flush()
    assert leader.role is Role.FOLLOWER
    campaigns = net.count(MT.PRE_VOTE, src="n1")
    net.tick(times=4 * CFG.election_ticks)
    leaders = [n for n in net.nodes.values() if n.role is Role.LEADER]
    assert len(leaders) == 1 and leaders[0].id in ("n2", "n3")
    assert net.count(MT.PRE_VOTE, src="n1") == campaigns  # removed: never campaigns


def test_new_leader_must_commit_in_its_term_before_a_config_change() -> None:
    net = Net(3)
    net.elect("n1")
    net.expire_lease("n2", "n3")
    # deliver only votes, not the NOOP appends: n2 wins but has not committed its NOOP
    net.drop = lambda m: m.type is MT.APP
    n2 = net.elect("n2")
    with pytest.raises(ConfigChangeError):
        n2.change_config(n2.configuration.without("n3"))


# ------------------------------------------------------------------- transfer


def test_leadership_transfer_catches_up_then_hands_over() -> None:
    net = Net(3)
    leader = net.elect("n1")
    net.drop = lambda m: m.dst == "n3" and m.type is MT.APP
    for k in range(5):
        leader.propose(b"%d" % k)
    net.flush()
    assert net.nodes["n3"].last_index < leader.last_index
    net.drop = lambda m: False
    net.hold = True
    leader.transfer_leadership("n3")
    with pytest.raises(ProposalDropped):
        leader.propose(b"late")
    net.hold = False
    net.flush()
    n3 = net.nodes["n3"]
    assert n3.role is Role.LEADER and n3.term == 3
    assert leader.role is Role.FOLLOWER and leader.leader_id == "n3"
    assert net.count(MT.TIMEOUT_NOW, dst="n3") == 1


def test_transfer_to_unreachable_target_is_abandoned_after_an_election_timeout() -> None:
    net = Net(3)
    leader = net.elect("n1")
    net.isolated = {"n3"}
    leader.transfer_leadership("n3")
    assert leader.lead_transferee == "n3"
    net.tick("n1", "n2", times=CFG.election_ticks)
    assert leader.lead_transferee is None and leader.role is Role.LEADER
    leader.propose(b"ok")


# ------------------------------------------------------------------- snapshots


def test_lagging_follower_gets_a_snapshot_then_the_rest() -> None:
    net = Net(3)
    leader = net.elect("n1")
    net.isolated = {"n3"}
    for k in range(30):
        leader.propose(b"%d" % k)
    net.flush()
    idx = leader.applied - 5
    leader.compact(leader.snapshot_meta(idx), b"state@%d" % idx)
    assert leader.first_index == idx + 1
    for k in range(3):
        leader.propose(b"after%d" % k)
    net.flush()
    net.isolated = set()
    net.tick("n1", times=3)
    n3 = net.nodes["n3"]
    assert net.count(MT.SNAP, dst="n3") == 1
    assert net.disks["n3"].snapshot.index == idx
    assert net.disks["n3"].snapshot_data == b"state@%d" % idx
    assert n3.first_index == idx + 1 and n3.last_index == leader.last_index
    assert n3.applied == leader.applied
    assert net.applied["n3"][-1].data == b"after2"
    assert n3.configuration == leader.configuration
    # restart from what was persisted: snapshot + entries after it
    n3 = net.restart("n3")
    assert n3.first_index == idx + 1 and n3.last_index == leader.last_index


def test_compaction_refuses_unapplied_or_mismatched_snapshots() -> None:
    net = Net(3)
    leader = net.elect("n1")
    with pytest.raises(ValueError):
        leader.compact(SnapshotMeta(leader.applied + 1, leader.term), b"")
    with pytest.raises(ValueError):
        leader.compact(SnapshotMeta(leader.applied, leader.term + 7), b"")


# ------------------------------------------------------------------- ReadIndex


def test_read_index_on_the_leader_needs_a_heartbeat_quorum() -> None:
    net = Net(3)
    leader = net.elect("n1")
    leader.read_index(b"r1")
    net.flush()
    assert net.reads["n1"] == [ReadState(b"r1", leader.commit_index)]
    net.isolated = {"n1"}
    leader.read_index(b"r2")
    net.flush()
    net.tick("n1", times=3)
    assert [r.ctx for r in net.reads["n1"]] == [b"r1"], "no quorum ack, no read"


def test_reads_arriving_together_share_one_heartbeat_round() -> None:
    net = Net(3)
    leader = net.elect("n1")
    net.sent.clear()
    for i in range(10):
        leader.read_index(b"r%d" % i)
    net.flush()
    heartbeats = [m for m in net.sent if m.type == MessageType.HEARTBEAT and m.src == "n1"]
    assert len(heartbeats) == 2  # one per follower, not one per read
    assert [r.ctx for r in net.reads["n1"]] == [b"r%d" % i for i in range(10)]
    assert {r.index for r in net.reads["n1"]} == {leader.commit_index}


def test_read_index_on_a_follower_is_forwarded_to_the_leader() -> None:
    net = Net(3)
    leader = net.elect("n1")
    idx = leader.propose(b"w")
    net.flush()
    net.nodes["n2"].read_index(b"fr")
    net.flush()
    assert net.reads["n2"] == [ReadState(b"fr", idx)]
    with pytest.raises(NotLeader):
        Net(3).nodes["n2"].read_index(b"x")  # nobody leads yet


def test_new_leader_answers_reads_only_after_its_noop_commits() -> None:
    net = Net(3)
    net.drop = lambda m: m.type is MT.APP
    leader = net.elect("n1")
    leader.read_index(b"early")
    net.tick("n1", times=2)
    assert net.reads["n1"] == []
    net.drop = lambda m: False
    net.tick("n1", times=2)
    assert net.reads["n1"] == [ReadState(b"early", 2)]


# ------------------------------------------------------------------- wire and garbage


def test_message_wire_roundtrip() -> None:
    m = Message(
        MT.APP,
        "a",
        "b",
        term=3,
        log_term=2,
        index=7,
        entries=[Entry(8, 2, EntryType.NORMAL, b"x"), Entry(9, 3, EntryType.NOOP)],
        commit=6,
        snapshot=SnapshotMeta(5, 2, conf("a", "b")),
        snapshot_data=b"snap",
        context=b"ctx",
    )
    assert Message.decode(m.encode()) == m
    assert Message.from_wire(m.to_wire()) == m


@pytest.mark.parametrize(
    "mutate",
    [
        lambda w: w[:5],
        lambda w: [99, *w[1:]],
        lambda w: [w[0], 5, *w[2:]],
        lambda w: [*w[:3], -1, *w[4:]],
        lambda w: [*w[:3], True, *w[4:]],
        lambda w: [*w[:6], [[8, 2, 0]], *w[7:]],
        lambda w: [*w[:6], [[9, 2, 0, b""]], *w[7:]],  # not contiguous with index 7
        lambda w: [*w[:6], [[8, 1, 0, b""]], *w[7:]],  # term below log_term
        lambda w: [*w[:6], [[8, 2, 7, b""]], *w[7:]],  # unknown entry type
        lambda w: [*w[:8], "yes", *w[9:]],
        lambda w: [*w[:10], ["junk"], *w[11:]],
        lambda w: [*w[:12], 5],
        lambda w: {"a": 1},
        lambda w: None,
    ],
)
def test_malformed_messages_raise_message_error(mutate: Callable[[list[object]], object]) -> None:
    good = Message(MT.APP, "a", "b", term=3, log_term=2, index=7).to_wire()
    with pytest.raises(MessageError):
        Message.from_wire(mutate(good))


def test_garbage_bytes_raise_message_error() -> None:
    rng = random.Random(5)
    good = Message(MT.APP, "a", "b", term=3, index=1, entries=[Entry(2, 3)]).encode()
    for _ in range(2000):
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        with contextlib.suppress(MessageError):
            Message.decode(bytes(b))
    with pytest.raises(MessageError):
        Message.decode(msgpack.packb([1, 2, 3]))


def test_core_ignores_stale_and_nonsensical_messages() -> None:
    net = Net(3)
    leader = net.elect("n1")
    n2 = net.nodes["n2"]
    before = (n2.term, n2.last_index, n2.commit_index)
    junk = [
        Message(MT.APP, "n1", "n3", term=2),  # not for us
        Message(MT.APP, "n2", "n2", term=2),  # from ourselves
        Message(MT.APP, "n1", "n2", term=1, index=0, entries=[Entry(1, 1)]),  # stale term
        Message(MT.APP, "n1", "n2", term=2, index=5, entries=[Entry(9, 2)]),  # gap
        Message(MT.APP_RESP, "n3", "n2", term=2, index=50),  # not a leader
        Message(MT.HEARTBEAT_RESP, "zz", "n1", term=2, context=b"\x00" * 8),
        Message(MT.APP_RESP, "zz", "n1", term=2, index=10_000),  # unknown peer
        Message(MT.APP_RESP, "n2", "n1", term=2, index=10_000, reject=True, reject_hint=9_999),
        Message(MT.SNAP, "n1", "n2", term=2),  # no snapshot in it
        Message(MT.READ_INDEX_RESP, "n3", "n2", term=2, index=1, context=b"x"),  # not leader
        Message(MT.TIMEOUT_NOW, "n3", "n2", term=1),
    ]
    for m in junk:
        (leader if m.dst == "n1" else n2).step(m)
    net.flush()
    assert (n2.term, n2.last_index, n2.commit_index) == before
    assert leader.role is Role.LEADER and net.reads["n2"] == []
    leader.propose(b"still fine")
    net.flush()
    assert net.applied["n2"][-1].data == b"still fine"


def test_a_second_ready_before_advance_is_refused() -> None:
    net = Net(1)
    node = net.elect("n1")
    node.propose(b"x")
    rd = node.ready()
    assert not node.has_ready()
    with pytest.raises(Exception, match="advance"):
        node.ready()
    node.advance(rd)


def test_random_well_formed_nonsense_never_crashes_the_core() -> None:
    """Arbitrary (decodable) messages may confuse Raft, but must never raise out of step()."""
    rng = random.Random(11)
    net = Net(3, learners=("n3",))
    net.elect("n1")
    ids = ["n1", "n2", "n3", "zz"]
    snap = SnapshotMeta(3, 2, conf("n1", "n2"))
    for k in range(5000):
        index = rng.randint(0, 12)
        log_term = rng.randint(0, 4)
        n_ent = rng.choice((0, 0, 1, 3))
        terms = sorted(rng.randint(max(log_term, 1), 5) for _ in range(n_ent))
        wire = Message(
            MessageType(rng.randint(1, len(MessageType))),
            rng.choice(ids),
            rng.choice(ids[:3]),
            term=rng.randint(0, 5),
            log_term=log_term,
            index=index,
            entries=[
                Entry(index + 1 + j, t, EntryType(rng.randint(0, 2)), b"e%d" % k)
                for j, t in enumerate(terms)
            ],
            commit=rng.randint(0, 15),
            reject=rng.random() < 0.3,
            reject_hint=rng.randint(0, 12),
            snapshot=snap if rng.random() < 0.1 else None,
            snapshot_data=b"s",
            context=rng.choice((b"", b"transfer", b"\x00" * 7 + b"\x01")),
        ).to_wire()
        m = Message.from_wire(wire)
        net.nodes[m.dst].step(m)
        if k % 7 == 0:
            net.nodes[rng.choice(ids[:3])].tick()
        net.flush()


def test_campaign_elects_a_sole_voter_without_waiting_for_a_timeout() -> None:
    net = Net(1)
    node = net.nodes["n1"]
    assert node.role is not Role.LEADER
    node.campaign()
    net.flush()
    assert node.role is Role.LEADER and node.leader_id == "n1"


def test_campaign_in_a_cluster_runs_a_normal_election() -> None:
    net = Net(3)
    net.nodes["n2"].campaign()
    net.flush()
    assert net.nodes["n2"].role is Role.LEADER
    assert {n.leader_id for n in net.nodes.values()} == {"n2"}
    net.nodes["n2"].campaign()  # a leader ignores it
    net.flush()
    assert net.nodes["n2"].role is Role.LEADER


def test_a_dead_leader_is_replaced_within_ticks_when_the_transport_sees_it_gone() -> None:
    net = Net(3)
    net.elect("n1")
    net.tick(times=2)
    net.isolated = {"n1"}  # the leader's process died
    for i in ("n2", "n3"):
        net.nodes[i].leader_unreachable()
        assert net.nodes[i].leader_id is None
    # n2 ranks first among the survivors: it campaigns on its next tick and n3, whose lease
    # ended with the same signal, votes for it; n3 would have waited two ticks more
    net.tick("n2", "n3")
    assert net.nodes["n2"].role is Role.LEADER
    assert net.nodes["n3"].leader_id == "n2" and net.nodes["n3"].role is Role.FOLLOWER


def test_a_false_leader_unreachable_alarm_does_not_disrupt_the_leader() -> None:
    net = Net(3)
    leader = net.elect("n1")
    term = leader.term
    net.nodes["n2"].leader_unreachable()  # n2 alone thinks the leader is gone
    net.tick(times=5)
    # n3 still hears n1 (its lease holds) and refuses the pre-vote: no new term, same leader
    assert leader.role is Role.LEADER and leader.term == term
    assert net.nodes["n2"].leader_id == "n1" and net.nodes["n3"].leader_id == "n1"
    net.nodes["n1"].leader_unreachable()  # a leader ignores it
    assert leader.role is Role.LEADER

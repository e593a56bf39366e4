"""Jepsen-style linearizability test of the replicated KV store under faults.

Five agents on five network-namespace hosts (--bootstrap-expect 3; autopilot then makes all
five voters). Client threads, each bound to one agent's HTTP API, do consistent reads, writes
of unique values and index-based compare-and-set on a few keys while a seeded nemesis
partitions the network (random halves, or the leader cut off), pauses a node (SIGSTOP) and
crashes + restarts one (SIGKILL), for about a minute. After healing, every key gets a final
consistent read, and the whole history must be linearizable (tests/harness/linearizability).

The nemesis seed is printed and can be fixed with MESHNODE_JEPSEN_SEED=<int>.

The fast tests at the top drive the same client code against an in-memory fake of the KV
API, so the op recording (CAS mapping, ok/fail/info classification) is checked by itself and
a stale read that a buggy store would serve is shown to be rejected.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import socket
import time
import urllib.parse
from base64 import b64encode
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.agents import AgentProc, NetnsAgentCluster, wait_until
from tests.harness.kvclient import (
    ClientStats,
    KVClient,
    KVError,
    LockedRecorder,
    RegisterClient,
    RegisterWorkload,
    Response,
    find_leader,
    raft_args,
    raft_servers,
    start_all,
    use_retry_join,
)
from tests.harness.linearizability import Operation, Outcome, check
from tests.harness.netns import NetnsCluster

N_AGENTS = 5
KEYS = ["jepsen/a", "jepsen/b", "jepsen/c", "jepsen/d"]
N_CLIENTS = 6
NEMESIS_SECONDS = 60.0
STEP_SECONDS = (3.5, 6.5)
CLIENT_TIMEOUT = 2.5
# the run must have done real work: ok ops overall, and ok writes while faults were injected
MIN_OK_WRITES = 200  # plain writes + successful cas
MIN_OK_READS = 200
MIN_OK_WRITES_UNDER_FAULTS = 100


# ----- an in-memory fake of the KV HTTP API (unit tests of the client and recorder) -------------


@dataclass
class FakeStore:
    """Consul-shaped KV with a global index; `stale` freezes what reads see (a buggy read
    path), `fail_put` makes the next PUT answer an error after (optionally) applying it."""

    data: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    index: int = 0
    stale: dict[str, tuple[str, int, int]] | None = None
    fail_put: tuple[int, str, bool] | None = None  # (status, body, applied anyway)
    before_put: Callable[[FakeStore], None] | None = None  # e.g. another client's write


class FakeKV(KVClient):
    def __init__(self, store: FakeStore) -> None:
        super().__init__("http://fake.invalid:1")
        self.store = store

    def request(
        self, method: str, path: str, body: bytes | None = None, *, timeout: float | None = None
    ) -> Response:
        u = urllib.parse.urlsplit(path)
        assert u.path.startswith("/v1/kv/"), path
        key = urllib.parse.unquote(u.path[len("/v1/kv/"):])
        q = urllib.parse.parse_qs(u.query, keep_blank_values=True)
        s = self.store
        if method == "GET":
            assert "consistent" in q, "register clients must read with ?consistent"
            view = s.stale if s.stale is not None else s.data
            if key not in view:
                return _resp(404, b"")
            v, ci, mi = view[key]
            entry = {"Key": key, "Value": b64encode(v.encode()).decode(), "Flags": 0,
                     "CreateIndex": ci, "ModifyIndex": mi, "LockIndex": 0}
            return _resp(200, json.dumps([entry]).encode())
        assert method == "PUT" and body is not None
        if s.before_put is not None:
            s.before_put(s)
        cur = s.data.get(key)
        applied = True
        if "cas" in q:
            want = int(q["cas"][0])
            applied = (cur is None) if want == 0 else (cur is not None and cur[2] == want)
        fail, s.fail_put = s.fail_put, None
        if applied and (fail is None or fail[2]):
            s.index += 1
            s.data[key] = (body.decode(), cur[1] if cur else s.index, s.index)
        if fail is not None:
            return _resp(fail[0], fail[1].encode())
        return _resp(200, b"true" if applied else b"false")


def _resp(status: int, body: bytes) -> Response:
    return Response(status, body, {})


def make_client(store: FakeStore, rec: LockedRecorder, ids: itertools.count[int]) -> RegisterClient:
    return RegisterClient(FakeKV(store), rec, ids)


def test_cas_mapping_on_a_correct_store_is_linearizable() -> None:
    store, rec, ids = FakeStore(), LockedRecorder(), itertools.count()
    c1, c2 = make_client(store, rec, ids), make_client(store, rec, ids)
    assert c1.read("k") == ("ok", None)
    assert c1.cas("k", None, "a") == "ok"  # create-if-absent: ?cas=0
    assert rec.history[-1].output is True
    assert c2.cas("k", None, "b") == "ok"  # the key exists now: a mismatch seen by the read
    assert rec.history[-1].output is False
    assert c2.cas("k", "a", "c") == "ok" and rec.history[-1].output is True
    assert c1.write("k", "d") == "ok"
    assert c1.read("k") == ("ok", "d")
    ops = rec.history
    assert [o.status for o in ops] == ["ok"] * len(ops)
    assert check(ops, time_budget=5).ok

    def other_client_writes(s: FakeStore) -> None:
        s.index += 1
        s.data["k"] = ("e", s.data["k"][1], s.index)
        s.before_put = None

    # the index moves between the cas's read and its PUT: the PUT answers false, recorded
    # as a compare that failed (the register no longer held "d" when the PUT applied)
    store.before_put = other_client_writes
    assert c1.cas("k", "d", "f") == "ok" and rec.history[-1].output is False
    assert store.data["k"][0] == "e"


def test_indeterminate_write_takes_a_new_process_and_may_apply() -> None:
    store, rec, ids = FakeStore(), LockedRecorder(), itertools.count()
    c = make_client(store, rec, ids)
    p0 = c.process
    store.fail_put = (500, "timed out waiting for the write to apply", True)  # applied anyway
    assert c.write("k", "a") == "info"
    assert c.process != p0  # the checker's rule: a process never has two open ops
    assert c.read("k") == ("ok", "a")
    store.fail_put = (500, "No cluster leader", False)
    assert c.write("k", "b") == "fail"
    store.fail_put = (413, "Value exceeds 524288 byte limit", False)
    assert c.write("k", "b") == "fail"
    assert c.read("k") == ("ok", "a")
    assert rec.check(time_budget=5).ok
    # if the "No cluster leader" write had been applied, the contract was broken: rejected
    store.fail_put = (500, "No cluster leader", True)
    assert c.write("k", "z") == "fail"
    assert c.read("k") == ("ok", "z")
    res = rec.check(time_budget=5)
    assert res.outcome is Outcome.FAIL, str(res)


def test_stale_read_after_acknowledged_write_is_rejected() -> None:
    """A store that acknowledges writes but serves reads from an old snapshot."""
    store, rec, ids = FakeStore(), LockedRecorder(), itertools.count()
    writer, reader = make_client(store, rec, ids), make_client(store, rec, ids)
    assert writer.write("k", "a") == "ok"
    assert reader.read("k") == ("ok", "a")
    store.stale = dict(store.data)  # reads stop seeing new writes
    assert writer.write("k", "b") == "ok"
    assert reader.read("k") == ("ok", "a")  # stale: "b" was acknowledged before this read
    res = rec.check(time_budget=5)
    assert res.outcome is Outcome.FAIL, str(res)
    bad = res.failed_key
    assert bad is not None and bad.blocked is not None
    assert bad.blocked.kind == "read" and bad.blocked.output == "a"
    # the same ops with the read overlapping the write would be fine: only real time decides
    ops = rec.history
    ops[-1].call = ops[-2].call
    assert check(ops, time_budget=5).ok


def test_lost_cas_is_rejected() -> None:
    """A cas acknowledged `true` whose value a later consistent read does not show."""
    store, rec, ids = FakeStore(), LockedRecorder(), itertools.count()
    c = make_client(store, rec, ids)
    assert c.write("k", "a") == "ok"
    store.stale = dict(store.data)
    assert c.cas("k", "a", "b") == "ok" and rec.history[-1].output is True
    store.data = dict(store.stale)  # the acknowledged cas is lost (a rollback)
    store.stale = None
    assert c.read("k") == ("ok", "a")
    assert rec.check(time_budget=5).outcome is Outcome.FAIL


def test_transport_errors_are_classified() -> None:
    """Connection refused: the request never left, a write cannot have applied (fail).
    Accepted but never answered: it may have applied (info)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(KVError) as refused:
        KVClient(f"http://127.0.0.1:{port}", 1.0).put("k", "v")
    assert refused.value.status is None and not refused.value.sent
    assert refused.value.write_outcome() == "fail"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # never accepted: the kernel completes the handshake anyway
        port = listener.getsockname()[1]
        with pytest.raises(KVError) as hung:
            KVClient(f"http://127.0.0.1:{port}", 0.3).put("k", "v")
    assert hung.value.status is None and hung.value.sent
    assert hung.value.write_outcome() == "info"
    assert KVError(500, "timed out applying the write").write_outcome() == "info"
    assert KVError(500, "rpc error: connection lost").write_outcome() == "info"
    assert KVError(500, "No cluster leader").write_outcome() == "fail"
    assert KVError(500, "No cluster leader").write_outcome(no_leader_is_definite=False) == "info"


# ----- the cluster test ----------------------------------------------------------------------


class Nemesis:
    """Seeded faults on a NetnsAgentCluster; every action is logged with its time."""

    def __init__(
        self, net: NetnsCluster, cluster: NetnsAgentCluster, rng: random.Random, t0: float
    ) -> None:
        self.net = net
        self.cluster = cluster
        self.rng = rng
        self.t0 = t0
        self.paused: set[int] = set()
        self.partitioned = False
        self.events: list[str] = []

    def log(self, what: str) -> None:
        """Kept for the failure report, and printed (pytest shows it when the test fails)."""
        line = f"[{time.monotonic() - self.t0:8.3f}] {what}"
        self.events.append(line)
        print("nemesis", line, flush=True)

    def _hosts(self) -> list[int]:
        return [a.host for a in self.cluster.agents if a.host is not None]

    def _target(self) -> tuple[int, str]:
        """The leader half of the time (when one is known), else a random host; and a label."""
        if self.rng.random() < 0.5:
            paused = [self.cluster.agent_on(h) for h in self.paused]
            leader = find_leader(self.cluster.agents, skip=paused, timeout=0.5)
            if leader is not None and leader.host is not None:
                return leader.host, f"node{leader.host} (leader)"
        h = self.rng.choice(self._hosts())
        return h, f"node{h}"

    def step(self) -> None:
        action = self.rng.choice(["partition", "partition", "heal", "pause", "kill"])
        getattr(self, action)()

    def partition(self) -> None:
        self.net.heal()
        hosts = self._hosts()
        first, label = self._target()
        minority = {first}
        if self.rng.random() < 0.5:
            minority.add(self.rng.choice([h for h in hosts if h not in minority]))
        majority = [h for h in hosts if h not in minority]
        for a in minority:
            for b in majority:
                self.net.partition_pair(a, b)
        self.partitioned = True
        self.log(f"partition {sorted(minority)} | {majority}; picked {label}")

    def heal(self) -> None:
        self.net.heal()
        self.partitioned = False
        self.log("heal")

    def pause(self) -> None:
        self.resume_all()
        h, label = self._target()
        self.cluster.agent_on(h).pause()
        self.paused.add(h)
        self.log(f"pause {label} (SIGSTOP)")

    def resume_all(self) -> None:
        for h in sorted(self.paused):
            self.cluster.agent_on(h).resume()
            self.log(f"resume node{h} (SIGCONT)")
        self.paused.clear()

    def kill(self) -> None:
        h, label = self._target()
        a = self.cluster.agent_on(h)
        a.kill9()
        self.paused.discard(h)
        self.log(f"kill -9 {label}")
        time.sleep(self.rng.uniform(0.5, 2.0))
        a.start()
        a.wait_ready(20)
        self.log(f"restarted node{h}")

    def stop(self) -> None:
        """Heal the network, resume paused nodes, restart any that are down."""
        self.heal()
        self.resume_all()
        for a in self.cluster.agents:
            if not a.running:
                a.start()
                a.wait_ready(20)
                self.log(f"restarted {a.name}")


def voters_ready(agents: Sequence[AgentProc], n: int) -> bool:
    leader = find_leader(agents)
    if leader is None:
        return False
    servers = raft_servers(leader)
    voters = [s for s in servers if s["Voter"]]
    if len(voters) == n:
        return True
    raise AssertionError(f"configuration: {servers}")


def same_leader_everywhere(agents: Sequence[AgentProc]) -> str:
    seen = {a.name: KVClient(a.http_base, 1.0).leader() for a in agents}
    leaders = set(seen.values())
    if len(leaders) == 1 and "" not in leaders:
        return leaders.pop()
    raise AssertionError(f"leader seen by each agent: {seen}")


def jepsen_seed() -> int:
    raw = os.environ.get("MESHNODE_JEPSEN_SEED")
    return int(raw) if raw else random.SystemRandom().randrange(2**32)


def failure_report(
    rec: LockedRecorder, result_text: str, bad_key: object, blocked: Operation | None,
    t0: float, seed: int, nemesis: Nemesis, agents: Sequence[AgentProc], dump: Path,
) -> str:  # fmt: skip
    ops = sorted((o for o in rec.history if o.key == bad_key), key=lambda o: o.call)
    if blocked is not None:
        lo, hi = blocked.call - 2.0, (blocked.ret or blocked.call) + 0.5
        ops = [o for o in ops if o.call <= hi and (o.status == "info" or (o.ret or 0) >= lo)]
        if len(ops) > 150:  # the 150 closest to the op that could not be linearized
            ops = sorted(ops, key=lambda o: abs(o.call - blocked.call))[:150]
            ops.sort(key=lambda o: o.call)
    lines = [
        f"MESHNODE_JEPSEN_SEED={seed} (rerun with this to replay the nemesis schedule)",
        f"full history: {dump}",
        result_text,
        f"--- ops on {bad_key!r} overlapping [blocked call - 2 s, blocked return + 0.5 s] "
        f"({len(ops)} shown; >> marks the op that cannot be linearized) ---",
        *((">> " if o is blocked else "   ") + rec.describe(o, t0) for o in ops),
        "--- nemesis ---",
        *nemesis.events,
        "--- raft leader changes per agent ---",
    ]
    for a in agents:
        changes = [ln for ln in a.log_text().splitlines() if "raft.leader" in ln]
        lines.append(f"{a.name}: " + " || ".join(changes[-15:]))
    return "\n".join(lines)


@pytest.mark.netns
@pytest.mark.cluster
@pytest.mark.timeout(240)
def test_jepsen_register_linearizable_under_partitions_pauses_crashes(
    netns_cluster: Callable[..., NetnsCluster], tmp_path: Path
) -> None:
    seed = jepsen_seed()
    print(f"MESHNODE_JEPSEN_SEED={seed}")
    rng = random.Random(seed)
    net = netns_cluster(N_AGENTS)
    with NetnsAgentCluster(net, tmp_path, extra_args=raft_args(3), log_level="info") as cluster:
        agents = cluster.agents
        use_retry_join(agents)
        start_all(agents)
        wait_until(lambda: voters_ready(agents, N_AGENTS), 60, 0.5, desc="5 raft voters")

        rec = LockedRecorder()
        ids = itertools.count()
        stats = ClientStats()
        # clients spread over all agents: most of them are followers at any time
        clients = [
            RegisterClient(KVClient(agents[i % N_AGENTS].http_base, CLIENT_TIMEOUT), rec, ids,
                           stats=stats)
            for i in range(N_CLIENTS)
        ]  # fmt: skip
        workload = RegisterWorkload(clients, KEYS, seed=seed)
        liveness: list[str] = []
        t0 = time.monotonic()
        nemesis = Nemesis(net, cluster, rng, t0)
        workload.start()
        try:
            end = t0 + NEMESIS_SECONDS
            time.sleep(2.0)  # a fault-free start
            t_faults = time.monotonic()
            while time.monotonic() < end:
                nemesis.step()
                time.sleep(max(0.0, min(rng.uniform(*STEP_SECONDS), end - time.monotonic())))
            nemesis.stop()
            t_healed = time.monotonic()
            try:
                wait_until(lambda: same_leader_everywhere(agents), 30, 0.5,
                           desc="one leader after healing")
                nemesis.log("healed; cluster has a leader")
            except AssertionError as e:  # liveness: reported after the safety check
                liveness.append(str(e))
                nemesis.log("healed; NOT every agent knows the leader")
            time.sleep(4.0)  # fault-free tail: the clients see the healed cluster
        finally:
            try:
                nemesis.stop()
            finally:
                workload.stop(timeout=3 * CLIENT_TIMEOUT + 5)

        # a final consistent read of every key (retried; a failed read is recorded as "fail",
        # which the checker ignores)
        finals = [RegisterClient(KVClient(a.http_base, CLIENT_TIMEOUT), rec, ids, stats=stats)
                  for a in agents]  # fmt: skip
        for key in KEYS:
            turn = itertools.cycle(finals)  # through any agent that answers

            def read_ok(key: str = key, turn: Iterator[RegisterClient] = turn) -> bool:
                return next(turn).read(key)[0] == "ok"

            try:
                wait_until(read_ok, 20, 0.1, desc=f"final read of {key}")
            except AssertionError as e:
                liveness.append(str(e))
        nemesis.log("final reads done")

        dump = tmp_path / "history.jsonl"
        rec.dump(str(dump))
        counts = {f"{k}/{s}": n for (k, s), n in sorted(stats.counts.items())}
        print(f"ops: {counts} in {time.monotonic() - t0:.1f}s")
        assert not workload.crashes, workload.crashes
        assert not stats.anomalies, stats.anomalies[:20]

        result = rec.check(time_budget=45)
        print(str(result).splitlines()[0])
        if not result.ok:
            bad = result.failed_key
            pytest.fail(
                failure_report(
                    rec, str(result), bad.key if bad else None, bad.blocked if bad else None,
                    t0, seed, nemesis, agents, dump,
                ) + "".join(f"\nalso (liveness): {x}" for x in liveness),
                pytrace=False,
            )  # fmt: skip
        ok_writes = [
            o for o in rec.history
            if o.status == "ok" and (o.kind == "write" or (o.kind == "cas" and o.output is True))
        ]  # fmt: skip
        under_faults = [o for o in ok_writes if t_faults <= o.call <= t_healed]
        print(f"ok writes {len(ok_writes)} ({len(under_faults)} under faults), "
              f"ok reads {stats.ok('read')}")  # fmt: skip
        assert not liveness, "\n".join([f"seed {seed}", *liveness, *nemesis.events])
        assert len(ok_writes) >= MIN_OK_WRITES, (counts, f"seed {seed}")
        assert len(under_faults) >= MIN_OK_WRITES_UNDER_FAULTS, (counts, f"seed {seed}")
        assert stats.ok("read") >= MIN_OK_READS, (counts, f"seed {seed}")

"""Snapshot/restore round trips, checked with random command sequences (hypothesis).

The property: apply a random prefix to A, restore A's snapshot into B (which held other data),
then feed both the same suffix -- every result, every read and the final snapshot must match.
A store rebuilt from a snapshot also checks that the incrementally kept secondary indexes (and
their rollback) agree with indexes built from scratch.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.state import StateStore
from node.state import commands as c
from tests.harness.state import StoreDriver

SIDS = ["aaaaaaaa-0000-0000-0000-000000000001", "bbbbbbbb-0000-0000-0000-000000000002"]
KEYS = ["a", "a/b", "a/c", "b", "b/x/y"]
NODES = ["n1", "n2"]

keys = st.sampled_from(KEYS)
vals = st.binary(max_size=6)
idx = st.integers(min_value=0, max_value=40)
now = st.integers(min_value=0, max_value=60).map(float)
sids = st.sampled_from(SIDS)
nodes = st.sampled_from(NODES)
status = st.sampled_from(["passing", "warning", "critical"])

kv_txn_op = st.one_of(
    st.builds(lambda k, v: c.txn_kv("set", k, value=v), keys, vals),
    st.builds(lambda k, v, i: c.txn_kv("cas", k, value=v, index=i), keys, vals, idx),
    st.builds(lambda k, s: c.txn_kv("lock", k, value=b"L", session=s), keys, sids),
    st.builds(lambda k, s: c.txn_kv("unlock", k, session=s), keys, sids),
    st.builds(lambda k: c.txn_kv("get", k), keys),
    st.builds(lambda k: c.txn_kv("get-tree", k), st.sampled_from(["a/", "b", ""])),
    st.builds(lambda k, i: c.txn_kv("check-index", k, index=i), keys, idx),
    st.builds(lambda k: c.txn_kv("delete", k), keys),
    st.builds(lambda k, i: c.txn_kv("delete-cas", k, index=i), keys, idx),
    st.builds(
        lambda i, v: c.txn_table("cas", "intentions", "x", value={"v": v}, index=i), idx, vals
    ),
    st.builds(
        lambda v, n, i: c.txn_node(v, n, address="10.0.0.7", index=i),
        st.sampled_from(["set", "cas", "get", "delete", "delete-cas"]),
        nodes,
        idx,
    ),
    st.builds(
        lambda v, n, name, i: c.txn_service(
            v, n, {"Service": name} if v in ("set", "cas") else None, service_id=name, index=i
        ),
        st.sampled_from(["set", "cas", "get", "delete", "delete-cas"]),
        nodes,
        st.sampled_from(["web", "db"]),
        idx,
    ),
    st.builds(
        lambda v, n, s, i: c.txn_check(
            v,
            n,
            {"CheckID": "serfHealth", "Status": s} if v in ("set", "cas") else None,
            check_id="serfHealth",
            index=i,
        ),
        st.sampled_from(["set", "cas", "get", "delete", "delete-cas"]),
        nodes,
        status,
        idx,
    ),
    st.builds(lambda s: c.txn_session("delete", s), sids),
)


def _service(node: str, name: str | None) -> dict[str, Any] | None:
    return None if name is None else {"ID": name, "Service": name, "Tags": [node], "Port": 1}


def _register(node: str, svc: str | None, checks: list[tuple[str, str]], t: float) -> bytes:
    chks = [
        {"CheckID": cid, "Status": s, "ServiceID": svc if cid == "svc" and svc else ""}
        for cid, s in checks
        if cid != "svc" or svc
    ]
    return c.register(node, "10.0.0.1", service=_service(node, svc), checks=chks, now=t)


commands = st.one_of(
    st.builds(lambda k, v, f: c.kv_set(k, v, flags=f), keys, vals, st.integers(0, 2**64 - 1)),
    st.builds(c.kv_cas, keys, vals, idx),
    st.builds(lambda k, v, s, t: c.kv_lock(k, v, s, now=t), keys, vals, sids, now),
    st.builds(c.kv_unlock, keys, vals, sids),
    st.builds(c.kv_delete, keys),
    st.builds(c.kv_delete_cas, keys, idx),
    st.builds(c.kv_delete_tree, st.sampled_from(["a/", "a", "b/", ""])),
    st.builds(c.tombstone_reap, idx),
    st.builds(lambda ops, t: c.txn(ops, now=t), st.lists(kv_txn_op, min_size=1, max_size=4), now),
    st.builds(
        lambda s, n, chk, beh, d, ttl: c.session_create(
            s, n, node_checks=chk, behavior=beh, lock_delay_ns=d, ttl=ttl
        ),
        sids,
        nodes,
        st.sampled_from([[], ["serfHealth"]]),
        st.sampled_from(["release", "delete"]),
        st.sampled_from([0, 5_000_000_000]),
        st.sampled_from(["", "30s"]),
    ),
    st.builds(lambda s, t: c.session_destroy(s, now=t), sids, now),
    st.builds(
        _register,
        nodes,
        st.sampled_from([None, "web", "db"]),
        st.lists(st.tuples(st.sampled_from(["serfHealth", "svc"]), status), max_size=2),
        now,
    ),
    st.builds(
        lambda n, s, ch, t: c.deregister(n, service_id=s, check_id=ch, now=t),
        nodes,
        st.sampled_from(["", "web", "db"]),
        st.sampled_from(["", "serfHealth", "svc"]),
        now,
    ),
    st.builds(
        lambda i, v, cas: c.table_upsert("intentions", i, {"v": v}, cas=cas),
        st.sampled_from(["x", "y"]),
        vals,
        st.one_of(st.none(), idx),
    ),
    st.builds(lambda i: c.table_delete("ca_roots", i), st.sampled_from(["x", "y"])),
    st.sampled_from([b"\x00", msgpack.packb({"op": "kv_set", "key": 5})]),
)


# Nodes and live sessions up front, so locks, lock-delays and invalidations actually happen.
SETUP = [
    *(
        c.register(n, "10.0.0.1", checks=[{"CheckID": "serfHealth", "Status": "passing"}], now=0.0)
        for n in NODES
    ),
    c.session_create(SIDS[0], "n1", lock_delay_ns=5_000_000_000),
    c.session_create(SIDS[1], "n2", behavior="delete", node_checks=[]),
]


def reads(s: StateStore) -> Any:
    """Everything a client can observe through the read API."""
    cg = s.catalog
    return {
        "index": s.index,
        "tables": {t: s.table_index(t) for t in
                   ("kvs", "tombstones", "sessions", "nodes", "services", "checks",
                    "intentions", "ca_roots", "ca_config")},
        "kv": s.kv.list_prefix(""),
        "keys": s.kv.keys("", "/"),
        "list_index": [s.kv.list_index(p) for p in ("", "a", "a/", "b/", "zz")],
        "lock_delay": [s.kv.lock_delay_until(k) for k in KEYS],
        "held": [s.kv.held_by(x) for x in SIDS],
        "sessions": s.sessions.list_all(),
        "by_node": [s.sessions.sessions_to_invalidate_for_node(n) for n in NODES],
        "by_check": [s.sessions.sessions_to_invalidate_for_check(n, ch)
                     for n in NODES for ch in ("serfHealth", "svc")],
        "nodes": cg.list_nodes(),
        "services": cg.list_services(),
        "svc_nodes": [cg.service_nodes(x) for x in ("web", "db")],
        "health": [
            cg.health_service(x, passing_only=p) for x in ("web", "db") for p in (False, True)
        ],
        "checks": [cg.checks_in_state(x) for x in ("any", "passing", "critical")],
        "node_checks": [cg.node_checks(n) for n in NODES],
        "intentions": s.tables.list_rows("intentions"),
    }  # fmt: skip


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.lists(commands, max_size=30),
    suffix=st.lists(commands, max_size=30),
    junk=st.lists(commands, max_size=5),
)
def test_snapshot_restore_round_trip(
    prefix: list[bytes], suffix: list[bytes], junk: list[bytes]
) -> None:
    a = StateStore()
    prefix = SETUP + prefix
    for i, cmd in enumerate(prefix, 1):
        a.apply(i, cmd)
    snap = a.snapshot()

    b = StateStore()
    for i, cmd in enumerate(junk, 1):  # restore must replace whatever was there
        b.apply(i, cmd)
    b.restore(snap)
    assert b.snapshot() == snap
    assert reads(b) == reads(a)

    for i, cmd in enumerate(suffix, len(prefix) + 1):
        ra, rb = a.apply(i, cmd), b.apply(i, cmd)
        assert ra == rb
        assert reads(a) == reads(b)
    assert a.snapshot() == b.snapshot()

    # Indexes kept incrementally (with rollbacks) == indexes rebuilt from the rows.
    rebuilt = StateStore()
    rebuilt.restore(a.snapshot())
    assert reads(rebuilt) == reads(a)


def test_restore_rejects_garbage_and_keeps_state() -> None:
    s = StateStore()
    assert s.apply(1, c.kv_set("k", b"v")).ok
    snap = s.snapshot()
    for bad in (b"", b"\x01\x02", msgpack.packb({"version": 99}), msgpack.packb({"version": 1})):
        with pytest.raises(ValueError, match="corrupt state snapshot"):
            s.restore(bad)
    assert s.snapshot() == snap
    assert s.index == 1


def test_restore_moves_index_and_tables() -> None:
    a = StateStore()
    a.apply(7, c.kv_set("k", b"v"))
    b = StateStore()
    b.apply(100, c.kv_set("other", b"v"))
    b.restore(a.snapshot())  # Raft may install an older-looking snapshot on a diverged follower
    assert b.index == 7 and b.table_index("kvs") == 7
    assert b.kv.keys() == ["k"]
    assert b.apply(8, c.kv_set("k2", b"")).ok


_REPLAY = """
import hashlib, sys
import msgpack
sys.path.insert(0, sys.argv[1])
from node.state import StateStore
s = StateStore()
for i, cmd in enumerate(msgpack.unpackb(sys.stdin.buffer.read()), 1):
    s.apply(i, cmd)
print(hashlib.sha256(s.snapshot()).hexdigest())
"""


@settings(max_examples=3, deadline=None, derandomize=True, database=None)
@given(seq=st.lists(commands, min_size=60, max_size=120))
def test_apply_does_not_depend_on_hash_seed(seq: list[bytes]) -> None:
    """Set/dict iteration order must not leak into the state: other hash seeds, same bytes."""
    root = str(Path(__file__).resolve().parents[1])
    blob = msgpack.packb(SETUP + seq, use_bin_type=True)
    digests = set()
    for seed in ("1", "4242"):
        out = subprocess.run(
            [sys.executable, "-c", _REPLAY, root],
            input=blob,
            capture_output=True,
            check=True,
            timeout=60,
            env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
        )
        digests.add(out.stdout.strip())
    local = StateStore()
    for i, cmd in enumerate(SETUP + seq, 1):
        local.apply(i, cmd)
    digests.add(hashlib.sha256(local.snapshot()).hexdigest().encode())
    assert len(digests) == 1


def test_restore_command_replaces_the_state_at_its_index_and_wakes_watchers() -> None:
    src = StoreDriver()
    src.ok(c.kv_set("kept", b"1"))
    src.ok(c.register("n1", "10.0.0.1", now=0.0))
    snap = src.store.snapshot()

    dst = StoreDriver()
    for i in range(5):
        dst.ok(c.kv_set(f"other{i}", b"x"))
    woken: list[bool] = []
    dst.store.watch.notify_all = lambda: woken.append(True)  # type: ignore[method-assign]
    dst.ok(c.state_restore(snap))

    assert [e["Key"] for e in dst.store.kv.list_prefix("")] == ["kept"]
    assert dst.store.catalog.node_exists("n1")
    # the index moves forward to the restore entry, for every table: blocking readers see it
    assert dst.store.index == dst.i == 6
    assert dst.store.table_index("kvs") == dst.store.table_index("nodes") == 6
    assert woken


def test_restore_command_with_a_corrupt_snapshot_keeps_the_old_state() -> None:
    d = StoreDriver()
    d.ok(c.kv_set("k", b"v"))
    d.fails(c.state_restore(b"\x93not a snapshot"), "corrupt state snapshot")
    assert d.store.index == 2

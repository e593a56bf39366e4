"""KV semantics of the state store (Consul's kvs.go behaviour)."""

from __future__ import annotations

import msgpack
import pytest

from node.state import StateStore
from node.state import commands as c

SID_A = "aaaaaaaa-0000-0000-0000-000000000001"
SID_B = "bbbbbbbb-0000-0000-0000-000000000002"


class Applier:
    """Applies commands at consecutive Raft indexes."""

    def __init__(self) -> None:
        self.store = StateStore()
        self.i = 0

    def __call__(self, cmd: bytes) -> object:
        self.i += 1
        res = self.store.apply(self.i, cmd)
        return res.value if res.ok else res


def ok(a: Applier, cmd: bytes) -> object:
    a.i += 1
    res = a.store.apply(a.i, cmd)
    assert res.ok, res.error
    return res.value


@pytest.fixture
def a() -> Applier:
    return Applier()


def with_sessions(a: Applier, delay_ns: int = 15_000_000_000, behavior: str = "release") -> None:
    ok(
        a,
        c.register(
            "n1", "10.0.0.1", checks=[{"CheckID": "serfHealth", "Status": "passing"}], now=0.0
        ),
    )
    for sid in (SID_A, SID_B):
        ok(a, c.session_create(sid, "n1", lock_delay_ns=delay_ns, behavior=behavior))


def test_set_get_shape_and_indexes(a: Applier) -> None:
    assert ok(a, c.kv_set("foo", b"bar", flags=42)) is True
    ok(a, c.kv_set("zzz", b""))
    assert a.store.kv.get("foo") == {
        "Key": "foo",
        "CreateIndex": 1,
        "ModifyIndex": 1,
        "LockIndex": 0,
        "Flags": 42,
        "Value": b"bar",
    }
    ok(a, c.kv_set("foo", b"baz"))
    e = a.store.kv.get("foo")
    assert e is not None
    assert (e["CreateIndex"], e["ModifyIndex"], e["Value"], e["Flags"]) == (1, 3, b"baz", 0)
    assert a.store.index == 3
    assert a.store.table_index("kvs") == 3
    assert a.store.kv.get("missing") is None


def test_unchanged_set_does_not_move_indexes(a: Applier) -> None:
    ok(a, c.kv_set("k", b"v"))
    ok(a, c.kv_set("k", b"v"))
    assert a.store.index == 2
    e = a.store.kv.get("k")
    assert e is not None and e["ModifyIndex"] == 1
    assert a.store.table_index("kvs") == 1


def test_flags_full_uint64_range(a: Applier) -> None:
    ok(a, c.kv_set("k", b"", flags=2**64 - 1))
    e = a.store.kv.get("k")
    assert e is not None and e["Flags"] == 2**64 - 1
    with pytest.raises(c.CommandError):
        c.kv_set("k", b"", flags=2**64)
    with pytest.raises(c.CommandError):
        c.kv_set("k", b"", flags=-1)


def test_cas(a: Applier) -> None:
    assert ok(a, c.kv_cas("k", b"1", 0)) is True  # create-only
    assert ok(a, c.kv_cas("k", b"2", 0)) is False
    assert ok(a, c.kv_cas("k", b"2", 99)) is False
    assert ok(a, c.kv_cas("k", b"2", 1)) is True
    assert ok(a, c.kv_cas("absent", b"x", 5)) is False
    e = a.store.kv.get("k")
    assert e is not None and (e["Value"], e["ModifyIndex"]) == (b"2", 4)
    assert a.store.kv.get("absent") is None


def test_delete_moves_table_index_and_prefix_index(a: Applier) -> None:
    ok(a, c.kv_set("app/a", b"1"))
    ok(a, c.kv_set("app/b", b"2"))
    ok(a, c.kv_set("other", b"3"))
    assert a.store.kv.list_index("app/") == 2
    ok(a, c.kv_delete("app/b"))  # index 4, the max-index item of the prefix
    assert a.store.table_index("kvs") == 4
    assert a.store.kv.list_index("app/") == 4  # tombstone keeps it from sliding back
    assert [e["Key"] for e in a.store.kv.list_prefix("app/")] == ["app/a"]
    ok(a, c.kv_delete("app/never"))  # deleting nothing changes nothing
    assert a.store.table_index("kvs") == 4
    # Reaping the tombstone lets the prefix index fall back (clients reset, per Consul).
    assert ok(a, c.tombstone_reap(4)) == 1
    assert a.store.kv.list_index("app/") == 1
    # A re-created key clears its tombstone.
    ok(a, c.kv_set("app/b", b"again"))
    assert a.store.kv.list_index("app/") == 7


def test_delete_cas(a: Applier) -> None:
    ok(a, c.kv_set("k", b"1"))
    assert ok(a, c.kv_delete_cas("k", 0)) is False
    assert ok(a, c.kv_delete_cas("k", 7)) is False
    assert a.store.kv.get("k") is not None
    assert ok(a, c.kv_delete_cas("k", 1)) is True
    assert a.store.kv.get("k") is None
    assert ok(a, c.kv_delete_cas("k", 1)) is True  # missing counts as deleted (Consul)


def test_delete_tree_and_keys_separator(a: Applier) -> None:
    for k in ("base/a", "base/b/c", "base/b/d", "base/e/", "basement", "x"):
        ok(a, c.kv_set(k, b""))
    assert a.store.kv.keys("base/", "/") == ["base/a", "base/b/", "base/e/"]
    assert a.store.kv.keys("", "/") == ["base/", "basement", "x"]
    assert a.store.kv.keys("base") == ["base/a", "base/b/c", "base/b/d", "base/e/", "basement"]
    ok(a, c.kv_delete_tree("base/"))
    assert a.store.kv.keys() == ["basement", "x"]
    assert a.store.kv.list_index("base/") == 7
    ok(a, c.kv_delete_tree(""))
    assert a.store.kv.keys() == []


def test_lock_semantics(a: Applier) -> None:
    with_sessions(a)
    assert ok(a, c.kv_lock("l", b"v1", SID_A, now=0)) is True
    e = a.store.kv.get("l")
    assert e is not None and e["LockIndex"] == 1 and e["Session"] == SID_A
    # Re-acquire by the holder: value changes, LockIndex does not.
    assert ok(a, c.kv_lock("l", b"v2", SID_A, now=0)) is True
    e = a.store.kv.get("l")
    assert e is not None and (e["LockIndex"], e["Value"]) == (1, b"v2")
    # Another session cannot take it, nor release it.
    assert ok(a, c.kv_lock("l", b"x", SID_B, now=0)) is False
    assert ok(a, c.kv_unlock("l", b"x", SID_B)) is False
    # A plain PUT overwrites a locked key but keeps the lock.
    ok(a, c.kv_set("l", b"plain"))
    e = a.store.kv.get("l")
    assert e is not None and (e["Session"], e["LockIndex"], e["Value"]) == (SID_A, 1, b"plain")
    # Release: Session gone, LockIndex unchanged; the next holder bumps it.
    assert ok(a, c.kv_unlock("l", b"rel", SID_A)) is True
    e = a.store.kv.get("l")
    assert e is not None and "Session" not in e and e["LockIndex"] == 1 and e["Value"] == b"rel"
    assert ok(a, c.kv_lock("l", b"b", SID_B, now=0)) is True
    e = a.store.kv.get("l")
    assert e is not None and (e["LockIndex"], e["Session"]) == (2, SID_B)
    assert ok(a, c.kv_unlock("nokey", b"", SID_B)) is False


def test_lock_needs_a_live_session(a: Applier) -> None:
    with_sessions(a)
    before = a.store.snapshot()
    res = a(c.kv_lock("l", b"v", "cccccccc-0000-0000-0000-000000000003", now=0))
    assert not getattr(res, "ok", True)
    assert "invalid session" in str(getattr(res, "error", ""))
    assert a.store.kv.get("l") is None
    assert _without_index(a.store.snapshot()) == _without_index(before)


def test_lock_delay_after_invalidation(a: Applier) -> None:
    with_sessions(a, delay_ns=15_000_000_000)
    assert ok(a, c.kv_lock("l", b"v", SID_A, now=100.0)) is True
    ok(a, c.session_destroy(SID_A, now=200.0))
    e = a.store.kv.get("l")
    assert e is not None and "Session" not in e  # behavior=release keeps the key
    assert a.store.kv.lock_delay_until("l") == 215.0
    assert ok(a, c.kv_lock("l", b"v", SID_B, now=214.9)) is False
    assert ok(a, c.kv_lock("l", b"v", SID_B, now=215.0)) is True
    e = a.store.kv.get("l")
    assert e is not None and e["LockIndex"] == 2
    # Lock-delay does not apply to keys the session did not hold.
    ok(a, c.session_destroy(SID_B, now=300.0))
    assert a.store.kv.lock_delay_until("other") == 0.0


def test_destroy_with_delete_behavior_deletes_held_keys(a: Applier) -> None:
    with_sessions(a, delay_ns=0, behavior="delete")
    ok(a, c.kv_lock("svc/leader", b"me", SID_A, now=0))
    ok(a, c.kv_lock("svc/other", b"you", SID_B, now=0))
    ok(a, c.session_destroy(SID_A, now=1.0))
    assert a.store.kv.get("svc/leader") is None
    assert a.store.kv.get("svc/other") is not None
    assert a.store.kv.list_index("svc/") == a.store.index
    # no lock-delay with LockDelay 0
    assert ok(a, c.kv_lock("svc/leader", b"b", SID_B, now=1.0)) is True


def test_oversize_value_rejected_and_nothing_stored(a: Applier) -> None:
    ok(a, c.kv_set("k", b"small"))
    big = b"x" * (512 * 1024 + 1)
    with pytest.raises(c.CommandError) as ei:
        c.kv_set("k", big)
    assert ei.value.kind == "too_large"
    raw = msgpack.packb({"op": "kv_set", "key": "k", "value": big}, use_bin_type=True)
    res = a.store.apply(2, raw)
    assert not res.ok and res.kind == "too_large" and "524288" in str(res.error)
    e = a.store.kv.get("k")
    assert e is not None and e["Value"] == b"small"
    assert a.store.index == 2 and a.store.table_index("kvs") == 1
    # exactly the limit is fine
    assert a.store.apply(3, c.kv_set("k", b"y" * 512 * 1024)).ok


def _without_index(snap: bytes) -> object:
    obj = msgpack.unpackb(snap, raw=False, strict_map_key=False)
    obj.pop("index")
    return obj

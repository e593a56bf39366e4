"""Sessions: creation checks, destroy, invalidation through catalog changes."""

from __future__ import annotations

import pytest

from node.golang import parse_duration
from node.state import commands as c
from tests.harness.state import StoreDriver as S

SID = "aaaaaaaa-0000-0000-0000-000000000001"
SID2 = "bbbbbbbb-0000-0000-0000-000000000002"


@pytest.fixture
def s() -> S:
    st = S()
    st.ok(
        c.register(
            "n1",
            "10.0.0.1",
            service={"Service": "db", "ID": "db1"},
            checks=[
                {"CheckID": "serfHealth", "Status": "passing"},
                {"CheckID": "db-alive", "ServiceID": "db1", "Status": "passing"},
            ],
            now=0.0,
        )
    )
    return st


def test_create_defaults_and_shape(s: S) -> None:
    assert s.ok(c.session_create(SID, "n1", name="lock", ttl="30s")) == SID
    assert s.store.sessions.get(SID) == {
        "ID": SID,
        "Name": "lock",
        "Node": "n1",
        "LockDelay": 15_000_000_000,
        "Behavior": "release",
        "TTL": "30s",
        "NodeChecks": ["serfHealth"],
        "ServiceChecks": [],
        "CreateIndex": 2,
        "ModifyIndex": 2,
    }
    assert s.store.table_index("sessions") == 2
    assert [x["ID"] for x in s.store.sessions.list_all()] == [SID]
    assert [x["ID"] for x in s.store.sessions.for_node("n1")] == [SID]
    assert s.store.sessions.for_node("n2") == []
    assert s.store.sessions.with_ttl() == [(SID, 30.0)]


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"node": "nope"}, "Missing node registration"),
        ({"node_checks": ["ghost"]}, "Missing check 'ghost'"),
        ({"service_checks": ["ghost"]}, "Missing check 'ghost'"),
        ({"ttl": "5s"}, "Invalid Session TTL"),
        ({"ttl": "86401s"}, "Invalid Session TTL"),
        ({"ttl": "abc"}, "invalid duration"),
    ],
)
def test_create_rejections(s: S, kwargs: dict[str, object], text: str) -> None:
    args: dict[str, object] = {"node": "n1"}
    args.update(kwargs)
    node = str(args.pop("node"))
    s.fails(c.session_create(SID, node, **args), text)  # type: ignore[arg-type]
    assert s.store.sessions.get(SID) is None


def test_create_rejects_critical_check_bad_id_duplicates(s: S) -> None:
    s.ok(c.register("n1", "10.0.0.1", checks=[{"CheckID": "down", "Status": "critical"}], now=0.0))
    s.fails(c.session_create(SID, "n1", node_checks=["down"]), "critical")
    s.fails(c.session_create("not-a-uuid", "n1"), "not a UUID")
    s.ok(c.session_create(SID, "n1"))
    s.fails(c.session_create(SID, "n1"), "already exists")
    with pytest.raises(c.CommandError):
        c.session_create(SID2, "n1", behavior="explode")
    with pytest.raises(c.CommandError):
        c.session_create(SID2, "n1", lock_delay_ns=61_000_000_000)


def test_ttl_bounds_accepted(s: S) -> None:
    s.ok(c.session_create(SID, "n1", ttl="10s"))
    s.ok(c.session_create(SID2, "n1", ttl="24h"))
    assert dict(s.store.sessions.with_ttl()) == {SID: 10.0, SID2: 86400.0}


def test_destroy_is_idempotent(s: S) -> None:
    s.ok(c.session_create(SID, "n1"))
    assert s.ok(c.session_destroy(SID, now=1.0)) is True
    assert s.store.sessions.get(SID) is None
    assert s.ok(c.session_destroy(SID, now=2.0)) is True
    assert s.store.table_index("sessions") == 3  # the no-op destroy moved nothing


def test_check_going_critical_invalidates_linked_sessions(s: S) -> None:
    s.ok(c.session_create(SID, "n1", node_checks=[], service_checks=["db-alive"]))
    s.ok(c.session_create(SID2, "n1"))  # linked to serfHealth only
    s.ok(c.kv_lock("lock", b"", SID, now=10.0))
    assert s.store.sessions.sessions_to_invalidate_for_check("n1", "db-alive") == [SID]
    assert s.store.sessions.sessions_to_invalidate_for_node("n1") == [SID, SID2]
    s.ok(
        c.register(
            "n1",
            "10.0.0.1",
            checks=[{"CheckID": "db-alive", "ServiceID": "db1", "Status": "critical"}],
            now=20.0,
        )
    )
    assert s.store.sessions.get(SID) is None
    assert s.store.sessions.get(SID2) is not None
    e = s.store.kv.get("lock")
    assert e is not None and "Session" not in e
    assert s.store.kv.lock_delay_until("lock") == 35.0


def test_check_deregistered_invalidates_sessions(s: S) -> None:
    s.ok(c.session_create(SID, "n1"))
    s.ok(c.deregister("n1", check_id="serfHealth", now=5.0))
    assert s.store.sessions.get(SID) is None


def test_node_deregistered_invalidates_sessions(s: S) -> None:
    s.ok(c.session_create(SID, "n1", node_checks=[]))
    s.ok(c.kv_lock("k", b"", SID, now=0.0))
    s.ok(c.deregister("n1", now=1.0))
    assert s.store.sessions.list_all() == []
    e = s.store.kv.get("k")
    assert e is not None and "Session" not in e


def test_parse_duration() -> None:
    assert parse_duration("30s") == 30.0
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("1.5h") == 5400.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("0") == 0.0
    for bad in ("", "10", "s", "10x", "1m 2s"):
        with pytest.raises(ValueError):
            parse_duration(bad)

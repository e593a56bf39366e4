"""The leader's decisions (node/leader.py) against a real store: member reconciliation into the
catalog, session TTL expiry, tombstone reaping."""

from __future__ import annotations

from node.leader import (
    FAILED_OUTPUT,
    REAP_GRACE,
    SERF_CHECK_ID,
    TOMBSTONE_GRANULARITY,
    LeaderDuties,
    MemberInfo,
    catalog_commands,
)
from node.raft.autopilot import Health
from node.state import commands as c
from tests.harness.state import StoreDriver

ID1 = "11111111-1111-1111-1111-111111111111"
ID2 = "22222222-2222-2222-2222-222222222222"


def member(name: str, mid: str, health: Health = Health.ALIVE, voter: bool = True) -> MemberInfo:
    return MemberInfo(name, mid, "10.0.0." + name[-1], health, 8300, voter)


def reconcile(d: StoreDriver, members: list[MemberInfo], **kw: object) -> int:
    """Apply what the leader would propose; returns how many writes that took."""
    cmds = catalog_commands(d.store, members, datacenter="dc1", now=100.0, **kw)  # type: ignore[arg-type]
    for cmd in cmds:
        d.ok(cmd)
    return len(cmds)


def test_alive_members_become_nodes_with_a_passing_serf_check_and_voters_get_consul() -> None:
    d = StoreDriver()
    assert reconcile(d, [member("n1", ID1), member("n2", ID2, voter=False)]) == 3
    cat = d.store.catalog
    n1 = cat.node("n1")
    assert n1 is not None and n1["Address"] == "10.0.0.1" and n1["ID"] == ID1
    chk = cat.check("n1", SERF_CHECK_ID)
    assert chk is not None and chk["Status"] == "passing" and chk["Name"] == "Serf Health Status"
    svc = cat.service("n1", "consul")
    assert svc is not None and svc["Port"] == 8300
    assert cat.service("n2", "consul") is None  # a learner does not carry the consul service
    # converged: nothing more to write (the leader loop must not write every tick)
    assert reconcile(d, [member("n1", ID1), member("n2", ID2, voter=False)]) == 0


def test_a_failed_member_turns_critical_and_invalidates_its_sessions() -> None:
    d = StoreDriver()
    reconcile(d, [member("n1", ID1), member("n2", ID2)])
    sid = "aaaaaaaa-0000-0000-0000-000000000001"
    d.ok(c.session_create(sid, "n2"))
    d.ok(c.kv_lock("lock", b"held", sid, now=100.0))
    assert reconcile(d, [member("n1", ID1), member("n2", ID2, Health.FAILED)]) == 1
    chk = d.store.catalog.check("n2", SERF_CHECK_ID)
    assert chk is not None and chk["Status"] == "critical" and chk["Output"] == FAILED_OUTPUT
    assert d.store.sessions.get(sid) is None
    entry = d.store.kv.get("lock")
    assert entry is not None and "Session" not in entry  # released (behavior "release")
    # back alive: passing again
    assert reconcile(d, [member("n1", ID1), member("n2", ID2)]) == 1
    chk = d.store.catalog.check("n2", SERF_CHECK_ID)
    assert chk is not None and chk["Status"] == "passing"


def test_left_members_are_deregistered_and_demoted_voters_lose_the_consul_service() -> None:
    d = StoreDriver()
    reconcile(d, [member("n1", ID1), member("n2", ID2)])
    reconcile(d, [member("n1", ID1, voter=False), member("n2", ID2, Health.LEFT)])
    assert d.store.catalog.node("n2") is None
    assert d.store.catalog.service("n1", "consul") is None


def test_only_gossip_managed_nodes_missing_for_the_grace_period_are_reaped() -> None:
    d = StoreDriver()
    reconcile(d, [member("n1", ID1), member("n2", ID2)])
    d.ok(c.register("external", "10.9.9.9", now=0.0))  # registered through the catalog API
    duties = LeaderDuties()
    only_n1 = [member("n1", ID1)]
    assert duties.reapable(d.store, only_n1, now=0.0) == set()
    assert duties.reapable(d.store, only_n1, now=REAP_GRACE - 1) == set()
    reap = duties.reapable(d.store, only_n1, now=REAP_GRACE)
    assert reap == {"n2"}
    reconcile(d, only_n1, reapable=reap)
    assert d.store.catalog.node("n2") is None
    assert d.store.catalog.node("external") is not None
    # a node seen again restarts its grace period
    assert duties.reapable(d.store, [member("n1", ID1), member("n2", ID2)], now=50.0) == set()


def test_session_ttl_expires_after_twice_the_ttl_unless_renewed() -> None:
    d = StoreDriver()
    reconcile(d, [member("n1", ID1)])
    sid = "aaaaaaaa-0000-0000-0000-000000000001"
    d.ok(c.session_create(sid, "n1", ttl="10s"))
    other = "bbbbbbbb-0000-0000-0000-000000000002"
    d.ok(c.session_create(other, "n1"))  # no TTL: never expires
    duties = LeaderDuties()
    duties.on_leadership(d.store, now=0.0)
    assert duties.expired_sessions(d.store, now=19.9) == []
    assert duties.renew(d.store, sid, now=15.0)
    assert duties.expired_sessions(d.store, now=34.9) == []
    assert duties.expired_sessions(d.store, now=35.0) == [sid]
    assert not duties.renew(d.store, "cccccccc-0000-0000-0000-000000000003", now=1.0)
    # destroyed sessions are forgotten
    d.ok(c.session_destroy(sid, now=1.0))
    assert duties.expired_sessions(d.store, now=100.0) == []


def test_a_new_leader_rearms_every_ttl_session_from_its_own_clock() -> None:
    d = StoreDriver()
    reconcile(d, [member("n1", ID1)])
    sid = "aaaaaaaa-0000-0000-0000-000000000001"
    d.ok(c.session_create(sid, "n1", ttl="10s"))
    duties = LeaderDuties()
    duties.on_leadership(d.store, now=0.0)
    assert duties.expired_sessions(d.store, now=25.0) == [sid]
    duties.on_leadership(d.store, now=25.0)  # leadership lost and regained
    assert duties.expired_sessions(d.store, now=44.0) == []


def test_tombstones_are_reaped_once_older_than_the_ttl() -> None:
    d = StoreDriver()
    duties = LeaderDuties()
    assert duties.tombstones_to_reap(d.store, now=0.0, ttl=100.0) is None
    d.ok(c.kv_set("a", b"1"))
    d.ok(c.kv_delete("a"))
    first = d.store.table_index("tombstones")
    assert duties.tombstones_to_reap(d.store, now=0.0, ttl=100.0) is None
    d.ok(c.kv_set("b", b"1"))
    d.ok(c.kv_delete("b"))
    assert duties.tombstones_to_reap(d.store, now=TOMBSTONE_GRANULARITY, ttl=100.0) is None
    assert duties.tombstones_to_reap(d.store, now=99.0, ttl=100.0) is None
    index = duties.tombstones_to_reap(d.store, now=100.0, ttl=100.0)
    assert index == first  # only the tombstone that is 100 s old
    d.ok(c.tombstone_reap(index))
    assert list(d.store.kv.tombstones) == ["b"]
    later = duties.tombstones_to_reap(d.store, now=100.0 + TOMBSTONE_GRANULARITY, ttl=100.0)
    assert later is not None
    d.ok(c.tombstone_reap(later))
    assert list(d.store.kv.tombstones) == []
    # nothing left: no further (no-op) reap writes
    assert duties.tombstones_to_reap(d.store, now=1000.0, ttl=100.0) is None
    assert duties.tombstones_to_reap(d.store, now=2000.0, ttl=100.0) is None

"""Catalog: register/deregister and the Consul-shaped reads."""

from __future__ import annotations

import pytest

from node.state import StateStore
from node.state import commands as c
from node.state.catalog import Catalog, has_tag, meta_matches
from tests.harness.state import StoreDriver as C
from tests.harness.state import stored_data

NID1 = "11111111-1111-1111-1111-111111111111"
NID2 = "22222222-2222-2222-2222-222222222222"


WEB = {"ID": "web1", "Service": "web", "Tags": ["v1", "http"], "Port": 8080, "Meta": {"a": "b"}}


@pytest.fixture
def cat() -> C:
    x = C()
    x.ok(
        c.register(
            "node-b",
            "10.0.0.2",
            node_id=NID2,
            datacenter="dc1",
            node_meta={"rack": "r2"},
            service=WEB,
            checks=[
                {"CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing"},
                {"CheckID": "web-http", "ServiceID": "web1", "Status": "passing"},
            ],
            now=0.0,
        )
    )
    x.ok(
        c.register(
            "node-a",
            "10.0.0.1",
            node_id=NID1,
            datacenter="dc1",
            tagged_addresses={"lan": "10.0.0.1"},
            service={"Service": "web", "Tags": ["v2"], "Port": 8081},
            checks=[
                {"CheckID": "serfHealth", "Status": "passing"},
                {"CheckID": "web-http", "ServiceID": "web", "Status": "warning"},
            ],
            now=0.0,
        )
    )
    return x


def test_node_shapes_and_order(cat: C) -> None:
    cg = cat.store.catalog
    assert [n["Node"] for n in cg.list_nodes()] == ["node-a", "node-b"]
    assert cg.node("node-b") == {
        "ID": NID2,
        "Node": "node-b",
        "Address": "10.0.0.2",
        "Datacenter": "dc1",
        "TaggedAddresses": {},
        "Meta": {"rack": "r2"},
        "CreateIndex": 1,
        "ModifyIndex": 1,
    }
    assert cg.node("nope") is None
    assert cg.node_services("nope") is None
    ns = cg.node_services("node-a")
    assert ns is not None and list(ns["Services"]) == ["web"]
    svc = ns["Services"]["web"]
    assert svc["ID"] == "web" and svc["Weights"] == {"Passing": 1, "Warning": 1}
    assert svc["CreateIndex"] == 2


def test_services_and_service_nodes(cat: C) -> None:
    cg = cat.store.catalog
    assert cg.list_services() == {"web": ["http", "v1", "v2"]}
    rows = cg.service_nodes("web")
    assert [(r["Node"], r["ServiceID"], r["ServicePort"]) for r in rows] == [
        ("node-a", "web", 8081),
        ("node-b", "web1", 8080),
    ]
    r = rows[1]
    assert r["ID"] == NID2 and r["NodeMeta"] == {"rack": "r2"} and r["ServiceMeta"] == {"a": "b"}
    assert r["ServiceTags"] == ["v1", "http"] and r["ServiceKind"] == ""
    assert [x["Node"] for x in cg.service_nodes("web", tag="v1")] == ["node-b"]
    assert cg.service_nodes("nothing") == []


def test_health_reads(cat: C) -> None:
    cg = cat.store.catalog
    entries = cg.health_service("web")
    assert [e["Node"]["Node"] for e in entries] == ["node-a", "node-b"]
    chk = entries[1]["Checks"][1]
    assert chk["CheckID"] == "web-http" and chk["ServiceName"] == "web"
    assert chk["ServiceTags"] == ["v1", "http"] and chk["Node"] == "node-b"
    assert chk["Name"] == "web-http"  # defaults to the ID
    # warning is not passing
    assert [e["Node"]["Node"] for e in cg.health_service("web", passing_only=True)] == ["node-b"]
    assert [x["CheckID"] for x in cg.checks_in_state("warning")] == ["web-http"]
    assert len(cg.checks_in_state("any")) == 4
    assert [x["Node"] for x in cg.service_checks("web")] == ["node-a", "node-b"]
    assert [x["CheckID"] for x in cg.node_checks("node-b")] == ["serfHealth", "web-http"]
    assert Catalog.aggregate_status(cg.node_checks("node-a")) == "warning"
    assert Catalog.aggregate_status([{"CheckID": "_node_maintenance", "Status": "critical"}]) == (
        "maintenance"
    )


def test_reads_are_copies(cat: C) -> None:
    n = cat.store.catalog.node("node-b")
    assert n is not None
    n["Meta"]["rack"] = "mutated"
    again = cat.store.catalog.node("node-b")
    assert again is not None and again["Meta"] == {"rack": "r2"}


def test_reregister_same_is_noop_change_bumps(cat: C) -> None:
    before = (cat.store.table_index("nodes"), cat.store.table_index("services"))
    cat.ok(
        c.register("node-b", "10.0.0.2", node_id=NID2, datacenter="dc1",
                   node_meta={"rack": "r2"}, service=WEB, now=0.0)
    )  # fmt: skip
    assert (cat.store.table_index("nodes"), cat.store.table_index("services")) == before
    cat.ok(
        c.register("node-b", "10.0.0.2", node_id=NID2, datacenter="dc1",
                   node_meta={"rack": "r2"}, service={**WEB, "Tags": ["v3"]}, now=0.0)
    )  # fmt: skip
    assert cat.store.table_index("nodes") == before[0]
    assert cat.store.table_index("services") == 4
    ns = cat.store.catalog.node_services("node-b")
    assert ns is not None
    assert (ns["Services"]["web1"]["CreateIndex"], ns["Services"]["web1"]["ModifyIndex"]) == (1, 4)
    # the service's checks follow its tags
    chk = next(x for x in cat.store.catalog.node_checks("node-b") if x["CheckID"] == "web-http")
    assert chk["ServiceTags"] == ["v3"] and chk["ModifyIndex"] == 4


def test_register_errors_are_atomic(cat: C) -> None:
    cat.fails(
        c.register("node-c", "10.0.0.3", checks=[{"CheckID": "x", "ServiceID": "ghost"}], now=0.0),
        "Missing service registration",
    )
    assert cat.store.catalog.node("node-c") is None  # node not half-registered
    cat.fails(c.register("node-c", "10.0.0.3", node_id=NID1, now=0.0), "aliases existing node")
    cat.fails(c.register("node-c", "10.0.0.3", node_id="xyz", now=0.0), "not a UUID")
    cat.fails(c.register("node-c", "", now=0.0), "Must provide address")
    cat.fails(
        c.register(
            "node-c", "1.2.3.4", service={"Service": "s", "Weights": {"Passing": 0}}, now=0.0
        ),
        "Invalid Weights",
    )
    with pytest.raises(c.CommandError, match="Status must be one of"):
        c.register("node-c", "1.2.3.4", checks=[{"CheckID": "x", "Status": "fine"}], now=0.0)
    with pytest.raises(c.CommandError, match="unknown field"):
        c.register("node-c", "1.2.3.4", service={"Service": "s", "Bogus": 1}, now=0.0)


def test_new_check_defaults_to_critical(cat: C) -> None:
    cat.ok(
        c.register("node-a", "10.0.0.1", node_id=NID1, datacenter="dc1",
                   tagged_addresses={"lan": "10.0.0.1"}, checks=[{"CheckID": "new"}], now=0.0)
    )  # fmt: skip
    assert [x["CheckID"] for x in cat.store.catalog.checks_in_state("critical")] == ["new"]


def test_deregister(cat: C) -> None:
    cat.ok(c.deregister("node-b", service_id="web1", now=0.0))
    assert [x["CheckID"] for x in cat.store.catalog.node_checks("node-b")] == ["serfHealth"]
    assert [r["Node"] for r in cat.store.catalog.service_nodes("web")] == ["node-a"]
    assert cat.store.table_index("services") == 3 and cat.store.table_index("checks") == 3
    cat.ok(c.deregister("node-a", check_id="serfHealth", now=0.0))
    assert [x["CheckID"] for x in cat.store.catalog.node_checks("node-a")] == ["web-http"]
    cat.ok(c.deregister("node-a", now=0.0))
    assert cat.store.catalog.node("node-a") is None
    assert cat.store.catalog.list_services() == {}
    assert cat.store.catalog.checks_in_state("any")[0]["Node"] == "node-b"
    idx = cat.store.index
    cat.ok(c.deregister("ghost", now=0.0))  # unknown: no-op
    assert cat.store.table_index(["nodes", "services", "checks"]) == idx
    # the freed node ID can be reused by another name
    cat.ok(c.register("node-z", "10.0.0.9", node_id=NID1, now=0.0))


# -- per-service indexes (Consul's "service.<name>" / "service_last_extinction") ---------------


def _two_services() -> C:
    """Service a on node na, service b on node nb, each node with a serfHealth check."""
    x = C()
    for node, addr, svc in (("na", "10.0.0.1", "a"), ("nb", "10.0.0.2", "b")):
        x.ok(c.register(node, addr, service={"ID": f"{svc}1", "Service": svc},
                        checks=[{"CheckID": "serfHealth", "Status": "passing"},
                                {"CheckID": f"{svc}-alive", "ServiceID": f"{svc}1",
                                 "Status": "passing"}],
                        now=0.0))  # fmt: skip
    return x


def _svc_index(x: C, name: str) -> tuple[int, int, int]:
    """What the three readers of a service see: pseudo-table, catalog read, health read."""
    cg = x.store.catalog
    return (
        x.store.table_index(f"service.{name}"),
        cg.service_index(name),
        cg.service_index(name, checks=True),
    )


def test_writes_elsewhere_do_not_move_a_service_index() -> None:
    x = _two_services()
    b_before = _svc_index(x, "b")
    assert b_before == (2, 2, 2)
    x.ok(c.register("na", "10.0.0.1", service={"ID": "a2", "Service": "a", "Port": 9}, now=0.0))
    # a serfHealth flap of the node that does not host b
    x.ok(c.register("na", "10.0.0.1", checks=[{"CheckID": "serfHealth", "Status": "critical"}],
                    now=0.0))  # fmt: skip
    x.ok(c.register("na", "10.0.0.9", now=0.0))  # the other node's address changes
    x.ok(c.register("nc", "10.0.0.3", checks=[{"CheckID": "serfHealth"}], now=0.0))
    x.ok(c.deregister("na", service_id="a2", now=0.0))
    x.ok(c.deregister("nc", now=0.0))
    assert x.store.table_index(["nodes", "services", "checks"]) == x.i == 8
    assert _svc_index(x, "b") == b_before
    assert _svc_index(x, "a") == (7, 7, 7)  # a moved with every write that touched it


def test_changes_on_a_node_hosting_the_service_move_its_index() -> None:
    x = _two_services()
    x.ok(c.register("nb", "10.0.0.2", checks=[{"CheckID": "b-alive", "ServiceID": "b1",
                                               "Status": "critical"}], now=0.0))  # fmt: skip
    assert _svc_index(x, "b") == (3, 3, 3)
    # a node-level check concerns every service of its node
    x.ok(c.register("nb", "10.0.0.2", checks=[{"CheckID": "serfHealth", "Status": "critical"}],
                    now=0.0))  # fmt: skip
    assert _svc_index(x, "b") == (4, 4, 4)
    x.ok(c.register("nb", "10.0.0.2", node_meta={"rack": "r9"}, now=0.0))  # node change
    assert _svc_index(x, "b") == (5, 5, 5)
    x.ok(c.deregister("nb", check_id="serfHealth", now=0.0))
    assert _svc_index(x, "b") == (6, 6, 6)
    x.ok(c.register("nb", "10.0.0.2", node_meta={"rack": "r9"},
                    service={"ID": "b1", "Service": "b", "Tags": ["t"]}, now=0.0))  # fmt: skip
    assert _svc_index(x, "b") == (7, 7, 7)
    # an unchanged re-registration writes nothing, so nothing moves
    x.ok(c.register("nb", "10.0.0.2", node_meta={"rack": "r9"},
                    service={"ID": "b1", "Service": "b", "Tags": ["t"]}, now=0.0))  # fmt: skip
    assert _svc_index(x, "b") == (7, 7, 7)
    assert _svc_index(x, "a") == (1, 1, 1)


def test_last_instance_gone_moves_the_index_and_drops_the_entry() -> None:
    x = _two_services()
    x.ok(c.register("nc", "10.0.0.3", service={"ID": "b2", "Service": "b"}, now=0.0))
    x.ok(c.deregister("nc", service_id="b2", now=0.0))  # one instance is left: b's own index
    assert _svc_index(x, "b") == (4, 4, 4)
    assert x.store.catalog.service_nodes("b") != []
    x.ok(c.deregister("nb", service_id="b1", now=0.0))
    assert x.store.catalog.service_nodes("b") == [] == x.store.catalog.health_service("b")
    assert _svc_index(x, "b") == (5, 5, 5)  # the extinction index, higher than before
    envs = dict(x.store._p.env.table_indexes.items())
    assert "service.b" not in envs and envs["service_last_extinction"] == 5  # memory bounded
    assert _svc_index(x, "a") == (1, 1, 1)
    # it comes back with its own index again
    x.ok(c.register("nb", "10.0.0.2", service={"ID": "b1", "Service": "b"}, now=0.0))
    assert _svc_index(x, "b") == (6, 6, 6)


def test_node_deletion_and_rename_retire_the_services_they_held() -> None:
    x = _two_services()
    x.ok(c.register("nc", "10.0.0.3", service={"ID": "c1", "Service": "c"}, now=0.0))
    x.ok(c.deregister("nb", now=0.0))  # the node, with b's only instance
    assert _svc_index(x, "b") == (4, 4, 4)
    assert x.store.catalog.service_index("a") == 1
    # an instance renamed from c to d: c lost its last instance, d gained one
    x.ok(c.register("nc", "10.0.0.3", service={"ID": "c1", "Service": "d"}, now=0.0))
    assert _svc_index(x, "c") == (5, 5, 5) == _svc_index(x, "d")
    assert "service.c" not in dict(x.store._p.env.table_indexes.items())


def test_a_check_moved_between_services_moves_both() -> None:
    x = _two_services()
    x.ok(c.register("na", "10.0.0.1", service={"ID": "e1", "Service": "e"}, now=0.0))
    x.ok(c.register("na", "10.0.0.1", checks=[{"CheckID": "a-alive", "ServiceID": "e1",
                                               "Status": "passing"}], now=0.0))  # fmt: skip
    assert x.store.catalog.service_index("a") == x.store.catalog.service_index("e") == 4


def test_a_service_that_never_existed() -> None:
    x = _two_services()
    # no service ever went away: the catalog tables' max (with checks for health reads)
    x.ok(c.register("na", "10.0.0.1", checks=[{"CheckID": "serfHealth", "Status": "warning"}],
                    now=0.0))  # fmt: skip
    assert x.store.catalog.service_index("ghost") == 2
    assert x.store.catalog.service_index("ghost", checks=True) == 3
    # after one did, the last extinction index (as Consul's maxIndexForService)
    x.ok(c.deregister("nb", service_id="b1", now=0.0))
    assert _svc_index(x, "ghost") == (4, 4, 4)


def test_a_rolled_back_deregistration_keeps_the_service_index() -> None:
    x = _two_services()
    before = stored_data(x.store)  # table indexes included
    ok, _ = x.apply(c.txn([c.txn_service("delete", "nb", service_id="b1"),
                           c.txn_kv("get", "missing")], now=0.0))  # fmt: skip
    assert not ok
    assert _svc_index(x, "b") == (2, 2, 2)
    assert stored_data(x.store) == before


def test_service_indexes_survive_snapshot_and_restore() -> None:
    x = _two_services()
    x.ok(c.deregister("nb", service_id="b1", now=0.0))  # b extinct at 3
    x.ok(c.register("na", "10.0.0.1", service={"ID": "a2", "Service": "a"}, now=0.0))
    y = _two_services()
    y.ok(c.deregister("nb", service_id="b1", now=0.0))
    y.ok(c.register("na", "10.0.0.1", service={"ID": "a2", "Service": "a"}, now=0.0))
    assert x.store.snapshot() == y.store.snapshot()  # replicas agree byte for byte
    z = StateStore()
    z.restore(x.store.snapshot())
    for name in ("a", "b", "ghost"):
        for checks in (False, True):
            assert z.catalog.service_index(name, checks) == x.store.catalog.service_index(
                name, checks
            )
    assert z.catalog.service_index("a") == 4 and z.catalog.service_index("b") == 3
    # restored through Raft: every index moves to the restore entry's
    assert z.apply(10, c.state_restore(x.store.snapshot())).ok
    assert [z.catalog.service_index(n) for n in ("a", "b", "ghost")] == [10, 10, 10]


# ----- names in any case, tags in lower case (Consul's Lowercase memdb indexes) -----


def _mixed_case() -> C:
    x = C()
    x.ok(c.register("Box1", "10.0.0.1", service={"ID": "w1", "Service": "Web", "Tags": ["Prod"]},
                    checks=[{"CheckID": "w1-alive", "ServiceID": "w1", "Status": "passing"}],
                    now=0.0))  # fmt: skip
    x.ok(c.register("box2", "10.0.0.2", service={"ID": "w2", "Service": "web", "Tags": ["v1"]},
                    checks=[{"CheckID": "w2-alive", "ServiceID": "w2", "Status": "critical"}],
                    now=0.0))  # fmt: skip
    return x


def test_service_reads_match_the_name_in_any_case() -> None:
    cg = _mixed_case().store.catalog
    for name in ("web", "Web", "WEB"):
        assert [i["ServiceID"] for i in cg.service_nodes(name, any_case=True)] == ["w1", "w2"]
        assert [e["Service"]["ID"] for e in cg.health_service(name, any_case=True)] == ["w1", "w2"]
        assert [ch["CheckID"] for ch in cg.service_checks(name, any_case=True)] == [
            "w1-alive", "w2-alive"]  # fmt: skip
    # without any_case a read takes the exact spelling (what node/dns/resolver.py relies on)
    assert [i["ServiceID"] for i in cg.service_nodes("Web")] == ["w1"]
    assert cg.service_nodes("WEB") == [] == cg.health_service("WEB")
    assert cg.service_names("wEB") == ["Web", "web"] and cg.service_names("db") == []
    assert cg.list_services() == {"Web": ["Prod"], "web": ["v1"]}


def test_tags_compare_in_lower_case() -> None:
    cg = _mixed_case().store.catalog
    for tag in ("prod", "PROD", "Prod"):
        assert [i["ServiceID"] for i in cg.service_nodes("web", tag, any_case=True)] == ["w1"]
    assert [e["Service"]["ID"] for e in cg.health_service("web", "V1", any_case=True)] == ["w2"]
    assert cg.service_nodes("web", "v2", any_case=True) == []


def test_nodes_resolve_in_any_case() -> None:
    x = _mixed_case()
    cg = x.store.catalog
    assert cg.resolve_node("box1") == "Box1" == cg.resolve_node("BOX1")
    assert cg.resolve_node("Box2") == "box2" and cg.resolve_node("box3") is None
    x.ok(c.register("BOX2", "10.0.0.3", now=0.0))  # another node that differs only in case
    assert cg.resolve_node("box2") == "box2" and cg.resolve_node("BOX2") == "BOX2"  # exact first
    assert cg.resolve_node("Box2") == "BOX2"  # else the first spelling in sort order
    x.ok(c.deregister("BOX2", now=0.0))
    x.ok(c.deregister("Box1", now=0.0))
    assert cg.resolve_node("box1") is None and cg.resolve_node("BOX2") == "box2"


def test_every_spelling_of_a_service_shares_one_index() -> None:
    x = _mixed_case()
    store = x.store
    assert store.table_index("service.Web") == store.table_index("service.web") == 2
    assert "service.Web" not in dict(store._p.env.table_indexes.items())
    x.ok(c.register("box2", "10.0.0.2", checks=[{"CheckID": "w2-alive", "ServiceID": "w2",
                                                 "Status": "passing"}], now=0.0))  # fmt: skip
    assert store.catalog.service_index("WEB") == store.catalog.service_index("Web") == 3
    # one spelling losing its instances is not the service's extinction
    x.ok(c.deregister("box2", service_id="w2", now=0.0))
    envs = dict(store._p.env.table_indexes.items())
    assert envs["service.web"] == 4 and "service_last_extinction" not in envs
    x.ok(c.deregister("Box1", service_id="w1", now=0.0))
    envs = dict(store._p.env.table_indexes.items())
    assert "service.web" not in envs and envs["service_last_extinction"] == 5
    assert store.catalog.service_index("Web") == 5


def test_a_watch_of_one_spelling_is_woken_by_a_write_to_another() -> None:
    x = _mixed_case()
    touched: list[frozenset[str]] = []
    x.store._notify = touched.append
    x.ok(c.register("box2", "10.0.0.2", service={"ID": "w2", "Service": "web", "Port": 1},
                    now=0.0))  # fmt: skip
    assert "service.web" in touched[-1]
    x.ok(c.register("Box1", "10.0.0.1", service={"ID": "w1", "Service": "WEB"}, now=0.0))
    assert "service.web" in touched[-1]  # renamed within its own spelling family


def test_list_services_keeps_the_instances_a_predicate_passes() -> None:
    x = _mixed_case()
    primary = {"ID": "d1", "Service": "db", "Tags": ["primary"]}
    replica = {"ID": "d2", "Service": "db", "Tags": ["replica"]}
    x.ok(c.register("box3", "10.0.0.3", node_meta={"rack": "r1"}, service=primary, now=0.0))
    x.ok(c.register("box4", "10.0.0.4", service=replica, now=0.0))
    cg = x.store.catalog
    seen: list[str] = []

    def on_rack_r1(instance: dict[str, object]) -> bool:
        seen.append(str(instance["ServiceID"]))
        return instance["NodeMeta"] == {"rack": "r1"}

    assert cg.list_services(on_rack_r1) == {"db": ["primary"]}  # web has no passing instance
    assert sorted(seen) == ["d1", "d2", "w1", "w2"]
    assert cg.list_services(lambda i: True) == cg.list_services()


def test_meta_matches() -> None:
    assert meta_matches({"a": "1", "b": "2"}, {"a": "1", "b": "2"})
    assert meta_matches({"a": "1"}, {})
    assert not meta_matches({"a": "1"}, {"a": "2"})
    assert not meta_matches({"a": "1"}, {"A": "1"})  # keys and values are exact, as Consul
    assert not meta_matches({}, {"a": ""})
    assert has_tag(["Prod"], "pROD") and not has_tag(["Prod"], "prod2")

"""Catalog: register/deregister and the Consul-shaped reads."""

from __future__ import annotations

import pytest

from node.state import commands as c
from node.state.catalog import Catalog
from tests.harness.state import StoreDriver as C

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

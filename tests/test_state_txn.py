"""Transactions (Consul's /v1/txn) and the generic id-keyed tables."""

from __future__ import annotations

import msgpack
import pytest

from node.state import StateStore
from node.state import commands as c

SID = "aaaaaaaa-0000-0000-0000-000000000001"


def _state(store: StateStore) -> object:
    obj = msgpack.unpackb(store.snapshot(), raw=False, strict_map_key=False)
    obj.pop("index")
    return obj


def test_txn_success_results() -> None:
    st = StateStore()
    assert st.apply(1, c.kv_set("a", b"old")).ok
    res = st.apply(
        2,
        c.txn(
            [
                c.txn_kv("set", "b", value=b"B", flags=3),
                c.txn_kv("cas", "a", value=b"new", index=1),
                c.txn_kv("get", "a"),
                c.txn_kv("get-tree", ""),
                c.txn_kv("check-index", "a", index=2),
                c.txn_kv("check-not-exists", "zzz"),
                c.txn_kv("get-or-empty", "zzz"),
                c.txn_kv("delete", "b"),
            ],
            now=0.0,
        ),
    )
    assert res.ok, res.error
    results = res.value["Results"]
    assert res.value["Errors"] is None
    assert results[0] == {
        "KV": {"Key": "b", "CreateIndex": 2, "ModifyIndex": 2, "LockIndex": 0, "Flags": 3,
               "Value": None}
    }  # fmt: skip
    assert results[1]["KV"]["Value"] is None and results[1]["KV"]["ModifyIndex"] == 2
    assert results[2]["KV"]["Value"] == b"new"
    assert [r["KV"]["Key"] for r in results[3:5]] == ["a", "b"]  # get-tree sees earlier ops
    assert results[5]["KV"]["Key"] == "a"  # check-index
    assert results[6]["KV"] == {"Key": "zzz", "CreateIndex": 0, "ModifyIndex": 0,
                                "LockIndex": 0, "Flags": 0, "Value": None}  # fmt: skip
    assert len(results) == 7  # no result entry for delete
    assert st.kv.get("b") is None
    e = st.kv.get("a")
    assert e is not None and e["Value"] == b"new"


def test_txn_rolls_back_and_reports_every_failing_op() -> None:
    st = StateStore()
    assert st.apply(1, c.kv_set("a", b"1")).ok
    before = _state(st)
    res = st.apply(
        2,
        c.txn(
            [
                c.txn_kv("set", "new", value=b"x"),
                c.txn_kv("cas", "a", value=b"2", index=99),
                c.txn_kv("delete", "a"),
                c.txn_kv("get", "missing"),
                c.txn_kv("lock", "l", session=SID),
                c.txn_kv("check-session", "a", session=SID),
                c.txn_kv("delete-cas", "new", index=1),
            ],
            now=0.0,
        ),
    )
    assert not res.ok and res.kind == "conflict"
    assert res.value["Results"] is None
    assert res.value["Errors"] == [
        {"OpIndex": 1, "What": 'failed to set key "a", index is stale'},
        {"OpIndex": 3, "What": 'key "missing" doesn\'t exist'},
        {"OpIndex": 4, "What": f"invalid session '{SID}'"},
        {"OpIndex": 5, "What": 'failed to check session, key "a" doesn\'t exist'},
        {"OpIndex": 6, "What": 'failed to delete key "new", index is stale'},
    ]
    assert _state(st) == before  # the set and the delete are gone too
    assert st.index == 2 and st.table_index("kvs") == 1


def test_txn_limits_and_bad_verbs() -> None:
    st = StateStore()
    ops = [c.txn_kv("set", f"k{i}") for i in range(129)]
    raw = msgpack.packb({"op": "txn", "ops": ops}, use_bin_type=True)
    res = st.apply(1, raw)
    assert res.kind == "too_large" and st.kv.keys() == []
    assert st.apply(2, c.txn(ops[:128], now=0.0)).ok and len(st.kv.keys()) == 128
    bad = msgpack.packb({"op": "txn", "ops": [{**ops[0], "verb": "frob"}]}, use_bin_type=True)
    res = st.apply(3, bad)
    assert res.kind == "invalid" and "unknown KV verb 'frob'" in str(res.error)
    bad = msgpack.packb({"op": "txn", "ops": [{"kind": "Node"}]}, use_bin_type=True)
    assert "unknown operation kind" in str(st.apply(4, bad).error)


def test_generic_tables_upsert_delete_cas() -> None:
    st = StateStore()
    assert st.apply(1, c.table_upsert("intentions", "i1", {"SourceName": "web"})).value is True
    row = st.tables.get("intentions", "i1")
    assert row == {"SourceName": "web", "CreateIndex": 1, "ModifyIndex": 1}
    x = {"SourceName": "x"}
    assert st.apply(2, c.table_upsert("intentions", "i1", x, cas=0)).value is False
    assert st.apply(3, c.table_upsert("intentions", "i1", x, cas=1)).value is True
    assert st.table_index("intentions") == 3 and st.table_index("ca_roots") == 0
    assert st.apply(4, c.table_delete("intentions", "i1", cas=1)).value is False
    assert st.apply(5, c.table_delete("intentions", "i1", cas=3)).value is True
    assert st.tables.list_rows("intentions") == []
    res = st.apply(6, c.table_upsert("nope", "x", {}))
    assert not res.ok and "unknown table 'nope'" in str(res.error)


def test_txn_table_ops_are_atomic_with_kv() -> None:
    st = StateStore()
    st.apply(1, c.table_upsert("ca_roots", "old", {"Active": True}))
    res = st.apply(
        2,
        c.txn(
            [
                c.txn_table("set", "ca_roots", "old", value={"Active": False}),
                c.txn_table("cas", "ca_roots", "new", value={"Active": True}, index=0),
                c.txn_table("get", "ca_roots", "new"),
                c.txn_kv("set", "marker", value=b"1"),
            ],
            now=0.0,
        ),
    )
    assert res.ok, res.error
    assert res.value["Results"][2] == {
        "Table": {"Table": "ca_roots", "ID": "new",
                  "Value": {"Active": True, "CreateIndex": 2, "ModifyIndex": 2}}
    }  # fmt: skip
    before = _state(st)
    res = st.apply(
        3,
        c.txn(
            [
                c.txn_table("delete", "ca_roots", "old"),
                c.txn_table("cas", "ca_roots", "new", value={}, index=1),
            ],
            now=0.0,
        ),
    )
    assert res.kind == "conflict"
    assert res.value["Errors"][0]["OpIndex"] == 1
    assert _state(st) == before


def test_txn_catalog_ops() -> None:
    st = StateStore()
    res = st.apply(
        1,
        c.txn(
            [
                c.txn_node("set", "n1", address="10.0.0.1"),
                c.txn_service("set", "n1", {"Service": "web", "Port": 80}),
                c.txn_check("set", "n1", {"CheckID": "web-ok", "ServiceID": "web",
                                          "Status": "passing"}),
                c.txn_node("get", "n1"),
            ], now=0.0
        ),
    )  # fmt: skip
    assert res.ok, res.error
    results = res.value["Results"]
    assert results[0]["Node"]["Address"] == "10.0.0.1"
    assert results[1]["Service"]["ID"] == "web" and results[1]["Service"]["ModifyIndex"] == 1
    assert results[2]["Check"]["ServiceName"] == "web"
    assert results[3]["Node"]["Node"] == "n1"
    assert [x["ServiceID"] for x in st.catalog.service_nodes("web")] == ["web"]

    before = _state(st)
    res = st.apply(
        2,
        c.txn(
            [
                c.txn_service("delete", "n1", service_id="web"),
                c.txn_node("cas", "n1", address="10.9.9.9", index=7),
                c.txn_check("get", "n1", check_id="web-ok"),  # deleted with its service
                c.txn_service("set", "ghost", {"Service": "x"}),
                c.txn_node("delete-cas", "n1", index=99),
            ],
            now=0.0,
        ),
    )
    assert res.kind == "conflict"
    assert res.value["Errors"] == [
        {"OpIndex": 1, "What": 'failed to set node "n1", index is stale'},
        {"OpIndex": 2, "What": 'check "web-ok" on node "n1" doesn\'t exist'},
        {"OpIndex": 3, "What": "Missing node registration 'ghost'"},
        {"OpIndex": 4, "What": 'failed to delete node "n1", index is stale'},
    ]
    assert _state(st) == before

    sid = "aaaaaaaa-0000-0000-0000-000000000001"
    assert st.apply(3, c.session_create(sid, "n1", node_checks=["web-ok"])).ok
    res = st.apply(
        4,
        c.txn(
            [
                c.txn_node("cas", "n1", address="10.9.9.9", index=1),
                c.txn_check("delete-cas", "n1", check_id="web-ok", index=1),
                c.txn_session("delete", sid),
            ],
            now=0.0,
        ),
    )
    assert res.ok, res.error
    assert res.value["Results"] == [{"Node": st.catalog.node("n1")}]
    node = st.catalog.node("n1")
    assert node is not None and node["Address"] == "10.9.9.9" and node["ModifyIndex"] == 4
    assert st.catalog.node_checks("n1") == [] and st.sessions.list_all() == []


def test_txn_catalog_op_validation() -> None:
    with pytest.raises(c.CommandError, match="needs the full 'service'"):
        c.txn([c.txn_service("set", "n1", service_id="web")], now=0.0)
    with pytest.raises(c.CommandError, match="unknown Node verb 'frob'"):
        c.txn([c.txn_node("frob", "n1")], now=0.0)
    with pytest.raises(c.CommandError, match="Status must be one of"):
        c.txn([c.txn_check("set", "n1", {"CheckID": "x", "Status": "meh"})], now=0.0)
    with pytest.raises(c.CommandError, match="unknown Session verb"):
        c.txn([c.txn_session("renew", "x")], now=0.0)

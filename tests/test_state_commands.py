"""Malformed commands: an error result, the index advances, nothing else changes."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from node.raft.types import Entry, EntryType
from node.state import StateStore
from node.state import commands as c


def _pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def _state(store: StateStore) -> object:
    obj = msgpack.unpackb(store.snapshot(), raw=False, strict_map_key=False)
    obj.pop("index")
    return obj


BAD: list[tuple[bytes, str]] = [
    (b"", "undecodable"),
    (b"\xc1", "undecodable"),
    (_pack([1, 2]), "must be a map"),
    (_pack({"key": "a"}), "unknown command op None"),
    (_pack({"op": "kv_explode"}), "unknown command op 'kv_explode'"),
    (_pack({"op": "kv_set", "key": "a"}), "missing field 'value'"),
    (_pack({"op": "kv_set", "key": 1, "value": b""}), "field 'key' must be str"),
    (_pack({"op": "kv_set", "key": "a", "value": "text"}), "field 'value' must be bytes"),
    (_pack({"op": "kv_set", "key": "a", "value": b"", "flags": True}), "'flags' must be u64"),
    (_pack({"op": "kv_set", "key": "a", "value": b"", "extra": 1}), "unknown field 'extra'"),
    (_pack({"op": "kv_set", "key": "a", "value": b"", "now": "x"}), "'now' must be a number"),
    (_pack({"op": "kv_cas", "key": "a", "value": b""}), "missing field 'index'"),
    (_pack({"op": "txn", "ops": {}}), "'ops' must be list"),
    (_pack({"op": "txn", "ops": [{"kind": "kv", "verb": "set"}]}), "missing field 'key'"),
    (_pack({"op": "register", "node": {"Node": "n"}}), "missing field 'Address'"),
    (
        _pack({"op": "register", "node": {"Node": "n", "Address": "a"}, "checks": [1]}),
        "expected a map",
    ),
    (_pack({"op": "session_create", "id": "x"}), "missing field 'node'"),
    (_pack({"op": "session_destroy", "id": None}), "'id' must be str"),
    (_pack({"op": "table_upsert", "table": "t", "id": "i", "value": []}), "'value' must be map"),
]


@pytest.mark.parametrize(("raw", "text"), BAD)
def test_bad_command_changes_nothing(raw: bytes, text: str) -> None:
    st = StateStore()
    assert st.apply(1, c.kv_set("a", b"1")).ok
    assert st.apply(2, c.table_upsert("intentions", "i", {"X": 1})).ok
    before = _state(st)
    woken: list[frozenset[str]] = []
    st._notify = woken.append
    res = st.apply(3, raw)
    assert not res.ok and res.kind == "invalid"
    assert text in str(res.error), res.error
    assert st.index == 3
    assert _state(st) == before
    assert woken == []
    # the store is still usable afterwards
    assert st.apply(4, c.kv_set("a", b"2")).ok
    assert woken == [frozenset({"kvs"})]


def test_builders_refuse_what_apply_would_refuse() -> None:
    with pytest.raises(c.CommandError, match="exceeds the 524288-byte limit"):
        c.kv_set("k", b"x" * (512 * 1024 + 1))
    with pytest.raises(c.CommandError, match="exceed the limit"):
        c.txn([c.txn_kv("get", "k")] * 129, now=0.0)
    with pytest.raises(c.CommandError, match="unknown KV verb"):
        c.txn([c.txn_kv("fetch", "k")], now=0.0)
    with pytest.raises(c.CommandError, match="unknown table verb"):
        c.txn([c.txn_table("merge", "ca_roots", "x")], now=0.0)


def test_decode_roundtrip_fills_defaults() -> None:
    cmd = c.decode(c.session_create("aaaaaaaa-0000-0000-0000-000000000001", "n1"))
    assert cmd.op == "session_create"
    assert cmd.args["node_checks"] == ["serfHealth"]
    assert cmd.args["lock_delay"] == 15_000_000_000
    assert cmd.args["behavior"] == "release"
    assert c.decode(c.kv_lock("k", b"v", "s", now=12.5)).now == 12.5


def test_index_must_increase_and_noops_advance() -> None:
    st = StateStore()
    st.apply_noop(1)
    assert st.apply(2, c.kv_set("a", b"")).ok
    assert st.index == 2
    with pytest.raises(ValueError):
        st.apply(2, c.kv_set("b", b""))
    assert st.kv.get("b") is None
    st.apply_noop(3)
    assert st.index == 3 and st.table_index("kvs") == 2
    assert st.apply_entry(Entry(4, 1, EntryType.NOOP)) is None
    res = st.apply_entry(Entry(5, 1, EntryType.NORMAL, c.kv_set("b", b"")))
    assert res is not None and res.ok and st.index == 5

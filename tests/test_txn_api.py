"""PUT /v1/txn on a one-node agent: Consul's request and response shapes, all-or-nothing."""

from __future__ import annotations

# ruff: noqa: F811 - pytest fixtures imported from test_kv_api are parameters here
import base64

import aiohttp

from tests.test_kv_api import agent, get, http, put  # noqa: F401 - fixtures and helpers


def b64(s: bytes) -> str:
    return base64.b64encode(s).decode()


async def txn(http: aiohttp.ClientSession, ops: object) -> tuple[int, object]:
    async with http.put("/v1/txn", json=ops) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body


async def test_kv_ops_apply_together_and_return_results(http: aiohttp.ClientSession) -> None:
    status, body = await txn(http, [
        {"KV": {"Verb": "set", "Key": "t/a", "Value": b64(b"1")}},
        {"KV": {"Verb": "set", "Key": "t/b", "Value": b64(b"2"), "Flags": 7}},
        {"KV": {"Verb": "get", "Key": "t/a"}},
    ])  # fmt: skip
    assert status == 200 and isinstance(body, dict) and body["Errors"] is None
    results = body["Results"]
    assert [r["KV"]["Key"] for r in results] == ["t/a", "t/b", "t/a"]
    assert results[1]["KV"]["Flags"] == 7 and results[2]["KV"]["Value"] == b64(b"1")
    _, entries, _ = await get(http, "/v1/kv/t/?recurse")
    assert isinstance(entries, list) and [e["Key"] for e in entries] == ["t/a", "t/b"]


async def test_a_failing_op_rolls_everything_back_with_409(http: aiohttp.ClientSession) -> None:
    await put(http, "keep", b"old")
    status, body = await txn(http, [
        {"KV": {"Verb": "set", "Key": "keep", "Value": b64(b"new")}},
        {"KV": {"Verb": "cas", "Key": "other", "Value": b64(b"x"), "Index": 999}},
    ])  # fmt: skip
    assert status == 409 and isinstance(body, dict) and body["Results"] is None
    assert [e["OpIndex"] for e in body["Errors"]] == [1] and body["Errors"][0]["What"]
    _, entries, _ = await get(http, "/v1/kv/keep")
    assert isinstance(entries, list) and base64.b64decode(entries[0]["Value"]) == b"old"


async def test_catalog_ops_in_a_txn(http: aiohttp.ClientSession) -> None:
    status, body = await txn(http, [
        {"Node": {"Verb": "set", "Node": {"Node": "tx1", "Address": "10.9.0.1"}}},
        {"Service": {"Verb": "set", "Node": "tx1",
                     "Service": {"ID": "s1", "Service": "svc", "Port": 80}}},
        {"Check": {"Verb": "set", "Check": {"Node": "tx1", "CheckID": "c1", "Status": "passing",
                                            "ServiceID": "s1"}}},
    ])  # fmt: skip
    assert status == 200, body
    _, inst, _ = await get(http, "/v1/health/service/svc?passing")
    assert isinstance(inst, list) and [i["Node"]["Node"] for i in inst] == ["tx1"]


BIG = base64.b64encode(b"x" * (512 * 1024 + 1)).decode()  # one byte over Consul's KV limit


async def test_bad_transactions_are_refused(http: aiohttp.ClientSession) -> None:
    for ops, code, text in [
        ("not a list", 400, "array"),
        ([{"Bogus": {}}], 400, "unknown operation"),
        ([{"KV": {"Verb": "set", "Key": "k", "Value": "%%%"}}], 400, "base64"),
        ([{"KV": {"Verb": "explode", "Key": "k"}}], 400, "explode"),
        ([{"KV": {"Verb": "set", "Key": f"k{i}"}} for i in range(129)], 413, "too many"),
        ([{"KV": {"Verb": "set", "Key": "k0", "Value": BIG}}], 413, "limit"),
    ]:
        status, body = await txn(http, ops)
        assert status == code and text in str(body), (ops if len(str(ops)) < 80 else "...", body)
    async with http.put("/v1/txn", data=b"{broken") as r:
        assert r.status == 400
    assert (await get(http, "/v1/kv/k0"))[0] == 404


async def test_bodies_are_decoded_as_go_does(http: aiohttp.ClientSession) -> None:
    """NaN/Infinity tokens and numbers past float64 are decode errors (400) on every JSON body,
    as Go's encoding/json makes them, never a stored infinity or a 500."""
    for path in ("/v1/txn", "/v1/session/create"):
        for body in (b'{"TTL": NaN}', b'[{"KV": {"Flags": Infinity}}]', b'{"LockDelay": 1e999}'):
            async with http.put(path, data=body) as r:
                assert r.status == 400, (path, body, r.status, await r.text())

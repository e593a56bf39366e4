"""/v1/kv, /v1/status, /v1/operator/raft and /v1/snapshot on a one-node (--dev) agent: fake
gossip, real Raft (durable log in tmp_path), real HTTP. Consul's shapes and semantics."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path

import aiohttp
import pytest

from node.agent import Agent
from node.api.operator import pack_snapshot
from node.consensus import Consensus
from node.leader import SERF_CHECK_ID
from node.state import commands as c
from tests.test_http_api import FakeRuntime, FakeWorld, make_config


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    config = make_config(tmp_path, dev=True, server_port=0)
    a = Agent(config, runtime_factory=partial(FakeRuntime, FakeWorld()))
    a.add_component(Consensus(a))
    await a.start()
    try:
        yield a
    finally:
        await a.stop()


@pytest.fixture
async def http(agent: Agent) -> AsyncIterator[aiohttp.ClientSession]:
    assert agent.http is not None
    async with aiohttp.ClientSession(f"http://127.0.0.1:{agent.http.port}") as s:
        yield s


async def put(http: aiohttp.ClientSession, key: str, data: bytes = b"", **q: str) -> object:
    async with http.put(f"/v1/kv/{key}", data=data, params=q) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def get(http: aiohttp.ClientSession, path: str) -> tuple[int, object, dict[str, str]]:
    async with http.get(path) as r:
        body = await r.json() if r.content_type == "application/json" else await r.read()
        return r.status, body, dict(r.headers)


async def test_put_get_round_trip_with_consul_headers(http: aiohttp.ClientSession) -> None:
    assert await put(http, "a/b", b"\x00\xffbinary") is True
    status, body, headers = await get(http, "/v1/kv/a/b")
    assert status == 200
    assert isinstance(body, list) and len(body) == 1
    e = body[0]
    assert set(e) == {"Key", "CreateIndex", "ModifyIndex", "LockIndex", "Flags", "Value"}
    assert base64.b64decode(e["Value"]) == b"\x00\xffbinary"
    assert e["CreateIndex"] == e["ModifyIndex"] > 0 and e["LockIndex"] == 0 == e["Flags"]
    assert int(headers["X-Consul-Index"]) >= e["ModifyIndex"]
    assert headers["X-Consul-KnownLeader"] == "true" and headers["X-Consul-LastContact"] == "0"
    async with http.get("/v1/kv/a/b?raw") as r:
        assert r.content_type == "text/plain" and await r.read() == b"\x00\xffbinary"


async def test_missing_key_is_404_with_an_index_and_empty_values_read_as_null(
    http: aiohttp.ClientSession,
) -> None:
    status, _, headers = await get(http, "/v1/kv/missing")
    assert status == 404 and int(headers["X-Consul-Index"]) >= 1
    await put(http, "empty")
    _, body, _ = await get(http, "/v1/kv/empty")
    assert isinstance(body, list) and body[0]["Value"] is None


async def test_cas_flags_and_their_validation(http: aiohttp.ClientSession) -> None:
    assert await put(http, "k", b"1", cas="0") is True
    assert await put(http, "k", b"2", cas="0") is False  # cas=0: only if absent
    _, body, _ = await get(http, "/v1/kv/k")
    assert isinstance(body, list)
    index = body[0]["ModifyIndex"]
    assert await put(http, "k", b"3", cas=str(index - 1)) is False
    assert await put(http, "k", b"4", cas=str(index), flags="42") is True
    _, body, _ = await get(http, "/v1/kv/k")
    assert isinstance(body, list) and body[0]["Flags"] == 42
    assert base64.b64decode(body[0]["Value"]) == b"4"
    assert await put(http, "nope", b"x", cas="50") is False
    for bad in ({"cas": "x"}, {"flags": "-1"}, {"flags": str(2**64)}):
        async with http.put("/v1/kv/k", data=b"bad", params=bad) as r:
            assert r.status == 400 and "Invalid" in await r.text()
    _, body, _ = await get(http, "/v1/kv/k")
    assert isinstance(body, list) and base64.b64decode(body[0]["Value"]) == b"4"


async def test_recurse_keys_separator_and_deletes(http: aiohttp.ClientSession) -> None:
    for k in ("base/", "base/foo", "base/base/a", "base/base/b", "other"):
        await put(http, k, b"v")
    _, body, _ = await get(http, "/v1/kv/base/?recurse")
    assert isinstance(body, list)
    assert [e["Key"] for e in body] == ["base/", "base/base/a", "base/base/b", "base/foo"]
    _, keys, _ = await get(http, "/v1/kv/base/?keys&separator=/")
    assert keys == ["base/", "base/base/", "base/foo"]
    async with http.delete("/v1/kv/base/base?recurse") as r:
        assert await r.json() is True
    _, keys, _ = await get(http, "/v1/kv/?keys")
    assert keys == ["base/", "base/foo", "other"]
    _, body, _ = await get(http, "/v1/kv/other")
    assert isinstance(body, list)
    index = body[0]["ModifyIndex"]
    async with http.delete("/v1/kv/other", params={"cas": str(index + 1)}) as r:
        assert await r.json() is False
    async with http.delete("/v1/kv/other", params={"cas": str(index)}) as r:
        assert await r.json() is True
    assert (await get(http, "/v1/kv/other"))[0] == 404
    async with http.delete("/v1/kv/") as r:
        assert r.status == 400 and "Missing key name" in await r.text()


async def test_bad_requests_are_refused_and_store_nothing(http: aiohttp.ClientSession) -> None:
    await put(http, "big", b"small")
    async with http.put("/v1/kv/big", data=b"x" * (512 * 1024 + 1)) as r:
        assert r.status == 413 and "too large" in await r.text()
    async with http.put("/v1/kv/big", data=b"x" * (512 * 1024)) as r:
        assert r.status == 200  # exactly the limit is fine
    async with http.put("/v1/kv/", data=b"x") as r:
        assert r.status == 400 and "Missing key name" in await r.text()
    async with http.get("/v1/kv/big?stale&consistent") as r:
        assert r.status == 400 and "conflicting" in await r.text()
    async with http.get("/v1/kv/big?index=abc") as r:
        assert r.status == 400
    async with http.get("/v1/kv/big?dc=elsewhere") as r:
        assert r.status == 500 and "No path to datacenter" in await r.text()
    async with http.put("/v1/kv/lock", data=b"x", params={"acquire": "not-a-session"}) as r:
        assert r.status == 400 and "session" in await r.text()
    assert (await get(http, "/v1/kv/lock"))[0] == 404


async def test_consistency_modes_all_answer_on_the_leader(http: aiohttp.ClientSession) -> None:
    await put(http, "m", b"v")
    for mode in ("", "?stale", "?consistent"):
        status, body, headers = await get(http, "/v1/kv/m" + mode)
        assert status == 200 and isinstance(body, list) and body[0]["Key"] == "m"
        assert headers["X-Consul-KnownLeader"] == "true"


async def test_blocking_get_waits_for_a_change_and_times_out_with_the_same_index(
    http: aiohttp.ClientSession,
) -> None:
    await put(http, "w", b"1")
    _, _, headers = await get(http, "/v1/kv/w")
    index = headers["X-Consul-Index"]
    t0 = time.monotonic()
    _, _, headers = await get(http, f"/v1/kv/w?index={index}&wait=200ms")
    assert headers["X-Consul-Index"] == index and time.monotonic() - t0 >= 0.2

    async def write_later() -> None:
        await asyncio.sleep(0.3)
        await put(http, "w", b"2")

    writer = asyncio.create_task(write_later())
    t0 = time.monotonic()
    _, body, headers = await get(http, f"/v1/kv/w?index={index}&wait=10s")
    waited = time.monotonic() - t0
    await writer
    assert int(headers["X-Consul-Index"]) > int(index)
    assert isinstance(body, list) and base64.b64decode(body[0]["Value"]) == b"2"
    assert 0.25 <= waited < 2.0
    # a write to another prefix wakes the table but not this prefix's result: keep waiting
    await put(http, "w/x", b"1")
    _, _, headers = await get(http, "/v1/kv/w/?recurse")
    t0 = time.monotonic()
    other = asyncio.create_task(put(http, "unrelated", b"x"))
    index = headers["X-Consul-Index"]
    status, _, headers = await get(http, f"/v1/kv/w/?recurse&index={index}&wait=300ms")
    await other
    assert status == 200 and time.monotonic() - t0 >= 0.3
    assert headers["X-Consul-Index"] == index


async def test_locks_with_a_session_of_this_node(agent: Agent, http: aiohttp.ClientSession) -> None:
    consensus = agent.consensus
    assert consensus is not None
    store = consensus.store
    # the leader registers its members in the catalog, with the serfHealth check sessions use
    for _ in range(100):
        check = store.catalog.check("node1", SERF_CHECK_ID)
        if check is not None and check["Status"] == "passing":
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the leader did not register node1 with a passing serfHealth check")
    sid, other = "aaaaaaaa-0000-0000-0000-000000000001", "bbbbbbbb-0000-0000-0000-000000000002"
    for s in (sid, other):
        assert (await consensus.write(c.session_create(s, "node1", lock_delay_ns=0))).ok
    assert await put(http, "lk", b"mine", acquire=sid) is True
    assert await put(http, "lk", b"theirs", acquire=other) is False
    assert await put(http, "lk", b"again", acquire=sid) is True
    _, body, _ = await get(http, "/v1/kv/lk")
    assert isinstance(body, list) and body[0]["Session"] == sid and body[0]["LockIndex"] == 1
    assert await put(http, "lk", b"x", release=other) is False
    assert await put(http, "lk", b"x", release=sid) is True
    _, body, _ = await get(http, "/v1/kv/lk")
    assert isinstance(body, list) and "Session" not in body[0]


async def test_status_and_raft_configuration(agent: Agent, http: aiohttp.ClientSession) -> None:
    consensus = agent.consensus
    assert consensus is not None and consensus.raft is not None
    addr = f"127.0.0.1:{consensus.raft.port}"
    assert (await get(http, "/v1/status/leader"))[1] == addr
    assert (await get(http, "/v1/status/peers"))[1] == [addr]
    _, me, _ = await get(http, "/v1/agent/self")
    assert isinstance(me, dict) and me["Config"]["Server"] is True
    stats = me["Stats"]
    assert stats["consul"]["leader_addr"] == addr and stats["consul"]["server"] == "true"
    assert stats["raft"]["state"] == "Leader" and int(stats["raft"]["applied_index"]) > 0
    status, body, headers = await get(http, "/v1/operator/raft/configuration")
    assert status == 200 and isinstance(body, dict)
    (srv,) = body["Servers"]
    assert srv["ID"] == agent.node_id and srv["Node"] == "node1" and srv["Address"] == addr
    assert srv["Leader"] is True and srv["Voter"] is True and srv["ProtocolVersion"] == "3"
    assert body["Index"] == 0 and int(headers["X-Consul-Index"]) >= 1  # Consul's body Index is 0
    for path in ("/v1/status/leader", "/v1/status/peers"):
        async with http.get(f"{path}?dc=dc9") as r:
            assert r.status == 500 and "No path to datacenter" in await r.text()
    async with http.post("/v1/operator/raft/transfer-leader") as r:
        assert r.status == 500 and "no other voter" in await r.text()
    async with http.delete("/v1/operator/raft/peer?id=nobody") as r:
        assert r.status == 500 and "not found" in await r.text()
    async with http.delete("/v1/operator/raft/peer") as r:
        assert r.status == 400
    async with http.delete(f"/v1/operator/raft/peer?id={agent.node_id}") as r:
        assert r.status == 400 and "leader" in await r.text()
    assert (await get(http, "/v1/status/peers"))[1] == [addr]


async def test_snapshot_save_and_restore(http: aiohttp.ClientSession) -> None:
    await put(http, "keep", b"before")
    async with http.get("/v1/snapshot") as r:
        assert r.status == 200 and int(r.headers["X-Consul-Index"]) > 0
        archive = await r.read()
    assert archive[:2] == b"\x1f\x8b"
    await put(http, "keep", b"after")
    await put(http, "new", b"x")
    async with http.put("/v1/snapshot", data=archive) as r:
        assert r.status == 200, await r.text()
    _, body, _ = await get(http, "/v1/kv/keep")
    assert isinstance(body, list) and base64.b64decode(body[0]["Value"]) == b"before"
    assert (await get(http, "/v1/kv/new"))[0] == 404
    # damaged archives are refused and change nothing
    for bad in (b"garbage", archive[:-20], pack_snapshot(b"\x93not msgpack state", 1, 1)):
        async with http.put("/v1/snapshot", data=bad) as r:
            assert r.status == 400, (r.status, await r.text())
    _, body, _ = await get(http, "/v1/kv/keep")
    assert isinstance(body, list) and base64.b64decode(body[0]["Value"]) == b"before"


async def test_a_restore_wakes_blocked_reads(http: aiohttp.ClientSession) -> None:
    """A restore replaces everything: every blocked read returns at once, even one whose index
    goes back (a prefix read's index is its entries' highest ModifyIndex, which the restore set
    back; Consul answers those too, and its clients reset to 0 on a lower index)."""
    await put(http, "tree/a", b"1")
    async with http.get("/v1/snapshot") as r:
        archive = await r.read()
    await put(http, "tree/b", b"2")
    _, _, headers = await get(http, "/v1/kv/tree/?recurse")
    index = int(headers["X-Consul-Index"])

    async def blocked(path: str) -> tuple[float, int]:
        async with http.get(f"{path}index={index}&wait=10s") as r:
            await r.read()
            return time.monotonic(), int(r.headers["X-Consul-Index"])

    waiters = [asyncio.create_task(blocked(p)) for p in
               ("/v1/kv/tree/?recurse&", "/v1/kv/tree/a?", "/v1/kv/tree/?keys&")]  # fmt: skip
    await asyncio.sleep(0.2)
    assert not any(w.done() for w in waiters)
    async with http.put("/v1/snapshot", data=archive) as r:
        assert r.status == 200, await r.text()
    restored = time.monotonic()
    for woke, new_index in await asyncio.wait_for(asyncio.gather(*waiters), 5):
        assert new_index != index and woke - restored < 0.5
    status, keys, _ = await get(http, "/v1/kv/tree/?keys")
    assert status == 200 and keys == ["tree/a"]


# ----- /v1/session -----


async def wait_node_registered(agent: Agent) -> None:
    consensus = agent.consensus
    assert consensus is not None
    for _ in range(100):
        check = consensus.store.catalog.check("node1", SERF_CHECK_ID)
        if check is not None and check["Status"] == "passing":
            return
        await asyncio.sleep(0.05)
    pytest.fail("the leader did not register node1 with a passing serfHealth check")


async def test_session_lifecycle(agent: Agent, http: aiohttp.ClientSession) -> None:
    await wait_node_registered(agent)
    async with http.put("/v1/session/create", json={"Name": "s1", "LockDelay": "1ms"}) as r:
        assert r.status == 200, await r.text()
        sid = (await r.json())["ID"]
    _, body, headers = await get(http, f"/v1/session/info/{sid}")
    assert isinstance(body, list) and len(body) == 1 and "X-Consul-Index" in headers
    s = body[0]
    assert (s["ID"], s["Name"], s["Node"], s["Behavior"]) == (sid, "s1", "node1", "release")
    assert s["LockDelay"] == 1_000_000 and s["NodeChecks"] == ["serfHealth"]
    async with http.put(f"/v1/session/renew/{sid}") as r:
        assert r.status == 200 and (await r.json())[0]["ID"] == sid
    assert [x["ID"] for x in (await get(http, "/v1/session/list"))[1]] == [sid]  # type: ignore[union-attr]
    assert [x["ID"] for x in (await get(http, "/v1/session/node/node1"))[1]] == [sid]  # type: ignore[union-attr]
    async with http.put(f"/v1/session/destroy/{sid}") as r:
        assert await r.json() is True
    assert (await get(http, f"/v1/session/info/{sid}"))[1] == []
    async with http.put(f"/v1/session/renew/{sid}") as r:
        assert r.status == 404
    async with http.put("/v1/session/renew/111") as r:  # malformed: unknown too, as in Consul
        assert r.status == 404
    async with http.put(f"/v1/session/destroy/{sid}") as r:  # idempotent
        assert await r.json() is True


async def test_destroying_a_delete_session_deletes_its_keys(
    agent: Agent, http: aiohttp.ClientSession
) -> None:
    await wait_node_registered(agent)
    async with http.put(
        "/v1/session/create", json={"behavior": "delete", "ttl": "20s", "lock_delay": 0}
    ) as r:  # snake_case and lower-case keys, as some clients send them
        sid = (await r.json())["ID"]
    _, body, _ = await get(http, f"/v1/session/info/{sid}")
    assert isinstance(body, list) and body[0]["TTL"] == "20s" and body[0]["Behavior"] == "delete"
    assert await put(http, "held", b"x", acquire=sid) is True
    async with http.put(f"/v1/session/destroy/{sid}") as r:
        assert r.status == 200
    assert (await get(http, "/v1/kv/held"))[0] == 404


async def test_bad_session_requests(agent: Agent, http: aiohttp.ClientSession) -> None:
    await wait_node_registered(agent)
    for body, text in [
        (b"{not json", "decode"),
        (b"[]", "object"),
        (b'{"TTL": "5s"}', "TTL"),
        (b'{"Behavior": "explode"}', "Behavior"),
        (b'{"LockDelay": "2m"}', "LockDelay"),
        (b'{"Node": "nowhere"}', "nowhere"),
        (b'{"NodeChecks": ["no-such-check"]}', "no-such-check"),
    ]:
        async with http.put("/v1/session/create", data=body) as r:
            assert 400 <= r.status < 500 and text in await r.text(), (body, r.status)
    async with http.put("/v1/session/destroy/not-a-uuid") as r:
        assert r.status == 400
    assert (await get(http, "/v1/session/list"))[1] == []


# ----- /v1/agent/metrics -----


async def test_metrics_in_prometheus_text_and_consul_json(http: aiohttp.ClientSession) -> None:
    await put(http, "m1", b"x")
    async with http.get("/v1/agent/metrics?format=prometheus") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=")
        text = await r.text()
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["meshnode_raft_leader"].samples[0].value == 1
    assert families["meshnode_kv_entries"].samples[0].value == 1
    puts = [s for s in families["meshnode_http_requests"].samples
            if s.labels == {"method": "PUT", "status": "200"}]  # fmt: skip
    assert puts and puts[0].value >= 1
    assert "process_resident_memory_bytes" in families
    async with http.get("/v1/agent/metrics") as r:
        body = await r.json()
    assert set(body) == {"Timestamp", "Gauges", "Points", "Counters", "Samples"}
    gauges = {g["Name"]: g["Value"] for g in body["Gauges"]}
    assert gauges["meshnode.raft.leader"] == 1 and gauges["meshnode.kv.entries"] == 1
    assert any(c["Name"] == "meshnode.http.requests" for c in body["Counters"])

"""Three Raft runtimes in one process over real TCP on loopback, with the real storage and state
store: bootstrap, replicated writes (also forwarded from followers), ReadIndex reads, restart."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import pytest

from node.raft.core import RaftConfig
from node.raft.recovery import RecoveryError, parse_peers
from node.raft.runtime import RaftRuntime
from node.raft.types import Configuration, Server
from node.state import commands
from node.state.store import StateStore


async def start_cluster(tmp: Path, ports: list[int] | None = None, **kw: Any) -> list[RaftRuntime]:
    rts = []
    for i in range(3):
        rt = RaftRuntime(
            node_id=f"id{i}",
            data_dir=tmp / f"n{i}",
            host="127.0.0.1",
            port=ports[i] if ports else 0,
            fsm=StateStore(),
            config=RaftConfig(),
            tick_interval=0.02,
            rng=random.Random(i),
            **kw,
        )
        await rt.start()
        rts.append(rt)
    return rts


def config_of(rts: list[RaftRuntime]) -> Configuration:
    return Configuration(
        {rt.node_id: Server(rt.node_id, rt.node_id, f"127.0.0.1:{rt.port}") for rt in rts}
    )


async def bootstrap(rts: list[RaftRuntime]) -> str:
    """Bootstrap all of them as cluster "c1"; the elected leader's ID."""
    cfg = config_of(rts)
    for rt in rts:
        rt.set_cluster_id("c1")
        rt.bootstrap(cfg)
    return await rts[0].wait_for_leader(10)


async def test_bootstrap_write_forward_read_and_restart(tmp_path: Path) -> None:
    rts = await start_cluster(tmp_path)
    try:
        leader = await bootstrap(rts)
        assert all([await rt.wait_for_leader(10) == leader for rt in rts])
        for i, rt in enumerate(rts):  # the followers forward to the leader
            res = await rt.apply(commands.kv_set(f"k{i}", f"v{i}".encode()), 10)
            assert res.ok, res
        for rt in rts:
            await rt.read_barrier(10)
            store = rt.fsm
            assert isinstance(store, StateStore)
            assert [e["Key"] for e in store.kv.list_prefix("k")] == ["k0", "k1", "k2"]
    finally:
        ports = [rt.port for rt in rts]
        for rt in rts:
            await rt.stop()
    rts = await start_cluster(tmp_path, ports)  # everything acknowledged survives a restart
    try:
        await rts[0].wait_for_leader(10)
        await rts[1].read_barrier(10)
        store = rts[1].fsm
        assert isinstance(store, StateStore)
        assert [e["Key"] for e in store.kv.list_prefix("k")] == ["k0", "k1", "k2"]
    finally:
        for rt in rts:
            await rt.stop()


async def test_foreign_cluster_messages_are_dropped(tmp_path: Path) -> None:
    rts = await start_cluster(tmp_path)
    try:
        cfg = config_of(rts)
        rts[0].set_cluster_id("a")
        rts[1].set_cluster_id("b")
        rts[2].set_cluster_id("b")
        for rt in rts:
            rt.bootstrap(cfg)
        await asyncio.sleep(1.5)
        assert rts[0].dropped_foreign + rts[1].dropped_foreign + rts[2].dropped_foreign > 0
        # b holds 2 of 3 voters: it elects a leader among n1/n2, never n0
        leader = await rts[1].wait_for_leader(10)
        assert leader in ("id1", "id2")
    finally:
        for rt in rts:
            await rt.stop()


async def test_peers_json_recovers_a_survivor_that_lost_quorum(tmp_path: Path) -> None:
    rts = await start_cluster(tmp_path)
    try:
        await bootstrap(rts)
        for i in range(5):
            assert (await rts[i % 3].apply(commands.kv_set(f"k{i}", b"v"), 10)).ok
        await rts[0].read_barrier(10)
    finally:
        for rt in rts:
            await rt.stop()
    # two of three voters are gone for good: node 0 alone can never win an election...
    survivor = tmp_path / "n0"
    (survivor / "peers.json").write_text("[{broken")
    bad = RaftRuntime(node_id="id0", data_dir=survivor, host="127.0.0.1", port=0,
                      fsm=StateStore(), tick_interval=0.02)  # fmt: skip
    with pytest.raises(RecoveryError, match="not valid JSON"):
        await bad.start()
    await bad.stop()
    assert (survivor / "peers.json").exists()  # a bad file changes nothing and stays
    # ...until the operator lists it as the only server in peers.json
    (survivor / "peers.json").write_text(
        json.dumps([{"id": "id0", "address": "127.0.0.1:1", "non_voter": False}])
    )
    rt = RaftRuntime(node_id="id0", data_dir=survivor, host="127.0.0.1", port=0,
                     fsm=StateStore(), tick_interval=0.02)  # fmt: skip
    await rt.start()
    try:
        assert await rt.wait_for_leader(5) == "id0"
        assert rt.configuration.voters == {"id0"}
        assert (await rt.apply(commands.kv_set("after", b"1"), 5)).ok
        store = rt.fsm
        assert isinstance(store, StateStore)
        assert [e["Key"] for e in store.kv.list_prefix("")] == [
            "after", "k0", "k1", "k2", "k3", "k4",
        ]  # fmt: skip
        assert not (survivor / "peers.json").exists() and (survivor / "peers.info").exists()
    finally:
        await rt.stop()


def test_peers_json_is_validated() -> None:
    ok = parse_peers('[{"id": "a", "address": "10.0.0.1:8300"}, '
                     '{"id": "b", "address": "10.0.0.2:8300", "non_voter": true}]')  # fmt: skip
    assert ok.voters == {"a"} and ok.learners == {"b"}
    for text, err in [
        ("{}", "non-empty JSON list"),
        ("[]", "non-empty JSON list"),
        ('[{"address": "x:1"}]', "missing id"),
        ('[{"id": "a", "address": "nope"}]', "ip:port"),
        ('[{"id": "a", "address": "h:1"}, {"id": "a", "address": "h:2"}]', "duplicate"),
        ('[{"id": "a", "address": "h:1", "non_voter": true}]', "no voter"),
    ]:
        with pytest.raises(RecoveryError, match=err):
            parse_peers(text)


async def test_snapshots_compact_the_log_and_bring_a_lagging_follower_back(tmp_path: Path) -> None:
    rts = await start_cluster(tmp_path, snapshot_threshold=50, snapshot_interval=0.0)
    lagging: RaftRuntime | None = None
    try:
        leader_id = await bootstrap(rts)
        leader = next(rt for rt in rts if rt.node_id == leader_id)
        lagging = next(rt for rt in rts if rt is not leader)
        port = lagging.port
        await lagging.stop()
        rts.remove(lagging)
        for i in range(300):  # the two that remain are a quorum
            assert (await leader.apply(commands.kv_set(f"k{i:03}", b"v"), 10)).ok
        storage = leader.storage
        assert storage is not None and storage.snapshot_meta.index >= 250
        assert storage.first_index > 50  # the log before the snapshot is gone
        lagging = RaftRuntime(
            node_id=lagging.node_id,
            data_dir=lagging.data_dir,
            host="127.0.0.1",
            port=port,
            fsm=StateStore(),
            tick_interval=0.02,
        )
        await lagging.start()
        rts.append(lagging)
        await lagging.read_barrier(10)  # needs InstallSnapshot: the entries it misses are gone
        store = lagging.fsm
        assert isinstance(store, StateStore)
        assert len(store.kv.list_prefix("k")) == 300
    finally:
        for rt in rts:
            await rt.stop()

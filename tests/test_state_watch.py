"""Watch: blocking on table indexes, woken by applies."""

from __future__ import annotations

import asyncio

from node.state import StateStore
from node.state import commands as c


async def test_returns_at_once_when_index_already_past() -> None:
    s = StateStore()
    s.apply(5, c.kv_set("k", b""))
    assert await s.watch.wait({"kvs"}, 4, timeout=10) == 5
    assert s.watch.waiting() == 0


async def test_woken_in_the_next_loop_pass_after_apply() -> None:
    s = StateStore()
    s.apply(1, c.kv_set("k", b""))
    task = asyncio.create_task(s.watch.wait({"kvs"}, 1, timeout=30))
    await asyncio.sleep(0)
    assert not task.done() and s.watch.waiting() == 1
    s.apply(2, c.kv_set("k", b"new"))
    await asyncio.sleep(0)  # one pass: the waiter runs before we do
    assert task.done()
    assert task.result() == 2
    assert s.watch.waiting() == 0


async def test_other_tables_do_not_wake_and_timeout_returns_current() -> None:
    s = StateStore()
    s.apply(1, c.kv_set("k", b""))
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(s.watch.wait({"kvs"}, 1, timeout=0.2))
    await asyncio.sleep(0)
    t0 = loop.time()
    s.apply(2, c.table_upsert("intentions", "i", {}))  # unrelated table
    s.apply(3, c.kv_set("k", b""))  # unchanged write: kvs index does not move
    await asyncio.sleep(0.05)
    assert not task.done()
    assert await task == 1  # timed out: the current index, which may equal min_index
    assert loop.time() - t0 >= 0.1
    assert s.watch.waiting() == 0


async def test_wait_on_several_tables_and_on_all() -> None:
    s = StateStore()
    any_table = asyncio.create_task(s.watch.wait((), 0, timeout=30))
    nodes_or_svcs = asyncio.create_task(s.watch.wait({"nodes", "services"}, 0, timeout=30))
    await asyncio.sleep(0)
    s.apply(1, c.table_upsert("ca_roots", "r", {}))
    await asyncio.sleep(0)
    assert any_table.done() and any_table.result() == 1
    assert not nodes_or_svcs.done()
    s.apply(2, c.register("n1", "10.0.0.1", service={"Service": "web"}, now=0.0))
    await asyncio.sleep(0)
    assert nodes_or_svcs.result() == 2


async def test_restore_wakes_waiters() -> None:
    src = StateStore()
    src.apply(9, c.kv_set("k", b""))
    s = StateStore()
    task = asyncio.create_task(s.watch.wait({"kvs"}, 0, timeout=30))
    await asyncio.sleep(0)
    s.restore(src.snapshot())
    await asyncio.sleep(0)
    assert task.result() == 9


async def test_failed_command_does_not_wake() -> None:
    s = StateStore()
    task = asyncio.create_task(s.watch.wait({"kvs"}, 0, timeout=0.05))
    await asyncio.sleep(0)
    s.apply(1, c.txn([c.txn_kv("set", "a"), c.txn_kv("get", "missing")], now=0.0))
    await asyncio.sleep(0)
    assert not task.done()
    assert await task == 0


async def test_cancelled_wait_cleans_up() -> None:
    s = StateStore()
    task = asyncio.create_task(s.watch.wait({"kvs"}, 0, timeout=30))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert s.watch.waiting() == 0


def _a_and_b() -> StateStore:
    """Service a on node na and service b on node nb, each node with a serfHealth check."""
    s = StateStore()
    for i, (node, svc) in enumerate((("na", "a"), ("nb", "b")), start=1):
        s.apply(i, c.register(node, f"10.0.0.{i}", service={"ID": f"{svc}1", "Service": svc},
                              checks=[{"CheckID": "serfHealth", "Status": "passing"}],
                              now=0.0))  # fmt: skip
    return s


async def test_a_service_watcher_sleeps_through_other_services_and_nodes() -> None:
    s = _a_and_b()
    b = s.table_index("service.b")
    assert b == 2
    task = asyncio.create_task(s.watch.wait({"service.b"}, b, timeout=30))
    await asyncio.sleep(0)
    s.apply(3, c.register("na", "10.0.0.1", service={"ID": "a2", "Service": "a"}, now=0.0))
    s.apply(4, c.register("na", "10.0.0.1", checks=[{"CheckID": "serfHealth",
                                                     "Status": "critical"}], now=0.0))  # fmt: skip
    s.apply(5, c.deregister("na", service_id="a1", now=0.0))
    await asyncio.sleep(0.02)
    assert not task.done() and s.table_index("service.b") == 2
    # a node-level check on b's node is part of b's health: it wakes the watcher
    s.apply(6, c.register("nb", "10.0.0.2", checks=[{"CheckID": "serfHealth",
                                                     "Status": "critical"}], now=0.0))  # fmt: skip
    await asyncio.sleep(0)
    assert task.done() and task.result() == 6
    assert s.watch.waiting() == 0


async def test_the_last_instance_leaving_wakes_its_watcher() -> None:
    s = _a_and_b()
    task = asyncio.create_task(s.watch.wait({"service.b"}, 2, timeout=30))
    await asyncio.sleep(0)
    s.apply(3, c.deregister("nb", service_id="b1", now=0.0))
    await asyncio.sleep(0)
    assert task.done() and task.result() == 3 > 2
    assert s.catalog.service_nodes("b") == [] and s.catalog.health_service("b") == []
    # the vanished service's watcher blocks again until b comes back
    again = asyncio.create_task(s.watch.wait({"service.b"}, 3, timeout=30))
    await asyncio.sleep(0)
    s.apply(4, c.register("na", "10.0.0.1", service={"ID": "a2", "Service": "a"}, now=0.0))
    await asyncio.sleep(0)
    assert not again.done()
    s.apply(5, c.register("na", "10.0.0.1", service={"ID": "b9", "Service": "b"}, now=0.0))
    await asyncio.sleep(0)
    assert again.done() and again.result() == 5

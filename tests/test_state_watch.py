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

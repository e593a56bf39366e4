"""node/api/common.py: the blocking-query parameters and the blocking read loop, on mocked
requests and a real StateStore (no agent, no sockets)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from node.api import common
from node.api.common import (
    AGENT_KEY,
    DEFAULT_QUERY_TIME,
    MAX_QUERY_TIME,
    blocking_params,
    blocking_read,
)
from node.state import StateStore
from node.state import commands as c


class FakeConsensus:
    """What blocking_read uses of Consensus: a store, a read barrier and the leader facts."""

    def __init__(self) -> None:
        self.store = StateStore()
        self.barriers = 0

    async def read_barrier(self, mode: str) -> None:
        self.barriers += 1

    def known_leader(self) -> bool:
        return True

    def last_contact_ms(self) -> int:
        return 0


def request(path: str, consensus: FakeConsensus | None = None) -> web.Request:
    app = web.Application()
    agent = SimpleNamespace(config=SimpleNamespace(datacenter="dc1"), consensus=consensus)
    app[AGENT_KEY] = cast(Any, agent)
    return make_mocked_request("GET", path, app=app)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", (0, 0.0)),
        ("?index=7", (7, DEFAULT_QUERY_TIME)),  # only an index: Consul's default 5 minutes
        ("?hash=abc", (0, DEFAULT_QUERY_TIME)),  # hash-based blocking likewise
        ("?index=7&wait=0", (7, DEFAULT_QUERY_TIME)),  # zero means the default
        ("?index=7&wait=-5s", (7, DEFAULT_QUERY_TIME)),  # so does a negative Go duration
        ("?index=7&wait=250ms", (7, 0.25)),
        ("?index=7&wait=%2B2s", (7, 2.0)),  # "+2s", a sign Go's ParseDuration accepts
        ("?index=7&wait=20m", (7, MAX_QUERY_TIME)),  # capped at 10 minutes
        ("?index=7&wait=10m0s", (7, 600.0)),
        ("?wait=5s", (0, 5.0)),  # a wait alone does not block (blocking_read checks index)
        ("?index=&wait=", (0, 0.0)),  # empty values are no values, as Go's query.Get
        ("?index=18446744073709551615", (2**64 - 1, DEFAULT_QUERY_TIME)),
    ],
)
def test_blocking_params(query: str, expected: tuple[int, float]) -> None:
    assert blocking_params(request("/v1/kv/x" + query)) == expected
    assert MAX_QUERY_TIME == 600.0 and DEFAULT_QUERY_TIME == 300.0


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?index=abc", "Invalid index"),
        ("?index=-1", "Invalid index"),
        ("?index=%2B1", "Invalid index"),  # ParseUint takes no sign
        ("?index=1.5", "Invalid index"),
        ("?index=%201", "Invalid index"),
        ("?index=18446744073709551616", "Invalid index"),  # over uint64
        ("?index=1&wait=5", "Invalid wait time"),  # Go durations need a unit
        ("?index=1&wait=soon", "Invalid wait time"),
        ("?index=1&wait=5sec", "Invalid wait time"),
    ],
)
def test_bad_blocking_params_are_400(query: str, message: str) -> None:
    resp = blocking_params(request("/v1/kv/x" + query))
    assert isinstance(resp, web.Response)
    assert resp.status == 400 and resp.text == message


def _read_at(consensus: FakeConsensus) -> Any:
    """A `run` for blocking_read: the KV table's index and a body naming it."""

    def run() -> tuple[int, web.StreamResponse]:
        index = consensus.store.table_index("kvs")
        return index, web.json_response(index)

    return run


def _seed(consensus: FakeConsensus) -> int:
    consensus.store.apply(1, c.kv_set("k", b"v"))
    return consensus.store.table_index("kvs")


async def test_the_wait_gets_up_to_a_sixteenth_of_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    consensus = FakeConsensus()
    index = _seed(consensus)
    calls: list[tuple[float, float]] = []

    def most(lo: float, hi: float) -> float:
        calls.append((lo, hi))
        return hi

    monkeypatch.setattr(common.random, "uniform", most)
    t0 = time.monotonic()
    resp = await blocking_read(request(f"/v1/kv/k?index={index}&wait=800ms", consensus),
                               ["kvs"], _read_at(consensus))  # fmt: skip
    elapsed = time.monotonic() - t0
    assert calls == [(0, 0.8 / 16)]
    assert elapsed >= 0.8 + 0.05  # the deadline took the jitter drawn
    assert resp.headers["X-Consul-Index"] == str(index)  # timed out: the same index
    assert consensus.barriers >= 1


async def test_no_jitter_drawn_is_just_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    consensus = FakeConsensus()
    index = _seed(consensus)
    monkeypatch.setattr(common.random, "uniform", lambda lo, hi: 0.0)
    t0 = time.monotonic()
    resp = await blocking_read(request(f"/v1/kv/k?index={index}&wait=300ms", consensus),
                               ["kvs"], _read_at(consensus))  # fmt: skip
    assert 0.3 <= time.monotonic() - t0 < 0.3 + 0.3 / 16 + 0.5
    assert resp.headers["X-Consul-Index"] == str(index)


async def test_a_wait_without_an_index_answers_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    consensus = FakeConsensus()
    _seed(consensus)
    t0 = time.monotonic()
    resp = await blocking_read(request("/v1/kv/k?wait=10s", consensus), ["kvs"],
                               _read_at(consensus))  # fmt: skip
    assert time.monotonic() - t0 < 1.0
    assert resp.headers["X-Consul-Index"] == "1" and resp.headers["X-Consul-KnownLeader"] == "true"


async def test_a_write_wakes_the_read_with_the_new_index() -> None:
    consensus = FakeConsensus()
    index = _seed(consensus)
    req = request(f"/v1/kv/k?index={index}&wait=10s", consensus)
    task = asyncio.create_task(blocking_read(req, ["kvs"], _read_at(consensus)))
    await asyncio.sleep(0.05)
    assert not task.done()
    consensus.store.apply(2, c.kv_set("k", b"w"))
    written = time.monotonic()
    resp = await asyncio.wait_for(task, 5)
    assert time.monotonic() - written < 0.1
    assert resp.headers["X-Consul-Index"] == "2"


async def test_bad_parameters_are_refused_before_reading() -> None:
    consensus = FakeConsensus()
    for path, status in (("/v1/kv/k?index=x", 400), ("/v1/kv/k?stale&consistent", 400),
                         ("/v1/kv/k?dc=elsewhere", 500)):  # fmt: skip
        resp = await blocking_read(request(path, consensus), ["kvs"], _read_at(consensus))
        assert resp.status == status, path
    assert consensus.barriers == 0

"""Graceful leaves shrink the Raft configuration without losing quorum (real agents, loopback).

Three of five voters leaving at the same moment would leave 2 of 5 voters, no quorum, and a
cluster that can never elect a leader again, if the leaving agents simply stopped. Each leaving
voter first takes itself out of the configuration (the leader, after handing leadership over),
so the two that stay keep a working cluster.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agents import AgentProc, LocalCluster, wait_until

pytestmark = pytest.mark.cluster


def raft_config(a: AgentProc) -> dict[str, Any] | None:
    try:
        status, body = a.http("GET", "/v1/operator/raft/configuration")
    except OSError:
        return None
    return body if status == 200 and isinstance(body, dict) else None


def voters(a: AgentProc) -> set[str] | None:
    body = raft_config(a)
    return None if body is None else {s["Node"] for s in body["Servers"] if s["Voter"]}


def test_three_of_five_voters_leaving_together_keep_the_rest_working(tmp_path: Path) -> None:
    with LocalCluster(
        5, tmp_path, extra_args=["--bootstrap-expect", "3", "--server-stabilization-time", "1s"]
    ) as c:
        c.start()
        names = {a.name for a in c}
        wait_until(lambda: voters(c[0]) == names, timeout=60, desc="5 voters")
        assert c[1].http("PUT", "/v1/kv/before", body=b"1") == (200, True)
        leader_addr = c[0].http("GET", "/v1/status/leader")[1]
        leader = next(a for a in c if f"{a.bind}:{a.ports.server}" == leader_addr)
        # the leader and two followers leave at once
        leaving = [leader, *[a for a in c if a is not leader][:2]]
        staying = [a for a in c if a not in leaving]
        codes: dict[str, int | None] = {}

        def stop(a: AgentProc) -> None:
            codes[a.name] = a.stop(signal.SIGTERM, timeout=20)

        threads = [threading.Thread(target=stop, args=(a,)) for a in leaving]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(code == 0 for code in codes.values()), (codes, c.logs())
        expected = {a.name for a in staying}
        try:
            wait_until(lambda: voters(staying[0]) == expected, timeout=30, desc="2 voters")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{c.logs()}") from None
        # a working cluster: a leader, writes, and the earlier write kept
        assert wait_until(
            lambda: staying[1].http("PUT", "/v1/kv/after", body=b"2") == (200, True),
            timeout=15,
            desc="a write after the leaves",
        )
        status, body = staying[0].http("GET", "/v1/kv/before?consistent")
        assert status == 200 and body[0]["Key"] == "before"

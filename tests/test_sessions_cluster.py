"""Sessions on a real 3-agent cluster: a node that fails in gossip loses its sessions and their
locks; a TTL session that is not renewed is destroyed after 2 x TTL, a renewed one lives on."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agents import AgentProc, LocalCluster, wait_until

pytestmark = pytest.mark.cluster


def create_session(a: AgentProc, **body: Any) -> str:
    def attempt() -> str | None:  # until the leader has registered the node in the catalog
        status, resp = a.http("PUT", "/v1/session/create", body)
        return resp["ID"] if status == 200 else None

    return str(wait_until(attempt, timeout=20, desc=f"a session on {a.name}"))


def lock_holder(a: AgentProc, key: str) -> str | None:
    status, body = a.http("GET", f"/v1/kv/{key}?consistent")
    assert status == 200, (status, body)
    return body[0].get("Session")


def test_failed_node_and_expired_ttl_invalidate_sessions(tmp_path: Path) -> None:
    with LocalCluster(3, tmp_path, extra_args=["--bootstrap-expect", "3"]) as c:
        c.start()
        wait_until(lambda: all(a.http("GET", "/v1/status/leader")[1] for a in c), timeout=30)
        n1, n3 = c[0], c[2]
        doomed = create_session(n3, LockDelay="0s")  # bound to node3's serfHealth
        assert n3.http("PUT", f"/v1/kv/on-node3?acquire={doomed}", b"x") == (200, True)
        ttl = create_session(n1, TTL="10s", LockDelay="0s")
        kept = create_session(n1, TTL="10s", LockDelay="0s")
        assert n1.http("PUT", f"/v1/kv/ttl-lock?acquire={ttl}", b"x") == (200, True)
        assert n1.http("PUT", f"/v1/kv/kept-lock?acquire={kept}", b"x") == (200, True)
        t0 = time.monotonic()
        n3.stop(signal.SIGKILL)
        wait_until(lambda: lock_holder(n1, "on-node3") is None, timeout=30,
                   desc="node3's lock released after its gossip failure")  # fmt: skip
        assert n1.http("GET", f"/v1/session/info/{doomed}") == (200, [])
        # the TTL session dies within 2 x TTL (plus the leader's 0.5 s loop); the renewed one
        # (renewed through a follower or the leader alike) stays
        while time.monotonic() - t0 < 24:
            status, _ = c[1].http("PUT", f"/v1/session/renew/{kept}")
            assert status == 200
            time.sleep(3)
        wait_until(lambda: lock_holder(n1, "ttl-lock") is None, timeout=10,
                   desc="the unrenewed TTL session expired")  # fmt: skip
        assert n1.http("GET", f"/v1/session/info/{ttl}") == (200, [])
        assert lock_holder(n1, "kept-lock") == kept

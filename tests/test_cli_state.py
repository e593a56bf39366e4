"""`meshnode kv`, `meshnode operator raft` and `meshnode snapshot` against a one-node agent."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.agent import Agent
from tests.test_cli import _quiet_agent_logs, addr, run  # noqa: F401 - an autouse fixture
from tests.test_kv_api import agent  # noqa: F401 - the fixture

Capsys = pytest.CaptureFixture[str]


async def test_kv_put_get_delete(agent: Agent, capsys: Capsys, tmp_path: Path) -> None:  # noqa: F811
    a = addr(agent)
    assert await run(capsys, "kv", "put", *a, "app/name", "web") == (
        0, "Success! Data written to: app/name\n", "",
    )  # fmt: skip
    f = tmp_path / "v.bin"
    f.write_bytes(b"from a file")
    assert (await run(capsys, "kv", "put", *a, "--flags", "7", "app/file", f"@{f}"))[0] == 0
    assert await run(capsys, "kv", "get", *a, "app/name") == (0, "web\n", "")
    assert await run(capsys, "kv", "get", *a, "--consistent", "app/file") == (
        0, "from a file\n", "",
    )  # fmt: skip
    rc, out, _ = await run(capsys, "kv", "get", *a, "--recurse", "app")
    assert rc == 0 and out == "app/file:from a file\napp/name:web\n"
    rc, out, _ = await run(capsys, "kv", "get", *a, "--keys", "")
    assert rc == 0 and out == "app/\n"
    rc, out, _ = await run(capsys, "kv", "get", *a, "--detailed", "app/file")
    assert rc == 0 and "Flags       7" in out and "Value       from a file" in out
    rc, _, err = await run(capsys, "kv", "get", *a, "missing")
    assert rc == 1 and err == "Error! No key exists at: missing\n"
    # cas: 0 only creates; a stale index does not write
    rc, _, err = await run(capsys, "kv", "put", *a, "--cas", "--modify-index", "0", "app/name", "x")
    assert rc == 1 and "CAS failed" in err
    assert await run(capsys, "kv", "get", *a, "app/name") == (0, "web\n", "")
    assert (await run(capsys, "kv", "delete", *a, "app/name"))[0] == 0
    assert (await run(capsys, "kv", "get", *a, "app/name"))[0] == 1
    assert (await run(capsys, "kv", "delete", *a, "--recurse", "app"))[0] == 0
    assert await run(capsys, "kv", "get", *a, "--recurse", "app") == (0, "", "")


async def test_kv_flag_errors_name_the_flag(agent: Agent, capsys: Capsys) -> None:  # noqa: F811
    a = addr(agent)
    rc, _, err = await run(capsys, "kv", "put", *a, "--flags", "-3", "k", "v")
    assert rc == 2 and "--flags" in err
    rc, _, err = await run(capsys, "kv", "put", *a, "--cas", "k", "v")
    assert rc == 2 and "--cas" in err and "--modify-index" in err
    rc, _, err = await run(capsys, "kv", "put", *a, "k", "@/nonexistent/file")
    assert rc == 2 and "cannot read" in err
    rc, _, err = await run(capsys, "kv", "delete", *a)
    assert rc == 2 and "--recurse" in err
    assert (await run(capsys, "kv", "get", *a, "k"))[0] == 1  # nothing was written


async def test_raft_list_peers_and_transfer(agent: Agent, capsys: Capsys) -> None:  # noqa: F811
    rc, out, _ = await run(capsys, "operator", "raft", "list-peers", *addr(agent))
    header, row = out.splitlines()
    assert rc == 0 and header.split() == ["Node", "ID", "Address", "State", "Voter", "RaftProtocol"]
    assert row.split()[:2] == ["node1", agent.node_id] and row.split()[3:] == [
        "leader",
        "true",
        "3",
    ]
    rc, _, err = await run(capsys, "operator", "raft", "transfer-leader", *addr(agent))
    assert rc == 1 and "no other voter" in err
    rc, _, err = await run(capsys, "operator", "raft", "remove-peer", *addr(agent))
    assert rc == 2 and "--id" in err


async def test_snapshot_save_and_restore(agent: Agent, capsys: Capsys, tmp_path: Path) -> None:  # noqa: F811
    a = addr(agent)
    await run(capsys, "kv", "put", *a, "k", "before")
    snap = tmp_path / "backup.snap"
    rc, out, _ = await run(capsys, "snapshot", "save", *a, str(snap))
    assert rc == 0 and out.startswith("Saved and verified snapshot to index ")
    assert snap.read_bytes()[:2] == b"\x1f\x8b"
    await run(capsys, "kv", "put", *a, "k", "after")
    assert await run(capsys, "snapshot", "restore", *a, str(snap)) == (0, "Restored snapshot\n", "")
    assert await run(capsys, "kv", "get", *a, "k") == (0, "before\n", "")
    bad = tmp_path / "bad.snap"
    bad.write_bytes(b"not a snapshot")
    rc, _, err = await run(capsys, "snapshot", "restore", *a, str(bad))
    assert rc == 2 and "not a snapshot archive" in err
    assert await run(capsys, "kv", "get", *a, "k") == (0, "before\n", "")

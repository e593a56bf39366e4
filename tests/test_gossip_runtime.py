"""The asyncio runtime on real loopback sockets: join, events, leave, encryption, key rotation."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator, Callable

import pytest

from gossip.config import GossipConfig
from gossip.keyring import Keyring
from gossip.member import MemberStatus, UserEvent
from gossip.runtime import GossipError, GossipRuntime, parse_join_address

FAST = GossipConfig.lan().with_(
    probe_interval=0.2,
    probe_timeout=0.1,
    gossip_interval=0.05,
    suspicion_mult=2,
    broadcast_timeout=1.0,
    leave_propagate_delay=0.1,
    push_pull_interval=2.0,
)


def make(name: str, keyring: Keyring | None = None, path: str | None = None) -> GossipRuntime:
    return GossipRuntime(
        name=name,
        bind_addr="127.0.0.1",
        bind_port=0,
        advertise_addr=None,
        advertise_port=None,
        tags={"role": "node", "dc": "dc1"},
        config=FAST,
        keyring=keyring,
        keyring_path=path,
    )


async def until(pred: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    end = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def status(rt: GossipRuntime, name: str) -> MemberStatus | None:
    return next((m.status for m in rt.members() if m.name == name), None)


@pytest.fixture
async def runtimes() -> AsyncIterator[list[GossipRuntime]]:
    made: list[GossipRuntime] = []
    yield made
    for rt in made:
        await rt.shutdown()


def test_parse_join_address() -> None:
    assert parse_join_address("10.0.0.1") == (None, "10.0.0.1", 8301)
    assert parse_join_address("host:7946") == (None, "host", 7946)
    assert parse_join_address("a/1.2.3.4:99") == ("a", "1.2.3.4", 99)
    assert parse_join_address("[::1]:7000") == (None, "::1", 7000)
    with pytest.raises(GossipError):
        parse_join_address("host:notaport")


async def test_join_event_and_graceful_leave(runtimes: list[GossipRuntime]) -> None:
    a, b, c = make("a"), make("b"), make("c")
    runtimes += [a, b, c]
    for rt in runtimes:
        await rt.start()
    events = b.subscribe()
    assert await b.join([f"127.0.0.1:{a.bind_port}"]) == 1
    assert await c.join([f"127.0.0.1:{b.bind_port}"]) == 1
    for rt in runtimes:
        await until(
            lambda rt=rt: all(status(rt, n) == MemberStatus.ALIVE for n in "abc"),
            what=f"{rt.name} sees all alive",
        )
    assert {m.name: m.tags["dc"] for m in a.members()} == {"a": "dc1", "b": "dc1", "c": "dc1"}

    await c.user_event("deploy", b"v2")
    got: list[UserEvent] = []

    async def recv() -> None:
        while True:
            ev = await events.get()
            if isinstance(ev, UserEvent):
                got.append(ev)
                return

    await asyncio.wait_for(recv(), 5)
    assert (got[0].name, got[0].payload) == ("deploy", b"v2")

    await c.leave()
    await c.shutdown()
    await until(lambda: status(a, "c") == MemberStatus.LEFT, what="a sees c left")
    assert status(b, "c") == MemberStatus.LEFT


async def test_crash_is_seen_as_failed(runtimes: list[GossipRuntime]) -> None:
    a, b = make("a"), make("b")
    runtimes += [a, b]
    await a.start()
    await b.start()
    await b.join([f"127.0.0.1:{a.bind_port}"])
    await until(lambda: status(a, "b") == MemberStatus.ALIVE, what="join")
    await b.shutdown()  # no leave: a crash as far as a can tell
    await until(lambda: status(a, "b") == MemberStatus.FAILED, 10, "a sees b failed")


async def test_join_unreachable_raises(runtimes: list[GossipRuntime]) -> None:
    a = make("a")
    runtimes.append(a)
    await a.start()
    with pytest.raises(GossipError, match=r"127\.0\.0\.1:1"):
        await a.join(["127.0.0.1:1"])


async def test_wrong_key_cannot_join_and_packets_are_counted(
    runtimes: list[GossipRuntime],
) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    a, b, plain = make("a", Keyring([k1])), make("b", Keyring([k2])), make("p")
    runtimes += [a, b, plain]
    for rt in runtimes:
        await rt.start()
    with pytest.raises(GossipError):
        await b.join([f"127.0.0.1:{a.bind_port}"])
    with pytest.raises(GossipError):
        await plain.join([f"127.0.0.1:{a.bind_port}"])
    assert {m.name for m in a.members()} == {"a"}
    # stray UDP from a node with the wrong key is dropped and counted
    before = int(a.stats()["packets_dropped"])
    b._sendto(b"\x01" + os.urandom(60), ("127.0.0.1", a.bind_port))
    await until(lambda: int(a.stats()["packets_dropped"]) > before, what="drop counted")
    assert {m.name for m in a.members()} == {"a"}


async def test_key_rotation_cluster_wide(runtimes: list[GossipRuntime], tmp_path: object) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    paths = [os.path.join(str(tmp_path), f"{n}.keyring") for n in "abc"]
    rts = [make(n, Keyring([k1]), p) for n, p in zip("abc", paths, strict=True)]
    runtimes += rts
    for rt in rts:
        await rt.start()
    for rt in rts[1:]:
        await rt.join([f"127.0.0.1:{rts[0].bind_port}"])
    for rt in rts:
        await until(
            lambda rt=rt: sum(m.status == MemberStatus.ALIVE for m in rt.members()) == 3,
            what="converged",
        )
    b64 = base64.b64encode(k2).decode()
    resp = await rts[0].install_key(k2)
    assert (resp.num_nodes, resp.num_resp, resp.num_err) == (3, 3, 0)
    resp = await rts[1].use_key(k2)
    assert resp.num_err == 0 and resp.num_resp == 3
    resp = await rts[2].remove_key(k1)
    assert resp.num_err == 0
    listed = await rts[0].list_keys()
    assert listed.keys == {b64: 3}
    assert listed.primary_keys == {b64: 3}
    for p in paths:
        assert Keyring.load(p).keys == [k2]
    # removing the primary is refused everywhere, with a message per node
    resp = await rts[0].remove_key(k2)
    assert resp.num_err == 3 and all("primary" in m for m in resp.messages.values())
    # the cluster still talks, under the new key only
    await rts[2].user_event("after-rotation", b"")
    await until(
        lambda: (
            rts[0].serf is not None
            and any(
                e is not None and any(n == "after-rotation" for n, _ in e[1])
                for e in rts[0].serf.event_buffer
            )
        ),
        what="event under new key",
    )


@pytest.mark.parametrize("replay", [False, True])
async def test_join_does_not_replay_old_events_unless_asked(
    runtimes: list[GossipRuntime], replay: bool
) -> None:
    a, b, late = make("a"), make("b"), make("late")
    runtimes += [a, b, late]
    for rt in runtimes:
        await rt.start()
    await b.join([f"127.0.0.1:{a.bind_port}"])
    await a.user_event("old", b"1")
    # let "old" finish its gossip rounds first: an event still in flight reaches anyone
    await until(lambda: a.serf is not None and not a.serf.has_broadcasts()
                and b.serf is not None and not b.serf.has_broadcasts(), what="old sent")
    events = late.subscribe()
    await late.join([f"127.0.0.1:{a.bind_port}"], replay_events=replay)
    await until(lambda: status(late, "a") == MemberStatus.ALIVE, what="join")
    await a.user_event("new", b"2")
    seen: list[str] = []

    async def recv() -> None:
        while "new" not in seen:
            ev = await events.get()
            if isinstance(ev, UserEvent):
                seen.append(ev.name)

    await asyncio.wait_for(recv(), 5)
    assert ("old" in seen) == replay, seen

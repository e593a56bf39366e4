"""mDNS discovery: real zeroconf traffic on loopback, and across two network namespaces.

Loopback tests pin every instance to 127.0.0.1, so nothing leaves the host. They are skipped when
the kernel does not deliver multicast on lo; the netns test (root only) covers discovery across
a real veth link either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from gossip.discovery import SERVICE_TYPE, MDNSDiscovery

LOOP = "127.0.0.1"
FIND_TIMEOUT = 5.0
REPO = Path(__file__).resolve().parent.parent


def _loopback_multicast_works() -> bool:
    """Plain-socket probe (no zeroconf): does a multicast datagram sent on lo come back?"""
    group = "239.255.77.77"
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        rx.bind(("", 0))
        port = rx.getsockname()[1]
        mreq = socket.inet_aton(group) + socket.inet_aton(LOOP)
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
        rx.settimeout(1.0)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LOOP))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        tx.sendto(b"probe", (group, port))
        return rx.recv(16) == b"probe"
    except OSError:
        return False
    finally:
        rx.close()
        tx.close()


needs_loopback_multicast = pytest.mark.skipif(
    not _loopback_multicast_works(), reason="no multicast on loopback (netns test covers it)"
)


class Recorder:
    """on_peer callback that records calls and can be told to raise."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail

    async def __call__(self, peer: str) -> None:
        self.calls.append(peer)
        if self.fail:
            raise RuntimeError(f"callback exploded for {peer}")


async def wait_until(cond: Callable[[], bool], timeout: float = FIND_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return cond()


@pytest.fixture
def ports() -> list[int]:
    """Advertised (never bound) ports, random per run so concurrent runs don't match ours."""
    base = random.randrange(20000, 60000, 10)
    return [base + i for i in range(10)]


@pytest.fixture
async def nodes() -> AsyncIterator[Callable[..., MDNSDiscovery]]:
    """Factory for loopback-pinned instances; everything created is stopped afterwards."""
    created: list[MDNSDiscovery] = []
    suffix = f"{os.getpid()}-{random.randrange(1 << 30)}"

    def make(
        name: str, port: int, on_peer: Recorder, properties: dict[str, str] | None = None
    ) -> MDNSDiscovery:
        d = MDNSDiscovery(f"{name}-{suffix}", LOOP, port, on_peer, properties=properties)
        created.append(d)
        return d

    try:
        yield make
    finally:
        await asyncio.gather(*(d.stop() for d in created))


@needs_loopback_multicast
async def test_two_instances_discover_each_other(
    nodes: Callable[..., MDNSDiscovery], ports: list[int]
) -> None:
    rec_a, rec_b = Recorder(), Recorder()
    a = nodes("a", ports[0], rec_a, properties={"dc": "dc1"})
    b = nodes("b", ports[1], rec_b, properties={"dc": "dc1"})
    with capture_logs() as logs:
        await asyncio.gather(a.start(), b.start())
        ep_a, ep_b = f"{LOOP}:{ports[0]}", f"{LOOP}:{ports[1]}"
        assert await wait_until(lambda: ep_b in a.peers() and ep_a in b.peers())
        await asyncio.sleep(0.5)  # let any duplicate callbacks surface
    assert rec_a.calls.count(ep_b) == 1
    assert rec_b.calls.count(ep_a) == 1
    assert ep_a not in rec_a.calls and ep_a not in a.peers()
    assert ep_b not in rec_b.calls and ep_b not in b.peers()
    events = [e["event"] for e in logs]
    assert events.count("discovery.started") == 2
    found = [e for e in logs if e["event"] == "discovery.peer_found" and e["peer"] == ep_b]
    assert found and found[0]["properties"]["dc"] == "dc1"
    assert found[0]["properties"]["node"] == b.registered_name.split(".")[0]  # type: ignore[union-attr]


@needs_loopback_multicast
async def test_own_registration_is_not_reported(
    nodes: Callable[..., MDNSDiscovery], ports: list[int]
) -> None:
    rec = Recorder()
    a = nodes("solo", ports[0], rec)
    with capture_logs() as logs:
        await a.start()
        # Our browser does see our own record; prove it was looked at and dropped.
        assert await wait_until(
            lambda: any(
                e["event"] == "discovery.self_ignored" and e["peer"] == f"{LOOP}:{ports[0]}"
                for e in logs
            )
        )
    assert f"{LOOP}:{ports[0]}" not in rec.calls
    assert f"{LOOP}:{ports[0]}" not in a.peers()


@needs_loopback_multicast
async def test_failing_callback_does_not_stop_discovery(
    nodes: Callable[..., MDNSDiscovery], ports: list[int]
) -> None:
    rec = Recorder(fail=True)
    a = nodes("a", ports[0], rec)
    b = nodes("b", ports[1], Recorder())
    c = nodes("c", ports[2], Recorder())
    ep_b, ep_c = f"{LOOP}:{ports[1]}", f"{LOOP}:{ports[2]}"
    with capture_logs() as logs:
        await asyncio.gather(a.start(), b.start())
        assert await wait_until(lambda: ep_b in rec.calls)
        # The first callback raised; a peer appearing later must still be reported.
        await c.start()
        assert await wait_until(lambda: ep_c in rec.calls)
    failures = [e for e in logs if e["event"] == "discovery.peer_callback_failed"]
    assert {e["peer"] for e in failures} >= {ep_b, ep_c}
    assert all(e["log_level"] == "error" and e.get("exc_info") for e in failures)
    assert {ep_b, ep_c} <= a.peers()


@needs_loopback_multicast
async def test_moved_record_is_reannounced_and_other_types_ignored(
    nodes: Callable[..., MDNSDiscovery], ports: list[int]
) -> None:
    rec = Recorder()
    a = nodes("a", ports[0], rec)
    await a.start()
    raw = AsyncZeroconf(interfaces=[LOOP], ip_version=IPVersion.V4Only)
    try:
        tag = f"{os.getpid()}-{random.randrange(1 << 30)}"
        other = AsyncServiceInfo(
            "_other._tcp.local.",
            f"x-{tag}._other._tcp.local.",
            port=ports[5],
            parsed_addresses=[LOOP],
            server=f"x-{tag}.local.",
        )
        peer = AsyncServiceInfo(
            SERVICE_TYPE,
            f"p-{tag}.{SERVICE_TYPE}",
            port=ports[1],
            parsed_addresses=[LOOP],
            server=f"p-{tag}.local.",
        )
        await asyncio.gather(raw.async_register_service(other), raw.async_register_service(peer))
        assert await wait_until(lambda: f"{LOOP}:{ports[1]}" in rec.calls)

        peer.port = ports[2]
        await raw.async_update_service(peer)
        assert await wait_until(lambda: f"{LOOP}:{ports[2]}" in rec.calls)
        assert rec.calls.count(f"{LOOP}:{ports[1]}") == 1
        assert f"{LOOP}:{ports[5]}" not in rec.calls
    finally:
        await raw.async_close()


@needs_loopback_multicast
async def test_name_collision_does_not_crash(
    nodes: Callable[..., MDNSDiscovery], ports: list[int]
) -> None:
    rec_a, rec_b = Recorder(), Recorder()
    a = nodes("dup", ports[0], rec_a)
    b = nodes("dup", ports[1], rec_b)
    await a.start()
    with capture_logs() as logs:
        await b.start()
    assert a.registered_name != b.registered_name
    assert any(e["event"] == "discovery.name_conflict" for e in logs)
    ep_a, ep_b = f"{LOOP}:{ports[0]}", f"{LOOP}:{ports[1]}"
    assert await wait_until(lambda: ep_b in rec_a.calls and ep_a in rec_b.calls)


async def test_stop_is_idempotent_and_safe_before_start() -> None:
    d = MDNSDiscovery("idle", LOOP, 7946, Recorder())
    await d.stop()
    assert d.peers() == set()
    assert d.registered_name is None


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        MDNSDiscovery("n", "::1", 7946, Recorder())
    with pytest.raises(ValueError):
        MDNSDiscovery("n", LOOP, 0, Recorder())
    with pytest.raises(ValueError):
        MDNSDiscovery("", LOOP, 7946, Recorder())


# --- two network namespaces ------------------------------------------------------------------

NETNS = ("mdisc1", "mdisc2")
NET_ADDRS = ("198.18.200.1", "198.18.200.2")
GOSSIP_PORT = 7946

CHILD = """
import asyncio, signal, sys
from gossip.discovery import MDNSDiscovery

async def main() -> None:
    name, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)

    async def on_peer(peer: str) -> None:
        print("PEER", peer, flush=True)

    d = MDNSDiscovery(name, addr, port, on_peer)
    await d.start()
    print("STARTED", flush=True)
    try:
        await asyncio.wait_for(done.wait(), 30)  # bounded lifetime even if nobody stops us
    except TimeoutError:
        pass
    await d.stop()
    print("STOPPED", flush=True)

asyncio.run(main())
"""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def _remove_namespaces() -> None:
    existing = {line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line}
    for ns in NETNS:
        if ns not in existing:
            continue
        # Leftovers of an earlier run of this test: end what runs in them, then delete.
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        _ip("netns", "del", ns)


def _create_namespaces() -> None:
    for ns in NETNS:
        _ip("netns", "add", ns)
    _ip("link", "add", "eth0", "netns", NETNS[0], "type", "veth", "peer", "name", "eth0",
        "netns", NETNS[1])  # fmt: skip
    for ns, addr in zip(NETNS, NET_ADDRS, strict=True):
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")


async def _read_lines(stream: asyncio.StreamReader, sink: list[str]) -> None:
    while line := await stream.readline():
        sink.append(line.decode(errors="replace").rstrip("\n"))


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
@pytest.mark.parametrize("bind", ["pinned", "wildcard"])
async def test_discovery_across_network_namespaces(bind: str) -> None:
    """Two agents on two 'hosts' find each other; wildcard binds advertise the eth0 address."""
    _remove_namespaces()
    procs: list[asyncio.subprocess.Process] = []
    readers: list[asyncio.Task[None]] = []
    outputs: list[list[str]] = [[], []]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        _create_namespaces()
        for i, (ns, addr) in enumerate(zip(NETNS, NET_ADDRS, strict=True)):
            bind_addr = addr if bind == "pinned" else "0.0.0.0"
            proc = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", ns, sys.executable, "-c", CHILD,
                f"node{i + 1}", bind_addr, str(GOSSIP_PORT),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
                env=env, cwd=str(REPO),
            )  # fmt: skip
            procs.append(proc)
            assert proc.stdout is not None
            readers.append(asyncio.create_task(_read_lines(proc.stdout, outputs[i])))

        assert await wait_until(lambda: all("STARTED" in out for out in outputs), 15), outputs
        expected = [f"PEER {NET_ADDRS[1]}:{GOSSIP_PORT}", f"PEER {NET_ADDRS[0]}:{GOSSIP_PORT}"]
        assert await wait_until(
            lambda: all(exp in out for exp, out in zip(expected, outputs, strict=True)),
            FIND_TIMEOUT,
        ), outputs
        for out in outputs:
            peers = [line for line in out if line.startswith("PEER ")]
            assert len(peers) == 1, out  # exactly the other host, never ourselves

        for proc in procs:
            proc.terminate()
        for proc in procs:
            assert await asyncio.wait_for(proc.wait(), 10) == 0
        for reader in readers:
            await asyncio.wait_for(reader, 5)
        assert all("STOPPED" in out for out in outputs), outputs
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        _remove_namespaces()

"""The server-port transport: frames, RPC, and refusal of unauthenticated traffic."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gossip.keyring import Keyring
from node.raft.transport import RaftTransport, RPCError, TransportError

KEY_A = bytes(range(16))
KEY_B = bytes(range(1, 17))


class Endpoint:
    def __init__(self, keyring: Keyring | None) -> None:
        self.received: list[Any] = []
        self.got = asyncio.Event()
        self.t = RaftTransport(
            "127.0.0.1", 0, keyring=keyring, on_message=self._msg, on_request=self._req
        )

    def _msg(self, m: Any) -> None:
        self.received.append(m)
        self.got.set()

    async def _req(self, method: str, args: Any) -> Any:
        if method == "echo":
            return args
        if method == "slow":
            await asyncio.sleep(args)
            return "late"
        raise ValueError(f"unknown method {method}")

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.t.port}"


async def pair(ka: Keyring | None, kb: Keyring | None) -> tuple[Endpoint, Endpoint]:
    a, b = Endpoint(ka), Endpoint(kb)
    await a.t.start()
    await b.t.start()
    return a, b


async def close(*eps: Endpoint) -> None:
    for e in eps:
        await e.t.stop()


@pytest.mark.parametrize("encrypted", [False, True])
async def test_messages_and_rpc_round_trip(encrypted: bool) -> None:
    kr = Keyring([KEY_A]) if encrypted else None
    a, b = await pair(kr, Keyring([KEY_A]) if encrypted else None)
    try:
        for i in range(100):
            a.t.send(b.addr, [i, "entry", b"\x00\xff"])
        async with asyncio.timeout(5):
            while len(b.received) < 100:
                b.got.clear()
                await b.got.wait()
        assert b.received == [[i, "entry", b"\x00\xff"] for i in range(100)]  # in order
        results = await asyncio.gather(*(a.t.call(b.addr, "echo", i, 5) for i in range(50)))
        assert results == list(range(50))
        with pytest.raises(RPCError, match="unknown method nope"):
            await a.t.call(b.addr, "nope", None, 5)
        assert b.t.stats.auth_failures == 0
    finally:
        await close(a, b)


async def test_wrong_key_is_refused_and_counted() -> None:
    a, b = await pair(Keyring([KEY_B]), Keyring([KEY_A]))
    try:
        a.t.send(b.addr, ["vote", "please"])
        with pytest.raises(TransportError):
            await a.t.call(b.addr, "echo", 1, 2)
        assert b.received == []
        assert b.t.stats.auth_failures >= 1
    finally:
        await close(a, b)


async def test_plaintext_sender_is_refused_by_an_encrypted_server() -> None:
    a, b = await pair(None, Keyring([KEY_A]))
    try:
        a.t.send(b.addr, ["append", [1, 2, 3]])
        with pytest.raises(TransportError):
            await a.t.call(b.addr, "echo", 1, 2)
        assert b.received == [] and b.t.stats.auth_failures >= 1
    finally:
        await close(a, b)


async def test_garbage_is_counted_and_the_server_keeps_serving() -> None:
    a, b = await pair(None, None)
    try:
        for junk in (b"\x00\x00\x00\x03abc", b"\xff\xff\xff\xff", b"\x00\x00\x00\x01\xc1"):
            _, w = await asyncio.open_connection("127.0.0.1", b.t.port)
            w.write(junk)
            await w.drain()
            w.close()
        await asyncio.sleep(0.2)
        assert b.t.stats.bad_frames >= 2
        assert await a.t.call(b.addr, "echo", "still here", 5) == "still here"
    finally:
        await close(a, b)


async def test_unreachable_peer_fails_fast_and_timeouts_are_reported() -> None:
    a, b = await pair(None, None)
    port = b.t.port
    try:
        with pytest.raises(TransportError, match="no answer to slow"):
            await a.t.call(b.addr, "slow", 2.0, 0.3)
        await b.t.stop()
        with pytest.raises(TransportError):
            await a.t.call(f"127.0.0.1:{port}", "echo", 1, 3)
    finally:
        await close(a, b)

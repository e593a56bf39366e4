"""Server RPC on --server-port: Raft messages and forwarded requests over TCP, msgpack frames.

One TCP connection per peer and direction carries both kinds of traffic:

    frame   = u32 length (big-endian) + body
    body    = msgpack(value), or Keyring.encrypt(msgpack(value), AAD) when --encrypt is set
    value   = [0, raft message]                      one-way
            | [1, request id, method, args]          request
            | [2, request id, ok, result or error]   response (on the connection it came on)

With a keyring every frame is authenticated with AES-GCM under the gossip keys, so a host
without the key can neither read the traffic nor inject a vote or an entry: a frame that does
not decrypt closes the connection and is counted. Raft tolerates lost and repeated messages, so
a full send queue drops (and counts) rather than blocks the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import structlog

from gossip.keyring import DecryptError, Keyring

__all__ = ["NotSent", "RPCError", "RaftTransport", "TransportError", "TransportStats"]

log = structlog.get_logger("raft.transport")

AAD = b"meshnode-raft-v1"
MAX_FRAME = 128 * 1024 * 1024  # a whole-state snapshot travels in one frame
SEND_QUEUE = 4096
CONNECT_TIMEOUT = 2.0
_HEADER = struct.Struct(">I")
_RAFT, _REQUEST, _RESPONSE = 0, 1, 2

MessageHandler = Callable[[Any], None]
RPCHandler = Callable[[str, Any], Awaitable[Any]]


class TransportError(Exception):
    """The peer could not be reached or the connection broke before an answer."""


class NotSent(TransportError):
    """The request never left this node (no connection): retrying cannot apply it twice."""


class RPCError(Exception):
    """The peer answered the request with an error (its message is kept verbatim)."""


@dataclass(slots=True)
class TransportStats:
    frames_in: int = 0
    frames_out: int = 0
    dropped_queue_full: int = 0
    auth_failures: int = 0
    bad_frames: int = 0
    connect_failures: int = 0


def _encode(value: Any, keyring: Keyring | None) -> bytes:
    body: bytes = msgpack.packb(value, use_bin_type=True)
    if keyring is not None:
        body = keyring.encrypt(body, AAD)
    return _HEADER.pack(len(body)) + body


async def _read(reader: asyncio.StreamReader, keyring: Keyring | None) -> Any:
    (length,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds {MAX_FRAME}")
    body = await reader.readexactly(length)
    if keyring is not None:
        body = keyring.decrypt(body, AAD)
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


class _Peer:
    """Our outgoing connection to one address: a writer task draining a queue, and a reader
    task matching responses to pending requests."""

    def __init__(self, transport: RaftTransport, address: str) -> None:
        self.t = transport
        self.address = address
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(SEND_QUEUE)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.task = asyncio.create_task(self._run(), name=f"raft-peer-{address}")
        self.connected = asyncio.Event()
        #: the last connection attempt failed: requests fail at once (NotSent) until one works
        self.down = False

    async def _run(self) -> None:
        host, _, port = self.address.rpartition(":")
        backoff = 0.05
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, int(port)), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError, ValueError, RuntimeError):
                self.t.stats.connect_failures += 1
                if not self.down and self.t.on_peer_down is not None:
                    self.t.on_peer_down(self.address)
                self.down = True
                self._fail_pending("cannot connect", NotSent)
                # nobody reads old messages while the peer is away; Raft resends what matters
                while not self.queue.empty():
                    self.queue.get_nowait()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            self.down = False
            self.connected.set()
            rtask = asyncio.create_task(self._read_responses(reader))
            try:
                await self._write_loop(writer, rtask)
            except (OSError, ConnectionError):
                pass
            except Exception as e:
                # uvloop raises RuntimeError when writing to a transport the peer closed; any
                # error must end in a reconnect, never in a dead task that silently queues
                # everything for this peer from then on
                log.info("raft.peer_connection_error", peer=self.address, error=repr(e))
            finally:
                self.connected.clear()
                rtask.cancel()
                with contextlib.suppress(Exception):
                    writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
                self._fail_pending("connection lost")

    async def _write_loop(self, writer: asyncio.StreamWriter, rtask: asyncio.Task[None]) -> None:
        while not rtask.done():
            get = asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({get, rtask}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                return
            frames = [get.result()]
            while not self.queue.empty() and len(frames) < 256:
                frames.append(self.queue.get_nowait())
            writer.write(b"".join(frames))
            self.t.stats.frames_out += len(frames)
            await writer.drain()

    async def _read_responses(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, OSError, ConnectionError):
            while True:
                try:
                    value = await _read(reader, self.t.keyring)
                    kind, req_id, ok, result = value
                except (DecryptError, ValueError, TypeError) as e:
                    self.t.stats.bad_frames += 1
                    log.warning("raft.bad_response", peer=self.address, error=str(e))
                    return
                if kind != _RESPONSE:
                    continue
                fut = self.pending.pop(req_id, None)
                if fut is not None and not fut.done():
                    if ok:
                        fut.set_result(result)
                    else:
                        fut.set_exception(RPCError(str(result)))

    def _fail_pending(self, why: str, error: type[TransportError] = TransportError) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(error(f"{self.address}: {why}"))
        self.pending.clear()

    def enqueue(self, frame: bytes) -> bool:
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            self.t.stats.dropped_queue_full += 1
            return False
        return True

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task
        self._fail_pending("transport closed")


class RaftTransport:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        keyring: Keyring | None,
        on_message: MessageHandler,
        on_request: RPCHandler,
        on_peer_down: Callable[[str], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.keyring = keyring
        self.on_message = on_message
        self.on_request = on_request
        #: called with the address when a connection attempt to it fails (after it worked)
        self.on_peer_down = on_peer_down
        self.stats = TransportStats()
        self._peers: dict[str, _Peer] = {}
        self._server: asyncio.Server | None = None
        self._ids = itertools.count(1)
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("raft.transport_listening", addr=f"{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        for peer in list(self._peers.values()):
            await peer.close()
        self._peers.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def _peer(self, address: str) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _Peer(self, address)
        return peer

    def send(self, address: str, message: Any) -> None:
        """Queue a Raft message (already in wire form); dropped when the queue is full."""
        self._peer(address).enqueue(_encode([_RAFT, message], self.keyring))

    async def call(self, address: str, method: str, args: Any, timeout: float) -> Any:
        """A request to the server at `address`; raises TransportError or RPCError."""
        peer = self._peer(address)
        if peer.down:
            raise NotSent(f"{address}: cannot connect")
        req_id = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        peer.pending[req_id] = fut
        if not peer.enqueue(_encode([_REQUEST, req_id, method, args], self.keyring)):
            peer.pending.pop(req_id, None)
            raise NotSent(f"{address}: send queue full")
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TransportError(f"{address}: no answer to {method} within {timeout:g}s") from None
        finally:
            peer.pending.pop(req_id, None)

    def forget(self, address: str) -> None:
        """Close the connection to a server that left the configuration."""
        peer = self._peers.pop(address, None)
        if peer is not None:
            task = asyncio.create_task(peer.close())
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    # -- inbound -------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        peer = writer.get_extra_info("peername")
        src = f"{peer[0]}:{peer[1]}" if peer else "?"
        lock = asyncio.Lock()
        requests: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    value = await _read(reader, self.keyring)
                except DecryptError:
                    self.stats.auth_failures += 1
                    log.warning("raft.frame_unauthenticated", src=src)
                    return
                except (ValueError, TypeError, msgpack.ExtraData) as e:
                    self.stats.bad_frames += 1
                    log.warning("raft.bad_frame", src=src, error=str(e))
                    return
                self.stats.frames_in += 1
                if not isinstance(value, list) or not value:
                    self.stats.bad_frames += 1
                    continue
                if value[0] == _RAFT and len(value) == 2:
                    self.on_message(value[1])
                elif value[0] == _REQUEST and len(value) == 4:
                    _, req_id, method, args = value
                    t = asyncio.create_task(self._answer(writer, lock, req_id, method, args))
                    requests.add(t)
                    t.add_done_callback(requests.discard)
                else:
                    self.stats.bad_frames += 1
        except (asyncio.IncompleteReadError, OSError, ConnectionError):
            pass
        except asyncio.CancelledError:
            # stop() cancels connection handlers; ending normally keeps asyncio's
            # start_server callback (3.11) from logging the cancellation as an error
            pass
        finally:
            for t in requests:
                t.cancel()
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(
        self, writer: asyncio.StreamWriter, lock: asyncio.Lock, req_id: Any, method: Any, args: Any
    ) -> None:
        try:
            if not isinstance(method, str):
                raise RPCError("method must be a string")
            result, ok = await self.on_request(method, args), True
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the caller gets the message; the server keeps serving
            result, ok = str(e) or type(e).__name__, False
        frame = _encode([_RESPONSE, req_id, ok, result], self.keyring)
        async with lock:
            with contextlib.suppress(OSError, ConnectionError):
                writer.write(frame)
                await writer.drain()

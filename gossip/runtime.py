"""The asyncio driver of the sans-I/O Serf/memberlist core: sockets, clock and TCP exchanges.

Everything protocol-related lives in `Serf`/`Memberlist`; this module only moves bytes and time in
and effects out. After every input it flushes the core's effects and re-arms one timer for the
core's next deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from typing import Any

import msgpack
import structlog

from gossip import packet
from gossip.config import GossipConfig
from gossip.keyring import Keyring
from gossip.member import GossipEvent, KeyResponse, Member
from gossip.messages import (
    Ack,
    DecodeError,
    ErrResp,
    MessageType,
    Ping,
    _fields,
    decode,
    decode_push_pull,
    unpack,
)
from gossip.serf import Serf
from gossip.swim import Address, ProtocolError, SendPacket, StartPushPull, StartTcpPing

log = structlog.get_logger("gossip.runtime")

DEFAULT_PORT = 8301
MAX_INBOUND_STREAMS = 128


class GossipError(Exception):
    pass


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, rt: GossipRuntime) -> None:
        self.rt = rt

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.rt._on_datagram(data, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.debug("gossip.udp_error", error=str(exc))


def parse_join_address(spec: str, default_port: int = DEFAULT_PORT) -> tuple[str | None, str, int]:
    """Parse "host", "host:port", "[v6]:port" or "name/host:port" into (name, host, port)."""
    name: str | None = None
    if "/" in spec:
        name, spec = spec.split("/", 1)
    host, port = spec, default_port
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise GossipError(f"invalid address {spec!r}")
        host = spec[1:end]
        rest = spec[end + 1 :]
        if rest.startswith(":"):
            port = _port(rest[1:], spec)
    elif spec.count(":") == 1:
        host, p = spec.split(":")
        port = _port(p, spec)
    if not host:
        raise GossipError(f"invalid address {spec!r}: empty host")
    return name, host, port


def _port(p: str, spec: str) -> int:
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise GossipError(f"invalid port in address {spec!r}")
    return int(p)


class GossipRuntime:
    def __init__(
        self,
        *,
        name: str,
        bind_addr: str,
        bind_port: int,
        advertise_addr: str | None,
        advertise_port: int | None,
        tags: dict[str, str],
        config: GossipConfig,
        keyring: Keyring | None = None,
        keyring_path: str | None = None,
    ) -> None:
        self.name = name
        self.bind_addr = bind_addr
        self.bind_port = bind_port
        self.advertise_addr = advertise_addr
        self.advertise_port = advertise_port
        self.tags = dict(tags)
        self.config = config
        self.keyring = keyring
        self.keyring_path = keyring_path
        self.serf: Serf | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0  # uvloop's near-immediate handles don't expose when()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._subscribers: list[asyncio.Queue[GossipEvent]] = []
        self._inbound = asyncio.Semaphore(MAX_INBOUND_STREAMS)
        self._stats = {"tcp_errors": 0, "tcp_rejected": 0, "udp_send_errors": 0}
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tcp = await asyncio.start_server(
            self._on_stream, self.bind_addr, self.bind_port, reuse_address=True
        )
        port = self._tcp.sockets[0].getsockname()[1]
        family = socket.AF_INET6 if ":" in self.bind_addr else socket.AF_INET
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UDP(self), local_addr=(self.bind_addr, port), family=family
        )
        self._udp = transport
        self.bind_port = port
        adv = self.advertise_addr or self.bind_addr
        if ipaddress.ip_address(adv).is_unspecified:
            raise GossipError("cannot advertise an unspecified address; set an advertise address")
        self.serf = Serf(
            name=self.name,
            addr=adv,
            port=self.advertise_port or port,
            tags=self.tags,
            config=self.config,
            keyring=self.keyring,
            keyring_changed=self._save_keyring,
        )
        self.serf.start(self._now())
        self._flush()
        log.info(
            "gossip.started",
            node=self.name,
            bind=f"{self.bind_addr}:{port}",
            encrypted=self.keyring is not None,
        )

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(BaseException):
                await t
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 1.0)
        log.info("gossip.stopped", node=self.name)

    # -- public API ---------------------------------------------------------------------------

    async def join(self, addrs: list[str], *, replay_events: bool = False) -> int:
        """Join through each address; old user events are not replayed unless asked."""
        serf = self._core()
        errors: list[str] = []
        joined = 0
        serf.event_join_ignore = not replay_events
        try:
            joined = await self._join_each(addrs, errors)
        finally:
            serf.event_join_ignore = False
        if joined == 0:
            raise GossipError("; ".join(errors) or "no addresses given")
        serf.joined(self._now())
        self._flush()
        return joined

    async def _join_each(self, addrs: list[str], errors: list[str]) -> int:
        joined = 0
        for spec in addrs:
            try:
                _, host, port = parse_join_address(spec)
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
                ip = str(infos[0][4][0])
                await self._push_pull((ip, port), join=True)
                joined += 1
            except (OSError, GossipError, TimeoutError, packet.PacketError, DecodeError) as e:
                errors.append(f"{spec}: {e or type(e).__name__}")
                log.warning("gossip.join_failed", address=spec, error=str(e) or type(e).__name__)
        return joined

    async def leave(self) -> None:
        serf = self._core()
        serf.leave(self._now())
        self._flush()
        await self._wait(serf.leave_intent_pending, self.config.broadcast_timeout)
        serf.memberlist.leave(self._now())
        self._flush()
        await self._wait(serf.memberlist.leave_broadcast_pending, self.config.broadcast_timeout)
        await asyncio.sleep(self.config.leave_propagate_delay)
        log.info("gossip.left", node=self.name)

    def members(self) -> list[Member]:
        return self._core().members()

    def local_member(self) -> Member:
        return self._core().local_member()

    async def set_tags(self, tags: dict[str, str]) -> None:
        self._core().set_tags(tags, self._now())
        self.tags = dict(tags)
        self._flush()

    async def user_event(self, name: str, payload: bytes, coalesce: bool = True) -> None:
        self._core().user_event(name, payload, coalesce, self._now())
        self._flush()

    def subscribe(self) -> asyncio.Queue[GossipEvent]:
        q: asyncio.Queue[GossipEvent] = asyncio.Queue(maxsize=4096)
        self._subscribers.append(q)
        return q

    async def install_key(self, key: bytes) -> KeyResponse:
        return await self._key_op("install-key", key)

    async def use_key(self, key: bytes) -> KeyResponse:
        return await self._key_op("use-key", key)

    async def remove_key(self, key: bytes) -> KeyResponse:
        return await self._key_op("remove-key", key)

    async def list_keys(self) -> KeyResponse:
        return await self._key_op("list-keys", b"")

    def stats(self) -> dict[str, int | str]:
        serf = self._core()
        ml = serf.memberlist
        c = ml.counters
        return {
            "members": len(serf.members_by_name),
            "alive": serf.num_alive(),
            "health_score": ml.awareness.score,
            "incarnation": ml.incarnation,
            "member_time": serf.clock.time(),
            "event_time": serf.event_clock.time(),
            "query_time": serf.query_clock.time(),
            "encrypted": str(self.keyring is not None).lower(),
            "packets_received": c.packets_received,
            "packets_sent": c.packets_sent,
            "packets_dropped": c.packets_dropped,
            "messages_dropped": c.messages_dropped + serf.stats["serf_messages_dropped"],
            "probes_failed": c.probes_failed,
            "refutes": c.refutes,
            "address_conflicts": c.extra.get("conflicts", 0),
            **self._stats,
        }

    # -- core plumbing ------------------------------------------------------------------------

    def _core(self) -> Serf:
        if self.serf is None:
            raise GossipError("gossip is not started")
        return self.serf

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _flush(self) -> None:
        serf = self.serf
        if serf is None or self._closed:
            return
        for eff in serf.take_effects():
            if isinstance(eff, SendPacket):
                self._sendto(eff.data, eff.dest)
            elif isinstance(eff, StartPushPull):
                self._spawn(self._background_push_pull(eff.dest, eff.join))
            elif isinstance(eff, StartTcpPing):
                self._spawn(self._tcp_ping(eff))
        for ev in serf.take_events():
            for q in self._subscribers:
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(ev)
        self._arm()

    def _arm(self) -> None:
        serf = self.serf
        if serf is None or self._closed:
            return
        deadline = serf.next_deadline()
        if self._timer is not None:
            if deadline is not None and abs(self._timer_at - deadline) < 1e-6:
                return
            self._timer.cancel()
            self._timer = None
        if deadline is not None:
            self._timer = asyncio.get_running_loop().call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        if self.serf is not None and not self._closed:
            self.serf.tick(self._now())
            self._flush()

    def _sendto(self, data: bytes, dest: Address) -> None:
        if self._udp is None:
            return
        try:
            self._udp.sendto(data, dest)
        except OSError as e:
            self._stats["udp_send_errors"] += 1
            log.debug("gossip.udp_send_failed", dest=f"{dest[0]}:{dest[1]}", error=str(e))

    def _on_datagram(self, data: bytes, src: Address) -> None:
        if self.serf is None or self._closed:
            return
        self.serf.receive_packet(data, src, self._now())
        self._flush()

    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _wait(self, pending: Any, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while pending() and loop.time() < end:
            await asyncio.sleep(0.05)

    def _save_keyring(self, keyring: Keyring) -> None:
        if self.keyring_path:
            try:
                keyring.save(self.keyring_path)
            except OSError as e:
                log.error("gossip.keyring_save_failed", path=self.keyring_path, error=str(e))

    async def _key_op(self, op: str, key: bytes) -> KeyResponse:
        serf = self._core()
        fut: asyncio.Future[KeyResponse] = asyncio.get_running_loop().create_future()

        def done(resp: KeyResponse) -> None:
            if not fut.done():
                fut.set_result(resp)

        serf.key_query(op, key, self._now(), done)
        self._flush()
        return await fut

    # -- TCP ----------------------------------------------------------------------------------

    def _encode_stream(self, msg: bytes) -> bytes:
        return packet.encode_stream(
            msg, compress=self.config.compress_streams, keyring=self.keyring
        )

    async def _background_push_pull(self, dest: Address, join: bool) -> None:
        try:
            await self._push_pull(dest, join)
        except (OSError, GossipError, TimeoutError, packet.PacketError, DecodeError) as e:
            log.debug("gossip.push_pull_failed", dest=f"{dest[0]}:{dest[1]}", error=str(e))

    async def _push_pull(self, dest: Address, join: bool) -> None:
        serf = self._core()
        timeout = self.config.tcp_timeout
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*dest), timeout)
        try:
            writer.write(self._encode_stream(serf.memberlist.join_state(join).encode()))
            await asyncio.wait_for(writer.drain(), timeout)
            msg = await asyncio.wait_for(packet.read_stream(reader, self.keyring), timeout)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        if msg[:1] == bytes((MessageType.ERR,)):
            raise GossipError(f"remote error: {_err_text(msg)}")
        remote = decode_push_pull(msg)
        try:
            serf.memberlist.merge_push_pull(remote, self._now())
        except ProtocolError as e:
            raise GossipError(str(e)) from e
        finally:
            self._flush()

    async def _tcp_ping(self, eff: StartTcpPing) -> None:
        serf = self._core()
        timeout = max(0.01, eff.deadline - self._now())
        ok = False
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*eff.dest), timeout)
            try:
                ping = Ping(
                    eff.seq_no, eff.node, serf.memberlist.addr, serf.memberlist.port, self.name
                )
                writer.write(self._encode_stream(ping.encode()))
                left = max(0.01, eff.deadline - self._now())
                msg = await asyncio.wait_for(packet.read_stream(reader, self.keyring), left)
                reply = decode(msg)
                ok = isinstance(reply, Ack) and reply.seq_no == eff.seq_no
            finally:
                writer.close()
        except (OSError, TimeoutError, packet.PacketError, DecodeError):
            ok = False
        if self.serf is not None and not self._closed:
            self.serf.memberlist.tcp_ping_result(eff.seq_no, ok, self._now())
            self._flush()

    async def _on_stream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._inbound.locked():
            self._stats["tcp_rejected"] += 1
            writer.close()
            return
        async with self._inbound:
            try:
                await self._serve_stream(reader, writer)
            except (OSError, TimeoutError, packet.PacketError, DecodeError, ProtocolError) as e:
                self._stats["tcp_errors"] += 1
                log.debug("gossip.stream_failed", error=str(e) or type(e).__name__)
                if isinstance(e, packet.PacketError | ProtocolError):
                    with contextlib.suppress(Exception):
                        writer.write(self._encode_stream(ErrResp(str(e)).encode()))
                        await asyncio.wait_for(writer.drain(), 1.0)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        serf = self._core()
        timeout = self.config.tcp_timeout
        msg = await asyncio.wait_for(packet.read_stream(reader, self.keyring), timeout)
        mtype = msg[0]
        if mtype == MessageType.PUSH_PULL:
            remote = decode_push_pull(msg)
            reply = serf.memberlist.join_state(remote.join)
            writer.write(self._encode_stream(reply.encode()))
            await asyncio.wait_for(writer.drain(), timeout)
            try:
                serf.memberlist.merge_push_pull(remote, self._now())
            finally:
                self._flush()
        elif mtype == MessageType.PING:
            ping = decode(msg)
            if isinstance(ping, Ping) and (not ping.node or ping.node == self.name):
                writer.write(self._encode_stream(Ack(ping.seq_no).encode()))
                await asyncio.wait_for(writer.drain(), timeout)
        elif mtype == MessageType.USER:
            payload = _user_stream_payload(msg)
            if payload:
                serf.notify_msg(payload, self._now())
                self._flush()
        else:
            raise packet.PacketError(f"unexpected stream message type {mtype}")


def _err_text(msg: bytes) -> str:
    try:
        return str(_fields(unpack(msg[1:])).get("Error", b"").decode(errors="replace"))
    except Exception:
        return "unreadable error"


def _user_stream_payload(msg: bytes) -> bytes:
    """A TCP user message is `08 | {UserMsgLen} | raw`; return the raw part."""
    up = msgpack.Unpacker(raw=True, strict_map_key=False)
    up.feed(msg[1:])
    try:
        head = _fields(up.unpack())
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.OutOfData) as e:
        raise DecodeError(str(e)) from e
    n = head.get("UserMsgLen", 0)
    if not isinstance(n, int) or n < 0:
        raise DecodeError("bad UserMsgLen")
    return bytes(msg[1 + up.tell() : 1 + up.tell() + n])

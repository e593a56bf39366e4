"""The agent's DNS server: UDP and TCP on --client:--dns-port, answering from the local replica.

Parsing a query and rendering a reply with dnspython cost far more than serving one, so
rendered replies are kept per query (its bytes after the ID, and the size limit) until the
catalog changes (its table indexes move); a hit is answered straight from the datagram
callback, patching only the query ID. A few differently shuffled renderings are kept per
query, so clients still see the instances in varying order. Names outside the domain go to
the --recursor servers, over the transport the client used (a TCP client is after the whole
answer), and are REFUSED when there is none (Consul). Garbage gets FORMERR when it has a
readable header and is dropped otherwise; both are counted. A name the resolver fails on (data
it cannot render: a bug) is SERVFAIL, logged once until the catalog changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import structlog

from node.dns.resolver import CATALOG_TABLES, DNSConfig, Resolver
from node.state import StateStore

if TYPE_CHECKING:
    from node.agent import Agent

__all__ = ["DNSServer", "DNSStats", "Responder"]

log = structlog.get_logger("node.dns")

UDP_DEFAULT_SIZE = 512
TCP_MAX_SIZE = 65535
VARIANTS = 4  # differently shuffled renderings kept per cached name
CACHE_MAX = 10_000
RECURSOR_TIMEOUT = 2.0
#: a TCP client gets this long to send its next query (idle) and then the query itself, as
#: miekg/dns (Consul's DNS server) defaults; a silent client no longer holds a connection.
TCP_IDLE_TIMEOUT = 8.0
TCP_READ_TIMEOUT = 2.0


@dataclass
class DNSStats:
    queries: int = 0
    cache_hits: int = 0
    formerr: int = 0
    dropped: int = 0
    forwarded: int = 0
    truncated: int = 0
    servfail: int = 0  # resolver failures, each answered (and cached) as SERVFAIL
    refused: int = 0  # outside the domain without recursors, or no question


@dataclass
class _Entry:
    index: int
    variants: list[bytes] = field(default_factory=list)


class Responder:
    """Bytes in, bytes out (or None to drop): everything but the sockets."""

    def __init__(
        self,
        store: Callable[[], StateStore],
        config: DNSConfig,
        recursors: tuple[str, ...] = (),
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.resolver = Resolver(store, config, rng)
        self.recursors = recursors
        self.rng = rng or random.Random()
        self.stats = DNSStats()
        # keyed by the query's bytes after its ID (flags, question, EDNS) and the size limit,
        # so a hit needs no parsing at all
        self._cache: dict[tuple[bytes, int | None], _Entry] = {}

    def cached(self, wire: bytes, limit: int | None) -> bytes | None:
        """The reply from the cache, when this exact query was answered for the current
        catalog (all variants rendered); None sends the query down the full path."""
        entry = self._cache.get((wire[2:], limit))
        if entry is None or len(entry.variants) < VARIANTS:
            return None
        if entry.index != self.store().table_index(CATALOG_TABLES):
            return None
        self.stats.queries += 1
        self.stats.cache_hits += 1
        return wire[:2] + self.rng.choice(entry.variants)[2:]

    async def respond(self, wire: bytes, limit: int | None) -> bytes | None:
        """limit: the UDP size limit (None over TCP: no truncation)."""
        if (hit := self.cached(wire, limit)) is not None:
            return hit
        self.stats.queries += 1
        try:
            query = dns.message.from_wire(wire)
        except Exception:  # any parse failure: garbage from the network
            return self._formerr(wire)
        if query.flags & dns.flags.QR:
            self.stats.dropped += 1
            return None  # a response sent to us: never answer (no reflection loops)
        if query.opcode() != dns.opcode.QUERY:
            return self._reply(query, dns.rcode.NOTIMP)
        if len(query.question) != 1:  # Consul refuses a query without (one) question
            return self._reply(query, dns.rcode.REFUSED)
        q = query.question[0]
        size = TCP_MAX_SIZE if limit is None else max(limit, query.payload, UDP_DEFAULT_SIZE)
        if not self.resolver.in_domain(q.name):
            if not self.recursors:
                return self._reply(query, dns.rcode.REFUSED)  # Consul: not ours, no recursor
            return await self._forward(query, size, tcp=limit is None)
        key = (wire[2:], limit)
        index = self.store().table_index(CATALOG_TABLES)
        entry = self._cache.get(key)
        if entry is None or entry.index != index:
            if len(self._cache) >= CACHE_MAX:
                self._cache.clear()
            entry = self._cache[key] = _Entry(index)
        try:
            resp = self.resolver.answer(query)
        except Exception:
            return self._servfail(query, entry)
        if self.recursors:
            resp.flags |= dns.flags.RA  # Consul offers recursion exactly when it has recursors
        entry.variants.append(self._render(resp, size))
        return wire[:2] + entry.variants[-1][2:]

    def _servfail(self, query: dns.message.Message, entry: _Entry) -> bytes:
        """Catalog data the resolver cannot render (a bug): SERVFAIL, not silence, so the
        client moves on at once. The answer is cached like any other until the catalog
        changes, so the name is logged once, not on every query."""
        q = query.question[0]
        log.exception("dns.answer_failed", name=q.name.to_text(),
                      type=dns.rdatatype.to_text(q.rdtype))  # fmt: skip
        self.stats.servfail += 1
        reply = self._reply(query, dns.rcode.SERVFAIL, recursion=bool(self.recursors))
        entry.variants[:] = [reply] * VARIANTS
        return reply

    def _render(self, resp: dns.message.Message, size: int) -> bytes:
        try:
            return resp.to_wire(max_size=size)
        except dns.exception.TooBig:
            pass
        self.stats.truncated += 1
        resp.flags |= dns.flags.TC
        resp.additional = []
        while resp.answer:
            try:
                return resp.to_wire(max_size=size)
            except dns.exception.TooBig:
                resp.answer.pop()
        resp.authority = []
        return resp.to_wire(max_size=size)

    async def _forward(self, query: dns.message.Message, size: int, tcp: bool) -> bytes:
        """The first recursor's answer, tried in order as Consul does: one that fails, or
        answers anything but NOERROR/NXDOMAIN, passes the question to the next. Over UDP a
        truncated answer is passed on as it is (TC set), so the client retries over TCP, and
        that is forwarded over TCP."""
        for server in self.recursors:
            host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
            try:
                ask = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
                answer = await ask(
                    query, host or server, timeout=RECURSOR_TIMEOUT, port=int(port or 53)
                )
            except (dns.exception.DNSException, OSError, ValueError, EOFError) as e:
                log.debug("dns.recursor_failed", recursor=server, error=str(e) or repr(e))
                continue
            if answer.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                log.debug("dns.recursor_failed", recursor=server, rcode=answer.rcode().name)
                continue
            self.stats.forwarded += 1
            answer.id = query.id
            return self._render(answer, size)
        # no recursor answered: SERVFAIL, with recursion (still) available, as Consul
        return self._reply(query, dns.rcode.SERVFAIL, recursion=True)

    def _reply(
        self, query: dns.message.Message, rcode: int, count: bool = False, recursion: bool = False
    ) -> bytes:
        if count:
            self.stats.formerr += 1
        if rcode == dns.rcode.REFUSED:
            self.stats.refused += 1
        resp = dns.message.make_response(query, our_payload=query.payload)
        resp.set_rcode(dns.rcode.Rcode(rcode))
        if recursion:
            resp.flags |= dns.flags.RA
        return resp.to_wire()

    def _formerr(self, wire: bytes) -> bytes | None:
        """FORMERR with the query's ID when a header can be read; drop otherwise."""
        if len(wire) < 12:
            self.stats.dropped += 1
            return None
        (qid, flags) = struct.unpack("!HH", wire[:4])
        if flags & 0x8000:  # a response: never answer
            self.stats.dropped += 1
            return None
        self.stats.formerr += 1
        opcode_bits = flags & 0x7800
        return struct.pack("!HHHHHH", qid, 0x8000 | opcode_bits | dns.rcode.FORMERR, 0, 0, 0, 0)


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, responder: Responder) -> None:
        self.responder = responder
        self.transport: asyncio.DatagramTransport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        hit = self.responder.cached(data, UDP_DEFAULT_SIZE)
        if hit is not None and self.transport is not None:
            self.transport.sendto(hit, addr)  # the common case: no task, no parsing
            return
        task = asyncio.ensure_future(self._answer(data, addr))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            out = await self.responder.respond(data, UDP_DEFAULT_SIZE)
        except Exception:  # one bad query must never stop the server
            log.exception("dns.query_failed")
            return
        if out is not None and self.transport is not None:
            self.transport.sendto(out, addr)


class DNSServer:
    """The agent component serving DNS on --client:--dns-port (UDP and TCP)."""

    name = "dns"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        c = agent.config
        self.host, self.port = c.client, c.dns_port
        self.responder: Responder | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None

    async def start(self) -> None:
        consensus = self.agent.consensus
        if consensus is None:
            raise RuntimeError("DNS needs the replicated catalog (the consensus component)")
        c = self.agent.config
        config = DNSConfig(c.domain, c.datacenter, c.dns_node_ttl, c.dns_service_ttl)
        responder = self.responder = Responder(lambda: consensus.store, config, c.recursors)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UDP(responder), local_addr=(self.host, self.port), reuse_port=False
        )
        self._udp = transport
        self.port = int(transport.get_extra_info("sockname")[1])
        self._tcp = await asyncio.start_server(self._serve_tcp, self.host, self.port)
        log.info("dns.listening", addr=f"{self.host}:{self.port}", domain=c.domain)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self.responder is not None
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_TIMEOUT):
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                async with asyncio.timeout(TCP_READ_TIMEOUT):
                    data = await reader.readexactly(length)
                out = await self.responder.respond(data, None)
                if out is None:
                    break
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, OSError, TimeoutError, asyncio.CancelledError):
            pass
        except Exception:  # one bad query must never stop the server: drop this connection
            log.exception("dns.query_failed")
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._tcp.wait_closed(), 2.0)

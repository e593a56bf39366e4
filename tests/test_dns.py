"""DNS: the responder against a real store (no sockets), then `dig` against a real agent."""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from structlog.testing import capture_logs

from node.dns.resolver import DNSConfig
from node.dns.server import CATALOG_TABLES, DNSServer, Responder
from node.state import commands as c
from tests.harness.agents import AgentProc, free_port, wait_until
from tests.harness.state import StoreDriver


def register(d: StoreDriver, i: int, *, tags: list[str], status: str = "passing",
             svc_addr: str = "", meta: dict[str, str] | None = None) -> None:  # fmt: skip
    d.ok(
        c.register(
            f"n{i}", f"10.0.0.{i}", node_meta=meta or {},
            service={"ID": f"web{i}", "Service": "web", "Tags": tags, "Port": 8000 + i,
                     "Address": svc_addr},
            checks=[{"CheckID": f"c{i}", "Status": status, "ServiceID": f"web{i}"}],
            now=0.0,
        )
    )  # fmt: skip


class Upstream:
    """A recursor for the tests: a Responder for the names under `domain`, served over UDP and
    TCP on ip:port by an event loop in its own thread, so that an agent process or a blocking
    `dig` can use it too. `seen` lists the transport of every query it got."""

    def __init__(self, d: StoreDriver, ip: str = "127.0.0.1", domain: str = "example") -> None:
        self.responder = Responder(lambda: d.store, DNSConfig(domain=domain))
        self.ip, self.port = ip, free_port(ip)
        self.seen: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def addr(self) -> str:
        return f"{self.ip}:{self.port}"

    def __enter__(self) -> Upstream:
        ready = threading.Event()

        def run() -> None:
            try:
                asyncio.run(self._serve(ready))
            except BaseException as e:  # reported to the test thread below
                self._error = e
                ready.set()

        self._thread = threading.Thread(target=run, name=f"upstream-{self.port}", daemon=True)
        self._thread.start()
        assert ready.wait(5) and self._error is None, f"upstream did not start: {self._error}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)
            assert not self._thread.is_alive(), "upstream thread did not stop"

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()
        up = self

        class UDP(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = cast(asyncio.DatagramTransport, transport)

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                up.seen.append("udp")

                async def answer() -> None:
                    out = await up.responder.respond(data, 512)
                    if out is not None:
                        self.transport.sendto(out, addr)

                task = asyncio.ensure_future(answer())
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(length)
                    up.seen.append("tcp")
                    out = await up.responder.respond(data, None)
                    if out is None:
                        break
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        transport, _ = await self._loop.create_datagram_endpoint(
            UDP, local_addr=(self.ip, self.port)
        )
        server = await asyncio.start_server(tcp, self.ip, self.port)
        ready.set()
        try:
            await self._stop.wait()
        finally:
            transport.close()
            server.close()
            await server.wait_closed()


@pytest.fixture
def driver() -> StoreDriver:
    d = StoreDriver()
    register(d, 1, tags=["v1"], meta={"rack": "r1"})
    register(d, 2, tags=["v2"])
    register(d, 3, tags=["v1"], status="critical")
    register(d, 4, tags=["v2"], svc_addr="192.168.9.4")
    return d


def responder(d: StoreDriver, config: DNSConfig | None = None, **kw: object) -> Responder:
    return Responder(lambda: d.store, config or DNSConfig(), rng=random.Random(1), **kw)  # type: ignore[arg-type]


def ask(r: Responder, name: str, rdtype: str = "A", *, limit: int | None = 512,
        **kw: object) -> dns.message.Message:  # fmt: skip
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    out = asyncio.run(r.respond(q.to_wire(), limit))
    assert out is not None
    resp = dns.message.from_wire(out)
    assert resp.id == q.id
    return resp


def count(resp: dns.message.Message, section: str = "answer") -> int:
    """Records, not RRsets (parsing merges records of one name and type into one RRset)."""
    return sum(len(rr) for rr in getattr(resp, section))


def records(resp: dns.message.Message, section: str = "answer") -> list[str]:
    return sorted(
        f"{rr.name} {dns.rdatatype.to_text(rr.rdtype)} {rd}"
        for rr in getattr(resp, section) for rd in rr
    )  # fmt: skip


def test_service_a_records_are_the_passing_instances(driver: StoreDriver) -> None:
    r = responder(driver)
    resp = ask(r, "web.service.consul")
    assert resp.rcode() == dns.rcode.NOERROR and resp.flags & dns.flags.AA
    assert records(resp) == [
        "web.service.consul. A 10.0.0.1",
        "web.service.consul. A 10.0.0.2",
        "web.service.consul. A 192.168.9.4",
    ]  # fmt: skip  (n3's check is critical: not answered)
    assert records(ask(r, "v1.web.service.dc1.consul")) == ["v1.web.service.dc1.consul. A 10.0.0.1"]
    assert ask(r, "web.service.consul", "AAAA").answer == []
    # ANY is the address answer: SRV records only when asked for (Consul)
    assert records(ask(r, "web.service.consul", "ANY")) == records(resp)


def test_srv_records_carry_ports_and_target_addresses(driver: StoreDriver) -> None:
    r = responder(driver)
    resp = ask(r, "_web._v2.service.consul", "SRV")
    assert records(resp) == [
        "_web._v2.service.consul. SRV 1 1 8002 n2.node.dc1.consul.",
        "_web._v2.service.consul. SRV 1 1 8004 c0a80904.addr.dc1.consul.",
    ]
    assert records(resp, "additional") == [
        "c0a80904.addr.dc1.consul. A 192.168.9.4", "n2.node.dc1.consul. A 10.0.0.2",
    ]  # fmt: skip
    assert count(ask(r, "_web._tcp.service.consul", "SRV")) == 3  # _tcp: any tag
    assert records(ask(r, "c0a80904.addr.dc1.consul")) == [
        "c0a80904.addr.dc1.consul. A 192.168.9.4"
    ]


def test_nodes_txt_any_and_missing_names(driver: StoreDriver) -> None:
    r = responder(driver)
    assert records(ask(r, "n1.node.consul")) == ["n1.node.consul. A 10.0.0.1"]
    assert records(ask(r, "n1.node.consul", "TXT")) == ['n1.node.consul. TXT "rack=r1"']
    assert records(ask(r, "n1.node.consul", "ANY")) == [
        "n1.node.consul. A 10.0.0.1", 'n1.node.consul. TXT "rack=r1"',
    ]  # fmt: skip
    for name in ("nope.service.consul", "nope.node.consul", "web.service.dc2.consul",
                 "x.y.z.consul", "zz.addr.consul"):  # fmt: skip
        resp = ask(r, name)
        assert resp.rcode() == dns.rcode.NXDOMAIN, name
        assert records(resp, "authority")[0].startswith("consul. SOA")
    # the name exists but has no record of this type: NOERROR with the SOA
    resp = ask(r, "n2.node.consul", "TXT")
    assert resp.rcode() == dns.rcode.NOERROR and not resp.answer and resp.authority


def test_a_failing_check_takes_the_instance_out_and_the_cache_follows(
    driver: StoreDriver,
) -> None:
    r = responder(driver)
    for _ in range(6):  # fill every cached variant
        assert count(ask(r, "v2.web.service.consul")) == 2
    assert r.stats.cache_hits > 0
    register(driver, 2, tags=["v2"], status="critical")
    assert records(ask(r, "v2.web.service.consul")) == ["v2.web.service.consul. A 192.168.9.4"]
    register(driver, 4, tags=["v2"], svc_addr="192.168.9.4", status="critical")
    assert ask(r, "v2.web.service.consul").rcode() == dns.rcode.NXDOMAIN


def test_order_is_shuffled(driver: StoreDriver) -> None:
    for i in range(5, 12):
        register(driver, i, tags=["v1"])
    r = responder(driver)
    orders = {
        tuple(str(rd) for rr in ask(r, "web.service.consul").answer for rd in rr) for _ in range(40)
    }
    assert len(orders) > 1


def test_udp_truncates_with_tc_and_tcp_gets_everything(driver: StoreDriver) -> None:
    for i in range(5, 45):
        register(driver, i, tags=["v1"])
    r = responder(driver)
    udp = ask(r, "web.service.consul", "SRV")
    assert udp.flags & dns.flags.TC and 0 < count(udp) < 43
    tcp = ask(r, "web.service.consul", "SRV", limit=None)
    assert not tcp.flags & dns.flags.TC and count(tcp) == 43 and count(tcp, "additional") == 43
    edns = ask(r, "web.service.consul", "A", use_edns=0, payload=4096)  # EDNS lifts 512
    assert not edns.flags & dns.flags.TC and count(edns) == 43


def test_garbage_gets_formerr_or_is_dropped(driver: StoreDriver) -> None:
    r = responder(driver)
    out = asyncio.run(r.respond(b"\x12\x34\x01\x00garbage-garbage", 512))
    assert out is not None and out[:2] == b"\x12\x34"
    assert dns.message.from_wire(out).rcode() == dns.rcode.FORMERR
    assert asyncio.run(r.respond(b"\x00\x01", 512)) is None  # no header to answer
    reply = dns.message.make_response(dns.message.make_query("web.service.consul", "A"))
    assert asyncio.run(r.respond(reply.to_wire(), 512)) is None  # never answer a response
    q = dns.message.make_query("web.service.consul", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    assert dns.message.from_wire(asyncio.run(r.respond(q.to_wire(), 512)) or b"").rcode() == (
        dns.rcode.NOTIMP
    )
    assert r.stats.formerr == 1 and r.stats.dropped == 2
    empty = dns.message.make_query("web.service.consul", "A")
    empty.question = []
    out = asyncio.run(r.respond(empty.to_wire(), 512))
    assert dns.message.from_wire(out or b"").rcode() == dns.rcode.REFUSED  # Consul's answer


def test_the_clients_edns_size_is_echoed(driver: StoreDriver) -> None:
    r = responder(driver)
    for payload in (1232, 4096):
        q = dns.message.make_query("web.service.consul", "A", use_edns=0, payload=payload)
        resp = dns.message.from_wire(asyncio.run(r.respond(q.to_wire(), payload)) or b"")
        assert resp.edns == 0 and resp.payload == payload
    plain = dns.message.make_query("web.service.consul", "A")
    assert dns.message.from_wire(asyncio.run(r.respond(plain.to_wire(), 512)) or b"").edns < 0


def instance(d: StoreDriver, node: str, addr: str, service: str, *, port: int = 80,
             svc_addr: str = "", tags: list[str] | None = None) -> None:  # fmt: skip
    """One passing instance of `service` on `node` (its ID is `<service>-<node>`)."""
    sid = f"{service}-{node}"
    d.ok(
        c.register(
            node, addr,
            service={"ID": sid, "Service": service, "Tags": tags or [], "Port": port,
                     "Address": svc_addr},
            checks=[{"CheckID": f"chk-{sid}", "Status": "passing", "ServiceID": sid}],
            now=0.0,
        )
    )  # fmt: skip


def test_names_are_case_insensitive_and_the_reply_is_canonical(driver: StoreDriver) -> None:
    # Consul's catalog indexes names case-insensitively, and its DNS compares tags in lower case
    instance(driver, "Node5", "10.0.0.5", "Web", port=8005, tags=["Prod"])
    r = responder(driver)
    everyone = ["10.0.0.1", "10.0.0.2", "10.0.0.5", "192.168.9.4"]
    for name in ("web.service.consul", "WEB.service.consul", "Web.Service.CONSUL"):
        resp = ask(r, name)
        assert sorted(rd.to_text() for rr in resp.answer for rd in rr) == everyone, name
        # the question and the answers come back lower-cased, as Consul's router does
        assert resp.question[0].name.to_text() == "web.service.consul."
        assert {rr.name.to_text() for rr in resp.answer} == {"web.service.consul."}
    assert records(ask(r, "PROD.web.service.consul")) == ["prod.web.service.consul. A 10.0.0.5"]
    assert records(ask(r, "prod.WEB.service.consul")) == ["prod.web.service.consul. A 10.0.0.5"]
    assert records(ask(r, "_web._PROD.service.consul", "SRV")) == [
        "_web._prod.service.consul. SRV 1 1 8005 Node5.node.dc1.consul."
    ]
    assert records(ask(r, "node5.node.consul")) == ["node5.node.consul. A 10.0.0.5"]
    assert records(ask(r, "NODE5.NODE.consul")) == ["node5.node.consul. A 10.0.0.5"]
    assert ask(r, "V1.web.service.consul").rcode() == dns.rcode.NOERROR  # a lower-case tag too
    assert ask(r, "prod.nope.service.consul").rcode() == dns.rcode.NXDOMAIN


def test_recursion_flags_and_rcodes_without_and_with_recursors(driver: StoreDriver) -> None:
    alone = responder(driver)
    out = ask(alone, "www.example.com")
    # outside the domain and nothing to forward to: REFUSED (Consul), no recursion offered
    assert out.rcode() == dns.rcode.REFUSED and not out.flags & dns.flags.RA
    assert not ask(alone, "web.service.consul").flags & dns.flags.RA
    assert not ask(alone, "nope.service.consul").flags & dns.flags.RA
    with Upstream(StoreDriver(), domain="other") as refusing:
        forwarding = responder(driver, recursors=(refusing.addr,))
        # RA only when recursors exist, on the domain's own answers too
        assert ask(forwarding, "web.service.consul").flags & dns.flags.RA
        assert ask(forwarding, "nope.service.consul").flags & dns.flags.RA
        # the only recursor refuses: a recursor failure is SERVFAIL, with RA
        failed = ask(forwarding, "www.example.com")
        assert failed.rcode() == dns.rcode.SERVFAIL and failed.flags & dns.flags.RA
        assert refusing.seen == ["udp"]


def big_upstream_catalog() -> StoreDriver:
    """`www.node.example` and a `big.service.example` of 40 instances (> 512 bytes of A)."""
    other = StoreDriver()
    other.ok(c.register("www", "203.0.113.7", now=0.0))
    for i in range(1, 41):
        instance(other, f"b{i}", f"198.51.100.{i}", "big")
    return other


def test_names_outside_the_domain_go_to_the_recursors_over_the_clients_transport(
    driver: StoreDriver,
) -> None:
    with (
        Upstream(StoreDriver(), domain="other") as refusing,
        Upstream(big_upstream_catalog()) as up,
    ):
        r = responder(driver, recursors=(refusing.addr, up.addr))
        # the first recursor refuses: the next one answers (Consul tries them in order)
        assert records(ask(r, "www.node.example")) == ["www.node.example. A 203.0.113.7"]
        assert refusing.seen == ["udp"] and up.seen == ["udp"]
        assert ask(r, "nope.node.example").rcode() == dns.rcode.NXDOMAIN  # passed through
        # over UDP the upstream's truncated answer is passed on, TC and all
        udp = ask(r, "big.service.example")
        assert udp.flags & dns.flags.TC and count(udp) < 40
        # a client that asked over TCP is forwarded over TCP, and gets every record
        up.seen.clear()
        tcp = ask(r, "big.service.example", limit=None)
        assert not tcp.flags & dns.flags.TC and count(tcp) == 40
        assert "tcp" in up.seen and r.stats.forwarded == 4


def consul_voter(d: StoreDriver, node: str, addr: str) -> None:
    """What a voter registers: the `consul` service with a passing serfHealth."""
    d.ok(
        c.register(
            node, addr, service={"ID": "consul", "Service": "consul", "Port": 8300},
            checks=[{"CheckID": "serfHealth", "Status": "passing"}], now=0.0,
        )
    )  # fmt: skip


def test_the_zone_apex_answers_soa_and_ns(driver: StoreDriver) -> None:
    consul_voter(driver, "srv1", "10.0.0.100")
    r = responder(driver)
    serial = driver.store.table_index(CATALOG_TABLES)
    soa = ask(r, "consul.", "SOA")
    assert soa.rcode() == dns.rcode.NOERROR and soa.flags & dns.flags.AA
    assert records(soa) == [f"consul. SOA ns.consul. hostmaster.consul. {serial} 3600 600 86400 0"]
    assert records(soa, "authority") == ["consul. NS srv1.node.dc1.consul."]
    assert records(soa, "additional") == ["srv1.node.dc1.consul. A 10.0.0.100"]
    ns = ask(r, "CONSUL.", "NS")
    assert records(ns) == ["consul. NS srv1.node.dc1.consul."]
    assert records(ns, "additional") == ["srv1.node.dc1.consul. A 10.0.0.100"]
    # the apex exists, so other types are NOERROR with the SOA, never NXDOMAIN
    empty = ask(r, "consul.", "A")
    assert empty.rcode() == dns.rcode.NOERROR and not empty.answer
    assert records(empty, "authority")[0].startswith("consul. SOA")
    # the serial is the catalog's index: it moves with the catalog (and never with the clock)
    consul_voter(driver, "srv2", "10.0.0.101")
    later = ask(r, "consul.", "SOA")
    assert later.answer[0][0].serial == driver.store.table_index(CATALOG_TABLES) > serial
    assert sorted(rd.target.to_text() for rd in ask(r, "consul.", "NS").answer[0]) == [
        "srv1.node.dc1.consul.", "srv2.node.dc1.consul.",
    ]  # fmt: skip
    nx = ask(r, "nope.service.consul")
    assert nx.authority[0][0].serial == later.answer[0][0].serial
    mesh = responder(driver, DNSConfig(domain="mesh"))
    assert records(ask(mesh, "mesh.", "SOA"))[0].startswith("mesh. SOA ns.mesh. hostmaster.mesh.")
    assert ask(mesh, "consul.", "SOA").rcode() == dns.rcode.REFUSED  # not its zone any more


def test_a_hostname_address_is_a_cname_and_the_srv_target(driver: StoreDriver) -> None:
    instance(driver, "n20", "10.0.0.20", "ext", port=5432, svc_addr="db.example.com")
    instance(driver, "google", "www.google.com", "search", port=443)  # an external node
    instance(driver, "n21", "10.0.0.21", "mix", svc_addr="cache.example.com")
    instance(driver, "n22", "10.0.0.22", "mix")
    instance(driver, "n23", "10.0.0.23", "loop", svc_addr="LOOP.service.consul")
    r = responder(driver, DNSConfig(node_ttl=7, service_ttl=5))
    # A and AAAA: a CNAME to the hostname, not the node's address
    for qtype in ("A", "AAAA", "ANY"):
        resp = ask(r, "ext.service.consul", qtype)
        assert records(resp) == ["ext.service.consul. CNAME db.example.com."], qtype
        assert resp.answer[0].ttl == 5
    # SRV: the hostname is the target; nothing points at the node
    srv = ask(r, "ext.service.consul", "SRV")
    assert records(srv) == ["ext.service.consul. SRV 1 1 5432 db.example.com."]
    assert records(srv, "additional") == []
    # a node whose address is a hostname (an external service registered in the catalog)
    assert records(ask(r, "search.service.consul")) == [
        "search.service.consul. CNAME www.google.com."
    ]
    assert records(ask(r, "_search._tcp.service.consul", "SRV")) == [
        "_search._tcp.service.consul. SRV 1 1 443 www.google.com."
    ]
    resp = ask(r, "google.node.consul")
    assert records(resp) == ["google.node.consul. CNAME www.google.com."]
    assert resp.answer[0].ttl == 7
    # addresses win over a CNAME (a name has one CNAME and nothing else), SRV has both
    assert records(ask(r, "mix.service.consul")) == ["mix.service.consul. A 10.0.0.22"]
    assert records(ask(r, "mix.service.consul", "SRV")) == [
        "mix.service.consul. SRV 1 1 80 cache.example.com.",
        "mix.service.consul. SRV 1 1 80 n22.node.dc1.consul.",
    ]
    # a service address naming the service itself means the node's address (Consul)
    assert records(ask(r, "loop.service.consul")) == ["loop.service.consul. A 10.0.0.23"]


def test_rfc2782_names_without_the_service_label_for_srv(driver: StoreDriver) -> None:
    r = responder(driver)
    assert count(ask(r, "_web._tcp.consul", "SRV")) == 3
    assert records(ask(r, "_web._v1.dc1.consul", "SRV")) == [
        "_web._v1.dc1.consul. SRV 1 1 8001 n1.node.dc1.consul."
    ]
    # only SRV questions may leave `.service` out (agent/dns/router_query.go)
    assert ask(r, "_web._tcp.consul", "A").rcode() == dns.rcode.NXDOMAIN
    assert ask(r, "_web._tcp.dc2.consul", "SRV").rcode() == dns.rcode.NXDOMAIN


def test_ipv6_instances_answer_aaaa(driver: StoreDriver) -> None:
    instance(driver, "v6", "fd00::30", "api", port=9000)
    instance(driver, "n31", "10.0.0.31", "api", port=9001, svc_addr="fd00::31")
    r = responder(driver)
    assert records(ask(r, "api.service.consul", "AAAA")) == [
        "api.service.consul. AAAA fd00::30", "api.service.consul. AAAA fd00::31",
    ]  # fmt: skip
    a = ask(r, "api.service.consul", "A")
    assert a.rcode() == dns.rcode.NOERROR and not a.answer and a.authority  # no IPv4 instance
    hexed = "fd000000000000000000000000000031"
    srv = ask(r, "api.service.consul", "SRV")
    assert records(srv) == [
        "api.service.consul. SRV 1 1 9000 v6.node.dc1.consul.",
        f"api.service.consul. SRV 1 1 9001 {hexed}.addr.dc1.consul.",
    ]
    assert records(srv, "additional") == [
        f"{hexed}.addr.dc1.consul. AAAA fd00::31", "v6.node.dc1.consul. AAAA fd00::30",
    ]  # fmt: skip
    assert records(ask(r, f"{hexed}.addr.consul", "AAAA")) == [
        f"{hexed}.addr.consul. AAAA fd00::31"
    ]
    assert records(ask(r, "v6.node.consul", "AAAA")) == ["v6.node.consul. AAAA fd00::30"]


def test_a_scoped_ipv6_address_is_no_ip_and_breaks_nothing(driver: StoreDriver) -> None:
    """`fe80::1%eth0` parses as an IP in Python but no record can carry its zone: such an
    instance or node is left out (no address, no CNAME to a "name" with a colon), the others
    are answered as before."""
    instance(driver, "n40", "10.0.0.40", "ll", port=81)
    instance(driver, "n41", "10.0.0.41", "ll", port=82, svc_addr="fe80::1%eth0")
    instance(driver, "n42", "fe80::2%eth0", "ll", port=83)
    r = responder(driver)
    for rdtype in ("A", "AAAA", "ANY", "SRV"):
        assert ask(r, "ll.service.consul", rdtype).rcode() == dns.rcode.NOERROR, rdtype
    assert records(ask(r, "ll.service.consul")) == ["ll.service.consul. A 10.0.0.40"]
    assert ask(r, "ll.service.consul", "AAAA").answer == []
    assert records(ask(r, "ll.service.consul", "SRV")) == [
        "ll.service.consul. SRV 1 1 81 n40.node.dc1.consul."
    ]
    for rdtype in ("A", "AAAA", "ANY"):
        resp = ask(r, "n42.node.consul", rdtype)
        assert resp.rcode() == dns.rcode.NOERROR and resp.answer == [], rdtype
    assert r.stats.servfail == 0


def test_a_long_node_meta_value_is_split_into_character_strings(driver: StoreDriver) -> None:
    """RFC 1035: a TXT character-string holds at most 255 bytes; a longer text is several of
    them in one record (clients join them). A value too large for any record is left out."""
    meta = {"blob": "é" * 300, "huge": "y" * 70_000, "rack": "r9"}
    driver.ok(c.register("big", "10.0.0.50", node_meta=meta, now=0.0))
    r = responder(driver)
    resp = ask(r, "big.node.consul", "TXT", limit=None)
    assert resp.rcode() == dns.rcode.NOERROR
    txts = [rd.strings for rr in resp.answer for rd in rr]
    assert sorted(b"".join(s).decode() for s in txts) == ["blob=" + "é" * 300, "rack=r9"]
    blob = next(s for s in txts if s[0].startswith(b"blob="))
    assert [len(x) for x in blob] == [255, 255, 95]  # 605 bytes of UTF-8
    any_resp = ask(r, "big.node.consul", "ANY", limit=None)
    assert any_resp.rcode() == dns.rcode.NOERROR and count(any_resp) == 3  # A and two TXT
    assert r.stats.servfail == 0


def test_a_resolver_failure_is_servfail_and_logged_once(
    driver: StoreDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever the resolver cannot answer (a bug) is SERVFAIL, not silence; the failure is
    cached like an answer, so it is logged once (with the name) until the catalog changes."""
    r = responder(driver)
    calls = []

    def broken(query: dns.message.Message) -> dns.message.Message:
        calls.append(query.question[0].name.to_text())
        raise RuntimeError("cannot render this")

    monkeypatch.setattr(r.resolver, "answer", broken)
    with capture_logs() as logs:
        for limit in (512, 512, 512, 512, 512, 512, None):
            resp = ask(r, "web.service.consul", limit=limit)
            assert resp.rcode() == dns.rcode.SERVFAIL and not resp.answer
    failures = [e for e in logs if e["event"] == "dns.answer_failed"]
    # once per transport's cache entry; the repeats over UDP came from the cache
    assert [e["name"] for e in failures] == ["web.service.consul.", "web.service.consul."]
    assert len(calls) == 2 and r.stats.servfail == 2 and r.stats.cache_hits == 5
    register(driver, 5, tags=["v5"])  # the catalog moved: asked (and logged) again
    with capture_logs() as logs:
        assert ask(r, "web.service.consul").rcode() == dns.rcode.SERVFAIL
    assert [e["event"] for e in logs] == ["dns.answer_failed"] and len(calls) == 3


def test_a_resolver_failure_over_tcp_keeps_the_connection(
    driver: StoreDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TCP the failing query is answered SERVFAIL and the next query on the same
    connection is still answered (the connection used to be dropped)."""
    agent = SimpleNamespace(config=SimpleNamespace(client="127.0.0.1", dns_port=0))
    server = DNSServer(agent)  # type: ignore[arg-type]
    server.responder = responder(driver)
    real = server.responder.resolver.answer

    def picky(query: dns.message.Message) -> dns.message.Message:
        if query.question[0].name.labels[0] == b"n1":
            raise RuntimeError("cannot render this")
        return real(query)

    monkeypatch.setattr(server.responder.resolver, "answer", picky)

    async def run() -> list[int]:
        tcp = await asyncio.start_server(server._serve_tcp, "127.0.0.1", 0)
        port = tcp.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        rcodes = []
        try:
            for name in ("n1.node.consul", "web.service.consul"):
                wire = dns.message.make_query(name, "A").to_wire()
                writer.write(struct.pack("!H", len(wire)) + wire)
                (length,) = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), 5))
                reply = dns.message.from_wire(await reader.readexactly(length))
                rcodes.append(reply.rcode())
        finally:
            writer.close()
            tcp.close()
            await tcp.wait_closed()
        return rcodes

    assert asyncio.run(run()) == [dns.rcode.SERVFAIL, dns.rcode.NOERROR]


def test_ttls_follow_the_configuration(driver: StoreDriver) -> None:
    consul_voter(driver, "srv1", "10.0.0.100")
    r = responder(driver, DNSConfig(node_ttl=30, service_ttl=10))

    def ttls(resp: dns.message.Message, section: str = "answer") -> set[int]:
        return {rr.ttl for rr in getattr(resp, section)}

    assert ttls(ask(r, "web.service.consul")) == {10}
    srv = ask(r, "web.service.consul", "SRV")
    assert ttls(srv) == {10} and ttls(srv, "additional") == {10}  # as Consul: the service's
    assert ttls(ask(r, "n1.node.consul")) == {30}
    assert ttls(ask(r, "n1.node.consul", "TXT")) == {30}
    assert ttls(ask(r, "c0a80904.addr.consul")) == {30}
    assert ttls(ask(r, "consul.", "NS")) == {30}
    assert ttls(ask(r, "consul.", "SOA")) == {0}  # the SOA's TTL is its minimum TTL, 0
    assert ttls(ask(responder(driver), "web.service.consul")) == {0}  # Consul's default


# ----- dig against a real agent -----


DIG = shutil.which("dig")


def dig(agent: AgentProc, *args: str) -> str:
    assert DIG is not None
    out = subprocess.run(
        [DIG, "-p", str(agent.ports.dns), f"@{agent.client}", "+time=2", "+tries=1", *args],
        capture_output=True, text=True, timeout=15,
    )  # fmt: skip
    return out.stdout


@pytest.mark.cluster
def test_dig_against_an_agent(tmp_path: Path) -> None:
    if DIG is None:
        pytest.fail("dig is missing: `make test` installs dnsutils")
    ip = "127.0.0.1"
    a = AgentProc("digger", ip, tmp_path, dev=True, extra_args=["--server-port",
                  str(free_port(ip, udp=False))])  # fmt: skip
    a.start()
    try:
        a.wait_ready()
        for i in range(1, 31):  # 30 instances: an SRV answer that does not fit in 512 bytes
            check = {"CheckID": f"c{i}", "Status": "passing", "ServiceID": f"web{i}"}
            body = {"Node": f"n{i}", "Address": f"10.0.0.{i}", "Check": check,
                    "Service": {"ID": f"web{i}", "Service": "web", "Port": 8000 + i}}  # fmt: skip
            assert a.http("PUT", "/v1/catalog/register", body) == (200, True)
        addrs = dig(a, "+short", "web.service.consul").split()
        assert sorted(addrs) == sorted(f"10.0.0.{i}" for i in range(1, 31))
        srv = dig(a, "web.service.consul", "SRV")
        # dig saw TC over UDP and retried over TCP: every record, with the additional A
        assert "Truncated, retrying in TCP mode" in srv and "ANSWER: 30" in srv, srv
        assert "n7.node.dc1.consul.\t0\tIN\tA\t10.0.0.7" in srv
        nx = dig(a, "nope.service.consul")
        assert "status: NXDOMAIN" in nx and "SOA" in nx
        # a failing check takes the instance out of DNS
        fail = {"Node": "n7", "Address": "10.0.0.7",
                "Check": {"CheckID": "c7", "Status": "critical", "ServiceID": "web7"}}  # fmt: skip
        assert a.http("PUT", "/v1/catalog/register", fail) == (200, True)
        wait_until(lambda: "10.0.0.7" not in dig(a, "+short", "web.service.consul"), timeout=5,
                   desc="n7 gone from DNS")  # fmt: skip
        assert len(dig(a, "+short", "web.service.consul").split()) == 29
        t0 = time.monotonic()
        assert dig(a, "+short", "digger.node.consul").split() == [ip]
        assert time.monotonic() - t0 < 5
    finally:
        a.stop()


def dig_records(agent: AgentProc, *args: str) -> list[str]:
    """`dig +noall +answer +additional`: one "name ttl class type rdata" line per record."""
    out = dig(agent, "+noall", "+answer", "+additional", *args)
    return sorted(" ".join(line.split()) for line in out.splitlines() if line.strip())


def flags(dig_output: str) -> list[str]:
    """The header flags dig printed (`;; flags: qr aa rd ra; QUERY: 1, ...`)."""
    return dig_output.split(";; flags:")[1].split(";")[0].split()


def start_agent(name: str, tmp_path: Path, *args: str) -> AgentProc:
    if DIG is None:
        pytest.fail("dig is missing: `make test` installs dnsutils")
    ip = "127.0.0.1"
    a = AgentProc(name, ip, tmp_path, dev=True,
                  extra_args=["--server-port", str(free_port(ip, udp=False)), *args])  # fmt: skip
    a.start()
    a.wait_ready()
    return a


@pytest.mark.cluster
def test_domain_recursor_and_ttl_flags_on_an_agent(tmp_path: Path) -> None:
    with Upstream(big_upstream_catalog()) as up:
        a = start_agent("flags", tmp_path, "--domain", "mesh", "--recursor", up.addr,
                        "--dns-node-ttl", "30s", "--dns-service-ttl", "10s")  # fmt: skip
        try:
            for i in (1, 2):
                check = {"CheckID": f"c{i}", "Status": "passing", "ServiceID": f"web{i}"}
                service = {"ID": f"web{i}", "Service": "web", "Port": 8000 + i}
                body = {"Node": f"n{i}", "Address": f"10.0.0.{i}", "Check": check,
                        "Service": service}  # fmt: skip
                assert a.http("PUT", "/v1/catalog/register", body) == (200, True)
            # --domain: names and SRV targets under mesh.; --dns-service-ttl on answers and
            # their additional records, --dns-node-ttl on node records
            assert dig_records(a, "web.service.mesh", "SRV") == [
                "n1.node.dc1.mesh. 10 IN A 10.0.0.1",
                "n2.node.dc1.mesh. 10 IN A 10.0.0.2",
                "web.service.mesh. 10 IN SRV 1 1 8001 n1.node.dc1.mesh.",
                "web.service.mesh. 10 IN SRV 1 1 8002 n2.node.dc1.mesh.",
            ]
            assert dig_records(a, "n1.node.mesh") == ["n1.node.mesh. 30 IN A 10.0.0.1"]
            assert sorted(dig(a, "+short", "WEB.Service.MESH").split()) == ["10.0.0.1", "10.0.0.2"]
            # the apex: SOA and NS (the agent is the only voter, so the only name server)
            soa = dig(a, "+short", "mesh.", "SOA").split()
            assert soa[:2] == ["ns.mesh.", "hostmaster.mesh."] and soa[3:] == [
                "3600", "600", "86400", "0"
            ]  # fmt: skip
            wait_until(lambda: dig_records(a, "mesh.", "NS") == [
                "flags.node.dc1.mesh. 30 IN A 127.0.0.1", "mesh. 30 IN NS flags.node.dc1.mesh.",
            ], timeout=10, desc="the agent as the zone's name server")  # fmt: skip
            # --recursor: other names are forwarded (consul. is not this agent's zone now)
            assert "ra" in flags(dig(a, "web.service.mesh"))  # recursion is offered
            assert dig_records(a, "www.node.example") == ["www.node.example. 0 IN A 203.0.113.7"]
            assert "status: NXDOMAIN" in dig(a, "nope.node.example")  # the upstream's answer
            # consul. is no zone of this agent's now: forwarded, and the upstream refuses it
            assert "status: SERVFAIL" in dig(a, "web.service.consul")
            # a large outside answer: truncated over UDP, complete when asked over TCP
            assert "tc" in flags(dig(a, "+ignore", "+noedns", "big.service.example"))
            up.seen.clear()
            tcp = dig(a, "+tcp", "big.service.example")
            assert "ANSWER: 40" in tcp and "tc" not in flags(tcp), tcp
            assert up.seen == ["tcp"]
        finally:
            a.stop()


@pytest.mark.cluster
def test_garbage_to_a_live_agent_leaves_it_answering(tmp_path: Path) -> None:
    a = start_agent("junk", tmp_path)
    try:
        addr = (a.client, a.ports.dns)
        # mixed case: dnspython's query functions accept the lower-cased reply as the answer
        query = dns.message.make_query("Junk.Node.Consul", "A")

        def answered(resp: dns.message.Message) -> bool:
            return records(resp) == ["junk.node.consul. A 127.0.0.1"]

        wait_until(lambda: answered(dns.query.udp(query, a.client, port=a.ports.dns, timeout=2)),
                   timeout=10, desc="the agent's node in DNS")  # fmt: skip
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.settimeout(2)
            u.sendto(b"\x00", addr)  # not even a header: dropped
            u.sendto(b"\xab\xcd\x81\x80" + b"\xff" * 20, addr)  # a "response": dropped
            u.sendto(b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 30, addr)  # a header, then junk
            reply = dns.message.from_wire(u.recv(4096))
            assert reply.id == 0x1234 and reply.rcode() == dns.rcode.FORMERR
            u.sendto(b"\x56\x78\x01\x00" + bytes(range(256)) * 12, addr)  # 3 kB of junk
            reply = dns.message.from_wire(u.recv(4096))
            assert reply.id == 0x5678 and reply.rcode() == dns.rcode.FORMERR
            u.sendto(query.to_wire(), addr)  # then a good query on the same socket
            assert answered(dns.message.from_wire(u.recv(4096)))

        def frame(data: bytes) -> bytes:
            return struct.pack("!H", len(data)) + data

        def read_frame(s: socket.socket) -> bytes:
            head = s.recv(2, socket.MSG_WAITALL)
            return s.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)

        with socket.create_connection(addr, timeout=2) as t:  # junk, then a query: same stream
            t.sendall(frame(b"\x12\x34\x01\x00\x00\x01" + b"\xff" * 30))
            assert dns.message.from_wire(read_frame(t)).rcode() == dns.rcode.FORMERR
            t.sendall(frame(query.to_wire()))
            assert answered(dns.message.from_wire(read_frame(t)))
        with socket.create_connection(addr, timeout=2) as t:  # not DNS at all
            t.sendall(b"GET / HTTP/1.0\r\n\r\n")
            t.shutdown(socket.SHUT_WR)
            assert t.recv(100) == b""  # the server hangs up
        with socket.create_connection(addr, timeout=2) as t:
            t.sendall(frame(b"\x00\x01"))  # a frame too short for a header
            assert t.recv(100) == b""
        with socket.create_connection(addr, timeout=10) as t:  # a query that never completes
            t.sendall(struct.pack("!H", 100) + b"\x12\x34")
            started = time.monotonic()
            assert t.recv(100) == b""  # hung up after the 2 s read timeout, not held forever
            assert time.monotonic() - started < 6
        assert answered(dns.query.tcp(query, a.client, port=a.ports.dns, timeout=2))
        assert answered(dns.query.udp(query, a.client, port=a.ports.dns, timeout=2))
        outside = dns.message.make_query("example.com", "A")  # no --recursor: REFUSED
        refused = dns.query.udp(outside, a.client, port=a.ports.dns, timeout=2)
        assert refused.rcode() == dns.rcode.REFUSED
        # every kind of bad packet is counted, and exported
        status, text = a.http("GET", "/v1/agent/metrics?format=prometheus")
        assert status == 200
        counters = dict(re.findall(r"^meshnode_dns_(\w+)_total (\S+)$", text, re.M))
        assert float(counters["formerr"]) >= 3 and float(counters["dropped"]) >= 2, counters
        assert float(counters["refused"]) >= 1 and float(counters["queries"]) >= 1, counters
        assert a.running
    finally:
        a.stop()

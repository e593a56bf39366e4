"""DNS: the responder against a real store (no sockets), then `dig` against a real agent."""

from __future__ import annotations

import asyncio
import random
import shutil
import subprocess
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from node.dns.resolver import DNSConfig
from node.dns.server import Responder
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


@pytest.fixture
def driver() -> StoreDriver:
    d = StoreDriver()
    register(d, 1, tags=["v1"], meta={"rack": "r1"})
    register(d, 2, tags=["v2"])
    register(d, 3, tags=["v1"], status="critical")
    register(d, 4, tags=["v2"], svc_addr="192.168.9.4")
    return d


def responder(d: StoreDriver, **kw: object) -> Responder:
    return Responder(lambda: d.store, DNSConfig(), rng=random.Random(1), **kw)  # type: ignore[arg-type]


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


def test_names_outside_the_domain_go_to_the_recursor(driver: StoreDriver) -> None:
    other = StoreDriver()
    other.ok(c.register("www", "203.0.113.7", now=0.0))
    upstream = Responder(lambda: other.store, DNSConfig(domain="example"))

    async def run() -> tuple[dns.message.Message, dns.message.Message]:
        loop = asyncio.get_running_loop()

        class Up(asyncio.DatagramProtocol):
            def connection_made(self, t: asyncio.BaseTransport) -> None:
                self.t = t

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                async def answer() -> None:
                    out = await upstream.respond(data, 512)
                    assert out is not None
                    self.t.sendto(out, addr)  # type: ignore[attr-defined]

                self.pending = asyncio.ensure_future(answer())

        t, _ = await loop.create_datagram_endpoint(Up, local_addr=("127.0.0.1", 0))
        port = t.get_extra_info("sockname")[1]
        try:
            r = responder(driver, recursors=(f"127.0.0.1:{port}",))
            q = dns.message.make_query("www.node.example", "A")
            fwd = dns.message.from_wire(await r.respond(q.to_wire(), 512) or b"")
            none = responder(driver)
            lost = dns.message.from_wire(await none.respond(q.to_wire(), 512) or b"")
            return fwd, lost
        finally:
            t.close()

    fwd, lost = asyncio.run(run())
    assert records(fwd) == ["www.node.example. A 203.0.113.7"]
    assert lost.rcode() == dns.rcode.SERVFAIL  # no recursor configured: Consul's answer


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

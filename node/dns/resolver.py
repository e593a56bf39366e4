"""Answers to Consul-style DNS names, computed from the local replica of the catalog.

Names under the domain (default `consul.`), with an optional datacenter label:
* `<service>.service[.<dc>].<domain>` and `<tag>.<service>.service...`: A/AAAA of the passing
  instances (the service address, or its node's); SRV with the port and a target whose address
  rides in the additional section;
* RFC 2782 `_<service>._<tag>.service...` (`_tcp`/`_udp` mean any tag); for SRV questions the
  `.service` label may be left out (`_web._tcp.consul`), as in Consul;
* `<node>.node[.<dc>].<domain>`: A/AAAA of the node, TXT from its metadata;
* `<hex-ip>.addr[.<dc>].<domain>`: the address an SRV target names;
* the domain itself: SOA, and NS naming the voters (the nodes of the `consul` service).
Names compare case-insensitively with the catalog (Consul's indexes are case-insensitive), and
the reply is canonical: its question and records are lower-cased, as Consul's router does.
An address that is a hostname, not an IP, is answered as Consul does: a CNAME to it for A/AAAA
(only when no instance has an IP: a name with a CNAME has nothing else), the SRV target itself.
A name that does not exist is NXDOMAIN with the zone's SOA; a name without records of the asked
type is NOERROR with the SOA (Consul's behaviour). Only instances whose checks all pass are
answered (a service without any is NXDOMAIN, as in Consul), in shuffled order.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.rrset

from node.state import StateStore

__all__ = ["CATALOG_TABLES", "DNSConfig", "Resolver"]

T = dns.rdatatype

#: Every answer depends on these tables only: a reply rendered at one of their indexes stays
#: right until it moves (the server's cache and the SOA serial both use it).
CATALOG_TABLES = ("nodes", "services", "checks")

_KINDS = ("service", "node", "addr")
_ANY_TAG = ("tcp", "udp")  # RFC 2782 protocol labels, not tags
_NS_MAX = 3  # Consul names at most three servers
_SOA_TIMERS = "3600 600 86400 0"  # refresh, retry, expire, minimum (Consul's defaults)
#: the longest TXT text kept: 255 character-strings of 255 bytes and their length bytes fit
#: the 65535 bytes of one record's data; a larger Meta value is left out
_TXT_MAX = 255 * 255


@dataclass(frozen=True, slots=True)
class DNSConfig:
    domain: str = "consul"
    datacenter: str = "dc1"
    node_ttl: int = 0
    service_ttl: int = 0


def _addr_type(ip: str) -> dns.rdatatype.RdataType | None:
    """A or AAAA for an IP; None for anything else, a scoped IPv6 address (`fe80::1%eth0`)
    included: its zone means nothing to whoever asks, and no record can carry it."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        return None
    return T.AAAA if addr.version == 6 else T.A


def _txt(text: str) -> dns.rdata.Rdata | None:
    """One TXT record for `text`: as many character-strings of at most 255 bytes as it takes
    (RFC 1035 3.3.14; a client joins them). None when it cannot fit in one record at all."""
    raw = text.encode()
    if len(raw) > _TXT_MAX:
        return None
    chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, T.TXT, chunks)


def _hex_ip(ip: str) -> str:
    return ipaddress.ip_address(ip).packed.hex()


def _hostname(text: str) -> dns.name.Name | None:
    """The absolute name an address that is no IP stands for; None when it is no name (an
    IPv6 address with a zone is none either)."""
    if ":" in text:
        return None
    try:
        name = dns.name.from_text(text.rstrip(".") + ".")
    except (dns.exception.DNSException, ValueError):
        return None
    return name if len(name.labels) > 1 else None


class Resolver:
    def __init__(
        self, store: Callable[[], StateStore], config: DNSConfig, rng: random.Random | None = None
    ) -> None:
        self._store = store
        self.config = config
        self.origin = dns.name.from_text(config.domain).canonicalize()
        self.rng = rng or random.Random()

    def in_domain(self, qname: dns.name.Name) -> bool:
        return qname.is_subdomain(self.origin)

    def soa(self, store: StateStore | None = None) -> dns.rrset.RRset:
        """The zone's SOA. Its serial is the catalog's index, so it grows with every change
        of what the zone answers and a rendered reply stays exact while it is cached (Consul
        puts the clock there, which says nothing about the data)."""
        serial = (store or self._store()).table_index(CATALOG_TABLES) % 2**32
        ns = dns.name.from_text("ns", self.origin)
        mbox = dns.name.from_text("hostmaster", self.origin)
        return dns.rrset.from_rdata(
            self.origin,
            0,  # the minimum TTL, as Consul
            dns.rdata.from_text(dns.rdataclass.IN, T.SOA, f"{ns} {mbox} {serial} {_SOA_TIMERS}"),
        )

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """The full response for a query in the domain (no truncation: the server does that)."""
        resp = dns.message.make_response(query, our_payload=query.payload)  # echo, as Consul
        resp.flags |= dns.flags.AA
        resp.flags &= ~dns.flags.RA
        q = query.question[0]
        qname = q.name.canonicalize()  # Consul answers with the canonical (lower-case) name
        resp.question[0] = dns.rrset.RRset(qname, q.rdclass, q.rdtype)
        store = self._store()
        labels = [x.decode("utf-8", "replace") for x in qname.relativize(self.origin).labels]
        found = self._lookup(store, labels, q.rdtype, resp)
        if found is None:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        if not resp.answer:
            resp.authority.append(self.soa(store))
        return resp

    # -- names --------------------------------------------------------------------------------

    def _split(self, labels: list[str], qtype: int) -> tuple[str, list[str]] | None:
        """(kind, labels before it) the way Consul's router reads a name: the last label that
        names a kind, or for SRV the last `_` label (`.service` is optional there); what
        follows may only be this datacenter."""
        for i in range(len(labels) - 1, -1, -1):
            label = labels[i]
            if label in _KINDS:
                kind, head, rest = label, labels[:i], labels[i + 1 :]
            elif qtype == T.SRV and label.startswith("_"):
                kind, head, rest = "service", labels[: i + 1], labels[i + 1 :]
            else:
                continue
            if rest not in ([], [self.config.datacenter]):
                return None
            return kind, head
        return None

    def _lookup(
        self, store: StateStore, labels: list[str], qtype: int, resp: dns.message.Message
    ) -> bool | None:
        if not labels:
            return self._apex(store, qtype, resp)
        split = self._split(labels, qtype)
        if split is None or not split[1]:
            return None
        kind, head = split
        if kind == "service":
            return self._service(store, head, qtype, resp)
        if kind == "node":
            return self._node(store, ".".join(head), qtype, resp)
        if len(head) == 1:
            return self._addr(head[0], qtype, resp)
        return None

    # -- services -----------------------------------------------------------------------------

    def _instances(self, store: StateStore, service: str, tag: str) -> list[dict[str, Any]]:
        """Passing instances of every catalog service whose name matches, with the tag if one
        is given (both compared in lower case, as Consul)."""
        return store.catalog.health_service(service, tag or None, passing_only=True,
                                            any_case=True)  # fmt: skip

    def _service(
        self, store: StateStore, head: list[str], qtype: int, resp: dns.message.Message
    ) -> bool | None:
        if len(head) == 2 and head[0].startswith("_") and head[1].startswith("_"):
            service, tag = head[0][1:], head[1][1:]
            if tag in _ANY_TAG:
                tag = ""
        else:  # [tag.]service; a tag may hold dots (Consul joins the labels)
            service, tag = head[-1], ".".join(head[:-1])
        instances = self._instances(store, service, tag)
        if not instances:
            return None  # like Consul: no passing instance is NXDOMAIN
        self.rng.shuffle(instances)
        ttl = self.config.service_ttl
        qname = resp.question[0].name
        cname: dns.name.Name | None = None
        for e in instances:
            node, svc = e["Node"], e["Service"]
            ip = svc["Address"] or node["Address"]
            host = None if _addr_type(ip) else _hostname(ip)
            if host is not None and host == qname and _addr_type(node["Address"]):
                ip, host = node["Address"], None  # the service's address names itself
            if qtype == T.SRV:
                target = host if host is not None else self._target(node, ip)
                if target is None:
                    continue
                rd = dns.rdata.from_text(
                    dns.rdataclass.IN, T.SRV, f"1 1 {int(svc['Port'])} {target}"
                )
                self._add(resp.answer, qname, ttl, rd)
                if host is None:
                    self._address(resp.additional, target, ip, T.ANY, ttl)
            elif qtype in (T.A, T.AAAA, T.ANY):
                if host is None:
                    self._address(resp.answer, qname, ip, qtype, ttl)
                elif cname is None:
                    cname = host
        if cname is not None and not resp.answer:
            self._add(resp.answer, qname, ttl, dns.rdata.from_text(
                dns.rdataclass.IN, T.CNAME, cname.to_text()))  # fmt: skip
        return True

    def _target(self, node: dict[str, Any], ip: str) -> dns.name.Name | None:
        """The SRV target of an instance at `ip`: its node's name when that is where it
        listens, else the `.addr` name of its own address."""
        dc = self.config.datacenter
        if _addr_type(ip) is None:
            return None
        if ip == node["Address"]:
            try:
                return dns.name.from_text(f"{node['Node']}.node.{dc}", self.origin)
            except dns.exception.DNSException:
                pass  # a node name that is no DNS name: use its address instead
        return dns.name.from_text(f"{_hex_ip(ip)}.addr.{dc}", self.origin)

    # -- nodes, addresses, the apex -----------------------------------------------------------

    def _node(
        self, store: StateStore, name: str, qtype: int, resp: dns.message.Message
    ) -> bool | None:
        spelled = store.catalog.resolve_node(name)
        node = store.catalog.node(spelled) if spelled is not None else None
        if node is None:
            return None
        qname = resp.question[0].name
        ttl = self.config.node_ttl
        if qtype in (T.A, T.AAAA, T.ANY):
            addr = node["Address"]
            host = None if _addr_type(addr) else _hostname(addr)
            if host is not None:  # an external node: a CNAME, which stands alone
                self._add(resp.answer, qname, ttl, dns.rdata.from_text(
                    dns.rdataclass.IN, T.CNAME, host.to_text()))  # fmt: skip
                return True
            self._address(resp.answer, qname, addr, qtype, ttl)
        if qtype in (T.TXT, T.ANY):
            for k, v in sorted((node.get("Meta") or {}).items()):
                rd = _txt(f"{k}={v}")
                if rd is not None:
                    self._add(resp.answer, qname, ttl, rd)
        return True

    def _addr(self, label: str, qtype: int, resp: dns.message.Message) -> bool | None:
        try:
            raw = bytes.fromhex(label)
            ip = str(ipaddress.ip_address(raw))
        except ValueError:
            return None
        self._address(resp.answer, resp.question[0].name, ip, qtype, self.config.node_ttl)
        return True

    def _apex(self, store: StateStore, qtype: int, resp: dns.message.Message) -> bool:
        """SOA and NS of the zone; any other type is NOERROR with the SOA (the name exists)."""
        if qtype in (T.SOA, T.ANY):
            resp.answer.append(self.soa(store))
        if qtype in (T.NS, T.ANY, T.SOA):
            # NS records in the answer, or beside an SOA answer in the authority section
            section = resp.authority if qtype == T.SOA else resp.answer
            self._name_servers(store, section, resp.additional)
        return True

    def _name_servers(
        self,
        store: StateStore,
        section: list[dns.rrset.RRset],
        additional: list[dns.rrset.RRset],
    ) -> None:
        """Up to three voters (the passing nodes of the `consul` service), shuffled, as
        `<node>.node.<dc>.<domain>`, with their addresses as glue (Consul's NS answer)."""
        voters = store.catalog.health_service("consul", None, passing_only=True)
        self.rng.shuffle(voters)
        ttl = self.config.node_ttl
        named = 0
        for e in voters:
            node = e["Node"]
            if _addr_type(node["Address"]) is None:
                continue
            try:
                target = dns.name.from_text(
                    f"{node['Node']}.node.{self.config.datacenter}", self.origin
                )
            except dns.exception.DNSException:
                continue  # no DNS name for it (Consul skips such nodes too)
            self._add(section, self.origin, ttl,
                      dns.rdata.from_text(dns.rdataclass.IN, T.NS, target.to_text()))  # fmt: skip
            self._address(additional, target, node["Address"], T.ANY, ttl)
            named += 1
            if named == _NS_MAX:
                return

    # -- records ------------------------------------------------------------------------------

    @staticmethod
    def _add(section: list[dns.rrset.RRset], name: dns.name.Name, ttl: int,
             rd: dns.rdata.Rdata) -> None:  # fmt: skip
        # one RRset per record keeps the shuffled order on the wire
        rrset = dns.rrset.RRset(name, dns.rdataclass.IN, rd.rdtype)
        rrset.update_ttl(ttl)
        rrset.add(rd)
        if rrset not in section:
            section.append(rrset)

    def _address(self, section: list[dns.rrset.RRset], name: dns.name.Name, ip: str,
                 qtype: int, ttl: int) -> None:  # fmt: skip
        kind = _addr_type(ip)
        if kind is None or (qtype not in (T.ANY, kind)):
            return
        self._add(section, name, ttl, dns.rdata.from_text(dns.rdataclass.IN, kind, ip))

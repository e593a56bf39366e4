"""Answers to Consul-style DNS names, computed from the local replica of the catalog.

Names under the domain (default `consul.`), with an optional datacenter label:
* `<service>.service[.<dc>].<domain>` and `<tag>.<service>.service...`: A/AAAA of the passing
  instances (the service address, or its node's); SRV with the port and a target whose address
  rides in the additional section;
* RFC 2782 `_<service>._<tag>.service...` (`_tcp`/`_udp` mean any tag);
* `<node>.node[.<dc>].<domain>`: A/AAAA of the node, TXT from its metadata;
* `<hex-ip>.addr[.<dc>].<domain>`: the address an SRV target names.
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

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from node.state import StateStore

__all__ = ["DNSConfig", "Resolver"]

T = dns.rdatatype


@dataclass(frozen=True, slots=True)
class DNSConfig:
    domain: str = "consul"
    datacenter: str = "dc1"
    node_ttl: int = 0
    service_ttl: int = 0


def _addr_type(ip: str) -> dns.rdatatype.RdataType | None:
    try:
        return T.AAAA if ipaddress.ip_address(ip).version == 6 else T.A
    except ValueError:
        return None


def _hex_ip(ip: str) -> str:
    return ipaddress.ip_address(ip).packed.hex()


class Resolver:
    def __init__(
        self, store: Callable[[], StateStore], config: DNSConfig, rng: random.Random | None = None
    ) -> None:
        self._store = store
        self.config = config
        self.origin = dns.name.from_text(config.domain)
        self.rng = rng or random.Random()

    def in_domain(self, qname: dns.name.Name) -> bool:
        return qname.is_subdomain(self.origin)

    def soa(self) -> dns.rrset.RRset:
        ns = dns.name.from_text("ns", self.origin)
        mbox = dns.name.from_text("hostmaster", self.origin)
        return dns.rrset.from_rdata(
            self.origin,
            0,
            dns.rdata.from_text(dns.rdataclass.IN, T.SOA, f"{ns} {mbox} 1 3600 600 86400 0"),
        )

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """The full response for a query in the domain (no truncation: the server does that)."""
        resp = dns.message.make_response(query)
        resp.flags |= dns.flags.AA
        resp.flags &= ~dns.flags.RA
        q = query.question[0]
        labels = [x.decode("utf-8", "replace").lower() for x in
                  q.name.relativize(self.origin).labels]  # fmt: skip
        found = self._lookup(labels, q.rdtype, resp)
        if found is None:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        if not resp.answer:
            resp.authority.append(self.soa())
        return resp

    # -- names --------------------------------------------------------------------------------

    def _strip_dc(self, labels: list[str], kind: str) -> list[str] | None:
        """Labels before `kind` (service/node/addr), or None when the name is not of that kind
        or names another datacenter."""
        if kind not in labels:
            return None
        i = len(labels) - 1 - labels[::-1].index(kind)
        rest = labels[i + 1 :]
        if rest not in ([], [self.config.datacenter]):
            return None
        return labels[:i]

    def _lookup(self, labels: list[str], qtype: int, resp: dns.message.Message) -> bool | None:
        if (head := self._strip_dc(labels, "service")) is not None:
            return self._service(head, qtype, resp)
        if (head := self._strip_dc(labels, "node")) is not None and len(head) == 1:
            return self._node(head[0], qtype, resp)
        if (head := self._strip_dc(labels, "addr")) is not None and len(head) == 1:
            return self._addr(head[0], qtype, resp)
        return None

    def _service(self, head: list[str], qtype: int, resp: dns.message.Message) -> bool | None:
        if len(head) == 2 and head[0].startswith("_") and head[1].startswith("_"):
            service, tag = head[0][1:], head[1][1:]
            if tag in ("tcp", "udp"):
                tag = ""
        elif len(head) == 1:
            service, tag = head[0], ""
        elif len(head) == 2:
            tag, service = head
        else:
            return None
        instances = self._store().catalog.health_service(service, tag or None, passing_only=True)
        if not instances:
            return None  # like Consul: no passing instance is NXDOMAIN
        self.rng.shuffle(instances)
        ttl = self.config.service_ttl
        qname = resp.question[0].name
        for e in instances:
            node, svc = e["Node"], e["Service"]
            ip = svc["Address"] or node["Address"]
            if qtype in (T.A, T.AAAA, T.ANY):
                self._address(resp.answer, qname, ip, qtype, ttl)
            if qtype in (T.SRV, T.ANY):
                target = self._target(node, svc)
                rd = dns.rdata.from_text(
                    dns.rdataclass.IN, T.SRV, f"1 1 {int(svc['Port'])} {target}"
                )
                self._add(resp.answer, qname, ttl, rd)
                self._address(resp.additional, target, ip, T.ANY, ttl)
        return True

    def _target(self, node: dict[str, Any], svc: dict[str, Any]) -> dns.name.Name:
        dc = self.config.datacenter
        if svc["Address"] and svc["Address"] != node["Address"] and _addr_type(svc["Address"]):
            return dns.name.from_text(f"{_hex_ip(svc['Address'])}.addr.{dc}", self.origin)
        return dns.name.from_text(f"{node['Node']}.node.{dc}", self.origin)

    def _node(self, name: str, qtype: int, resp: dns.message.Message) -> bool | None:
        node = self._store().catalog.node(name)
        if node is None:
            return None
        qname = resp.question[0].name
        ttl = self.config.node_ttl
        if qtype in (T.A, T.AAAA, T.ANY):
            self._address(resp.answer, qname, node["Address"], qtype, ttl)
        if qtype in (T.TXT, T.ANY):
            for k, v in sorted((node.get("Meta") or {}).items()):
                text = f"{k}={v}".replace("\\", "\\\\").replace('"', '\\"')
                self._add(resp.answer, qname, ttl, dns.rdata.from_text(
                    dns.rdataclass.IN, T.TXT, f'"{text}"'))  # fmt: skip
        return True

    def _addr(self, label: str, qtype: int, resp: dns.message.Message) -> bool | None:
        try:
            raw = bytes.fromhex(label)
            ip = str(ipaddress.ip_address(raw))
        except ValueError:
            return None
        self._address(resp.answer, resp.question[0].name, ip, qtype, self.config.node_ttl)
        return True

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

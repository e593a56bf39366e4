"""LAN auto-discovery of meshnode agents over mDNS / DNS-SD.

Every agent registers ``<node name>._meshnode._tcp.local.`` pointing at its gossip address and
browses for the others. Discovery is only a seed source: each newly seen peer is handed to
``on_peer("ip:port")`` (typically a gossip join); liveness is the gossip layer's business, so a
peer that disappears from mDNS is merely forgotten here, not declared dead.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import re
from collections.abc import Awaitable, Callable

import ifaddr
import structlog
from zeroconf import (
    BadTypeInNameException,
    InterfaceChoice,
    IPVersion,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

__all__ = ["SERVICE_TYPE", "MDNSDiscovery"]

SERVICE_TYPE = "_meshnode._tcp.local."

log = structlog.get_logger("gossip.discovery")

# DNS labels are at most 63 bytes; keep room for zeroconf's "-N" rename suffix on collisions.
_MAX_INSTANCE_BYTES = 59
_MAX_LABEL = 63
_RESOLVE_TIMEOUT_MS = 3000
_GOODBYE_TIMEOUT_S = 2.0
_WILDCARD = "0.0.0.0"


def _truncate_utf8(text: str, limit: int) -> str:
    """Cut to `limit` UTF-8 bytes without splitting a character."""
    return text.encode()[:limit].decode(errors="ignore")


def _host_label(name: str, addr: str, port: int) -> str:
    """Host name unique per endpoint, so two agents sharing a node name never share A records."""
    suffix = f"-{addr.replace('.', '-')}-{port}"
    base = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "meshnode"
    return base[: _MAX_LABEL - len(suffix)] + suffix


def _local_ipv4() -> list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Network]]:
    """Non-loopback IPv4 interface addresses with their networks (order as the OS lists them)."""
    out: list[tuple[ipaddress.IPv4Address, ipaddress.IPv4Network]] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue
            iface = ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}")
            if not iface.ip.is_loopback:
                out.append((iface.ip, iface.network))
    return out


class MDNSDiscovery:
    """Advertise this agent and report other meshnode agents seen on the LAN.

    `on_peer` is awaited once per newly discovered endpoint of a service instance, again when
    that instance's record moves to another address/port, and again if it comes back after a
    goodbye. It is never called for our own registration. IPv4 only, like the gossip layer.
    """

    def __init__(
        self,
        name: str,
        addr: str,
        port: int,
        on_peer: Callable[[str], Awaitable[None]],
        *,
        interfaces: list[str] | None = None,
        properties: dict[str, str] | None = None,
    ) -> None:
        ip = ipaddress.ip_address(addr)
        if ip.version != 4:
            raise ValueError(f"discovery supports IPv4 only, got {addr!r}")
        if not 0 < port < 65536:
            raise ValueError(f"invalid port {port}")
        if not name:
            raise ValueError("node name must not be empty")
        self._name = name
        self._addr = str(ip)
        self._port = port
        self._on_peer = on_peer
        # Pinning the interface matters in network namespaces / multi-homed hosts: without it
        # zeroconf needs a multicast route and may answer on the wrong interface.
        if interfaces is None and self._addr != _WILDCARD:
            interfaces = [self._addr]
        self._interfaces = interfaces
        self._properties = {"node": name, **(properties or {})}
        self._instance = _truncate_utf8(name, _MAX_INSTANCE_BYTES)

        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._registered = False
        self._own: set[str] = set()
        self._local_nets: list[ipaddress.IPv4Network] = []
        self._known: dict[str, str] = {}  # service name (lowercase) -> last reported "ip:port"
        self._seen: set[str] = set()
        self._resolvers: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._background: set[asyncio.Task[object]] = set()
        self._started = False
        self._stopped = False

    @property
    def registered_name(self) -> str | None:
        """Our full service name; differs from the requested one after a name collision."""
        return self._info.name if self._info is not None else None

    def peers(self) -> set[str]:
        """Every peer endpoint ("ip:port") reported so far, including ones since gone or moved."""
        return set(self._seen)

    async def start(self) -> None:
        """Browse, then register (probing renames us if another agent already has our name)."""
        if self._started:
            raise RuntimeError("MDNSDiscovery.start() called twice")
        self._started = True

        advertised = self._advertised_addresses()
        self._own = {f"{a}:{self._port}" for a in advertised}
        local = _local_ipv4()
        pinned = {ipaddress.IPv4Address(a) for a in advertised}
        self._local_nets = [net for ip, net in local if self._addr == _WILDCARD or ip in pinned]

        self._azc = AsyncZeroconf(
            interfaces=self._interfaces if self._interfaces is not None else InterfaceChoice.All,
            ip_version=IPVersion.V4Only,
        )
        try:
            self._browser = AsyncServiceBrowser(
                self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]
            )
            self._info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{self._instance}.{SERVICE_TYPE}",
                port=self._port,
                properties=self._properties,
                server=f"{_host_label(self._name, advertised[0], self._port)}.local.",
                parsed_addresses=advertised,
            )
            announced = await self._azc.async_register_service(self._info, allow_name_change=True)
            self._registered = True
        except BaseException:
            await self._close_zeroconf()
            raise
        # The announcements go out over the next second; no reason to make start() wait for them.
        self._spawn(announced)

        if self._info.name != f"{self._instance}.{SERVICE_TYPE}":
            log.warning(
                "discovery.name_conflict",
                requested=self._name,
                registered=self._info.name,
            )
        log.info(
            "discovery.started",
            name=self._info.name,
            addresses=advertised,
            port=self._port,
            interfaces=self._interfaces or "all",
        )

    async def stop(self) -> None:
        """Send goodbyes and release the sockets; safe to call more than once."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        tasks = [*self._resolvers.values(), *self._background]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._resolvers.clear()
        self._background.clear()
        await self._close_zeroconf()
        log.info("discovery.stopped", name=self.registered_name)

    async def _close_zeroconf(self) -> None:
        azc, self._azc = self._azc, None
        browser, self._browser = self._browser, None
        if azc is None:
            return
        try:
            if browser is not None:
                await browser.async_cancel()
            if self._registered and self._info is not None:
                self._registered = False
                goodbye = await azc.async_unregister_service(self._info)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(goodbye, _GOODBYE_TIMEOUT_S)
        except Exception:
            log.exception("discovery.unregister_failed", name=self.registered_name)
        finally:
            await azc.async_close()

    def _advertised_addresses(self) -> list[str]:
        if self._addr != _WILDCARD:
            return [self._addr]
        if self._interfaces:
            return list(self._interfaces)
        local = [str(ip) for ip, _ in _local_ipv4()]
        return local or ["127.0.0.1"]

    def _spawn(self, aw: Awaitable[object]) -> None:
        async def run() -> object:
            return await aw

        task: asyncio.Task[object] = asyncio.ensure_future(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """zeroconf handler (runs in the event loop, must not block): hand off to a resolver."""
        if self._stopped or service_type != SERVICE_TYPE or not name.endswith(f".{SERVICE_TYPE}"):
            return
        key = name.lower()
        if state_change is ServiceStateChange.Removed:
            gone = self._known.pop(key, None)
            if gone is not None:
                log.info("discovery.peer_lost", service=name, peer=gone)
            return
        if key in self._resolvers:
            # A resolve is in flight; run it once more afterwards so the newest record wins.
            self._dirty.add(key)
            return
        task = asyncio.get_running_loop().create_task(self._resolve_loop(name, key))
        self._resolvers[key] = task
        task.add_done_callback(functools.partial(self._resolver_done, key))

    def _resolver_done(self, key: str, _task: asyncio.Task[None]) -> None:
        self._resolvers.pop(key, None)

    async def _resolve_loop(self, name: str, key: str) -> None:
        while True:
            self._dirty.discard(key)
            await self._resolve(name, key)
            if key not in self._dirty or self._stopped:
                return

    async def _resolve(self, name: str, key: str) -> None:
        azc = self._azc
        if azc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            ok = await info.async_request(azc.zeroconf, _RESOLVE_TIMEOUT_MS)
        except (OSError, BadTypeInNameException) as exc:
            log.warning("discovery.resolve_failed", service=name, error=str(exc))
            return
        if not ok or info.port is None:
            log.debug("discovery.resolve_incomplete", service=name)
            return
        ip = self._pick_address(info.parsed_addresses(IPVersion.V4Only))
        if ip is None:
            log.debug("discovery.no_ipv4_address", service=name)
            return
        peer = f"{ip}:{info.port}"
        if peer in self._own:
            log.debug("discovery.self_ignored", service=name, peer=peer)
            return
        if self._info is not None and key == self._info.key:
            # Same service name as ours but someone else's endpoint: a simultaneous-start clash.
            log.warning("discovery.name_conflict", service=name, peer=peer)
        previous = self._known.get(key)
        if previous == peer:
            return
        # An endpoint already known under another instance name (e.g. an agent that restarted
        # and got renamed before its old record expired) is not a new peer.
        duplicate = peer in self._known.values()
        self._known[key] = peer
        self._seen.add(peer)
        if duplicate:
            log.debug("discovery.duplicate_endpoint", service=name, peer=peer)
            return
        log.info(
            "discovery.peer_found",
            service=name,
            peer=peer,
            previous=previous,
            properties=info.decoded_properties,
        )
        try:
            await self._on_peer(peer)
        except Exception:
            log.exception("discovery.peer_callback_failed", service=name, peer=peer)

    def _pick_address(self, addresses: list[str]) -> str | None:
        """Prefer an address on one of our own networks; a wildcard agent advertises them all."""
        if not addresses:
            return None
        for candidate in addresses:
            ip = ipaddress.IPv4Address(candidate)
            if any(ip in net for net in self._local_nets):
                return candidate
        return addresses[0]

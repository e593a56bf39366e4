"""The meshnode agent: owns the gossip runtime and the components layered on top of it.

Lifecycle: start() prepares the data dir (node ID, keyring), starts gossip, performs --join
(failing the start like Consul when nothing can be joined), then starts the components in
order (retry-join, mDNS discovery, later layers, and the HTTP API last so it only answers once
everything behind it is up). stop() runs in reverse. run() adds signal handling: the first
SIGTERM/SIGINT leaves the cluster gracefully and exits 0, a second one forces the exit.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import platform
import re
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import structlog

from gossip.config import GossipConfig
from gossip.keyring import Keyring, KeyringError, parse_key
from gossip.member import (
    KeyResponse,
    Member,
    MemberEvent,
    MemberEventType,
    UserEvent,
)
from node.api.http import HTTPServer
from node.config import CONSUL_COMPAT_VERSION, MESHNODE_VERSION, AgentConfig
from node.metrics import AgentMetrics

if TYPE_CHECKING:
    from node.consensus import Consensus
    from node.local import LocalState

__all__ = [
    "EVENT_BUFFER_SIZE",
    "USER_EVENT_PREFIX",
    "Agent",
    "AgentError",
    "Component",
    "EventLog",
    "GossipRuntimeLike",
    "StoredEvent",
    "event_index",
]

log = structlog.get_logger("node.agent")

#: Consul fires its user events as serf events named "consul:event:<name>", msgpack-encoded.
USER_EVENT_PREFIX = "consul:event:"
USER_EVENT_VERSION = 1
#: How many received events /v1/event/list keeps (Consul's agent keeps 256).
EVENT_BUFFER_SIZE = 256
#: Consul's remote-exec event; meshnode does not implement remote exec, so it is not listed.
REMOTE_EXEC_EVENT = "_rexec"
COMPONENT_STOP_TIMEOUT = 10.0


class AgentError(Exception):
    """The agent cannot start (bad data dir, port in use, --join failed); one-line message."""


class GossipRuntimeLike(Protocol):
    """What the agent needs from gossip.runtime.GossipRuntime (and what test fakes provide)."""

    async def start(self) -> None: ...
    async def join(self, addrs: list[str]) -> int: ...
    async def leave(self) -> None: ...
    async def shutdown(self) -> None: ...
    def members(self) -> list[Member]: ...
    def local_member(self) -> Member: ...
    async def set_tags(self, tags: dict[str, str]) -> None: ...
    async def user_event(self, name: str, payload: bytes, coalesce: bool = True) -> None: ...
    def subscribe(self) -> asyncio.Queue[MemberEvent | UserEvent]: ...
    async def install_key(self, key: bytes) -> KeyResponse: ...
    async def use_key(self, key: bytes) -> KeyResponse: ...
    async def remove_key(self, key: bytes) -> KeyResponse: ...
    async def list_keys(self) -> KeyResponse: ...
    def stats(self) -> dict[str, int | str]: ...


class RuntimeFactory(Protocol):
    def __call__(
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
    ) -> GossipRuntimeLike: ...


class DiscoveryLike(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


DiscoveryFactory = Callable[[str, str, int, Callable[[str], Awaitable[None]]], DiscoveryLike]


class Component(Protocol):
    """A layer the agent starts after gossip and stops before it (Raft, catalog, DNS, ...)."""

    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def _default_runtime_factory(**kwargs: Any) -> GossipRuntimeLike:
    from gossip.runtime import GossipRuntime

    return GossipRuntime(**kwargs)


def _default_discovery_factory(
    name: str, addr: str, port: int, on_peer: Callable[[str], Awaitable[None]]
) -> DiscoveryLike:
    from gossip.discovery import MDNSDiscovery

    return MDNSDiscovery(name, addr, port, on_peer)


# ----- user events (Consul's /v1/event/* semantics) -----


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One user event in Consul's shape."""

    id: str
    name: str
    payload: bytes | None
    node_filter: str = ""
    service_filter: str = ""
    tag_filter: str = ""
    version: int = USER_EVENT_VERSION
    ltime: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": self.id,
            "Name": self.name,
            "Payload": base64.b64encode(self.payload).decode() if self.payload else None,
            "NodeFilter": self.node_filter,
            "ServiceFilter": self.service_filter,
            "TagFilter": self.tag_filter,
            "Version": self.version,
            "LTime": self.ltime,
        }

    def encode(self) -> bytes:
        """The serf payload, with Consul's codec field names so Consul agents understand it."""
        body: dict[str, Any] = {"ID": self.id, "n": self.name, "v": self.version}
        if self.payload:
            body["p"] = self.payload
        if self.node_filter:
            body["nf"] = self.node_filter
        if self.service_filter:
            body["sf"] = self.service_filter
        if self.tag_filter:
            body["tf"] = self.tag_filter
        return bytes(msgpack.packb(body, use_bin_type=True))

    @classmethod
    def decode(cls, raw: bytes, ltime: int) -> StoredEvent:
        try:
            body = msgpack.unpackb(raw, raw=False, unicode_errors="surrogateescape")
        except (ValueError, msgpack.UnpackException) as e:
            raise ValueError(f"undecodable event: {str(e) or type(e).__name__}") from None
        if not isinstance(body, dict):
            raise ValueError("event body is not a map")

        def text(key: str) -> str:
            v = body.get(key, "")
            if isinstance(v, bytes):
                return v.decode(errors="replace")
            return v if isinstance(v, str) else ""

        payload = body.get("p")
        if isinstance(payload, str):
            payload = payload.encode("utf-8", "surrogateescape")
        version = body.get("v", 0)
        return cls(
            id=text("ID"),
            name=text("n"),
            payload=bytes(payload) if isinstance(payload, bytes | bytearray) and payload else None,
            node_filter=text("nf"),
            service_filter=text("sf"),
            tag_filter=text("tf"),
            version=version if isinstance(version, int) else 0,
            ltime=ltime,
        )


def event_index(event_id: str) -> int:
    """Consul's uuidToUint64: the event list's X-Consul-Index is derived from the newest ID."""
    hexed = event_id.replace("-", "")
    if len(hexed) != 32:
        return 0
    try:
        return int(hexed[:16], 16) ^ int(hexed[16:], 16)
    except ValueError:
        return 0


def validate_event_filters(node: str, service: str, tag: str) -> None:
    """The checks Consul applies before firing; raises ValueError with Consul's wording."""
    if tag and not service:
        raise ValueError("Cannot provide tag filter without service filter")
    for what, pattern in (("node", node), ("service", service), ("tag", tag)):
        if pattern:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"Invalid {what} filter: {e}") from None


class EventLog:
    """The last EVENT_BUFFER_SIZE events this agent accepted, oldest first, with change waits."""

    def __init__(self, size: int = EVENT_BUFFER_SIZE) -> None:
        self._events: deque[StoredEvent] = deque(maxlen=size)
        self._changed = asyncio.Event()
        self.version = 0

    def add(self, event: StoredEvent) -> None:
        self._events.append(event)
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    def matching(self, name: str | None = None) -> list[StoredEvent]:
        return [e for e in self._events if name is None or e.name == name]

    @staticmethod
    def index(events: list[StoredEvent]) -> int:
        """Consul returns 1 for an empty result so that watchers do not spin on index 0."""
        return event_index(events[-1].id) if events else 1

    async def wait(self, version: int, timeout: float) -> None:
        """Return once an event newer than `version` was added, or after timeout."""
        if self.version != version or timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def wake_all(self) -> None:
        """Release every waiter (on shutdown) without adding an event."""
        self._changed.set()
        self._changed = asyncio.Event()


# ----- components the agent itself provides -----


class RetryJoin:
    """--retry-join: keep trying in the background until one address answers."""

    name = "retry-join"

    def __init__(self, agent: Agent, addrs: Iterable[str], interval: float) -> None:
        self.agent = agent
        self.addrs = list(addrs)
        self.interval = interval
        self.joined = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="retry-join")

    async def _run(self) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                n = await self.agent.runtime.join(self.addrs)
            except Exception as e:  # any failure just means "try again later"
                log.warning(
                    "agent.retry_join_failed",
                    addresses=self.addrs,
                    attempt=attempt,
                    error=str(e) or type(e).__name__,
                    retry_in=self.interval,
                )
                await asyncio.sleep(self.interval)
                continue
            log.info("agent.retry_join_succeeded", addresses=self.addrs, nodes=n, attempt=attempt)
            self.joined.set()
            return

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class MDNSJoiner:
    """--discover mdns: advertise ourselves and join every meshnode agent seen on the LAN."""

    name = "mdns"

    def __init__(self, agent: Agent, factory: DiscoveryFactory) -> None:
        self.agent = agent
        self.factory = factory
        self._discovery: DiscoveryLike | None = None
        self._self_addr = ""

    async def start(self) -> None:
        me = self.agent.runtime.local_member()
        self._self_addr = f"{me.ip}:{me.port}"
        self._discovery = self.factory(self.agent.config.node, me.ip, me.port, self._on_peer)
        await self._discovery.start()

    async def _on_peer(self, peer: str) -> None:
        if peer == self._self_addr:
            return
        try:
            n = await self.agent.runtime.join([peer])
        except Exception as e:  # discovery is best effort; gossip retries on its own
            log.debug("agent.mdns_join_failed", peer=peer, error=str(e) or type(e).__name__)
            return
        log.info("agent.mdns_joined", peer=peer, nodes=n)

    async def stop(self) -> None:
        if self._discovery is not None:
            await self._discovery.stop()


# ----- the agent -----


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        runtime_factory: RuntimeFactory | None = None,
        discovery_factory: DiscoveryFactory | None = None,
        gossip_config: GossipConfig | None = None,
    ) -> None:
        self.config = config
        self.gossip_config = gossip_config or GossipConfig.lan()
        self._runtime_factory: RuntimeFactory = runtime_factory or _default_runtime_factory
        self._discovery_factory = discovery_factory or _default_discovery_factory
        self.node_id = ""
        self.keyring: Keyring | None = None
        self.events = EventLog()
        self.components: list[Component] = []
        #: Set by a later catalog layer: local service name -> tags, for event service filters.
        self.local_services: Callable[[], Mapping[str, list[str]]] = dict
        self.started_at = 0.0
        self.http: HTTPServer | None = None
        #: the Raft and state-store layer (node/consensus.py), when the agent runs one
        self.consensus: Consensus | None = None
        #: the services and checks this agent owns (node/local.py), when it keeps any
        self.local: LocalState | None = None
        self.metrics = AgentMetrics(self)
        self._reloads: set[asyncio.Future[None]] = set()
        self._runtime: GossipRuntimeLike | None = None
        self._pump: asyncio.Task[None] | None = None
        self._started: list[Component] = []
        self._runtime_started = False
        self._shutdown = asyncio.Event()
        self._leave_on_shutdown = False
        self._left = False
        self._leave_lock = asyncio.Lock()
        self._stopped = False
        self._signals = 0
        self._forced = False
        self._phase: asyncio.Task[None] | None = None

        if config.retry_join:
            self.components.append(RetryJoin(self, config.retry_join, config.retry_interval))
        if config.discover == "mdns":
            self.components.append(MDNSJoiner(self, self._discovery_factory))

    # -- accessors used by the HTTP API --------------------------------------------------------

    @property
    def runtime(self) -> GossipRuntimeLike:
        if self._runtime is None:
            raise RuntimeError("agent is not started")
        return self._runtime

    @property
    def encryption_enabled(self) -> bool:
        return self.keyring is not None

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    def tags(self) -> dict[str, str]:
        c = self.config
        tags = {
            "role": "node",
            "dc": c.datacenter,
            "id": self.node_id,
            "build": MESHNODE_VERSION,
            "port": str(c.server_port),
            "http_port": str(c.http_port),
            "dns_port": str(c.dns_port),
            "vsn": "1",
        }
        if c.bootstrap_expect:
            tags["expect"] = str(c.bootstrap_expect)  # as Consul's servers advertise it
        return tags

    def add_component(self, component: Component) -> None:
        """Register a later layer; it starts after gossip and before the HTTP API."""
        if self._runtime_started:
            raise RuntimeError("components must be added before the agent starts")
        self.components.append(component)

    def stats(self) -> dict[str, dict[str, str]]:
        stats = {
            "build": {
                "prerelease": "",
                "revision": f"meshnode-{MESHNODE_VERSION}",
                "version": CONSUL_COMPAT_VERSION,
                "version_metadata": "meshnode",
            },
            "consul": {"acl": "disabled", "server": "false", "known_servers": "0"},
            "runtime": {
                "arch": platform.machine(),
                "os": sys.platform,
                "version": f"python{platform.python_version()}",
                "tasks": str(len(asyncio.all_tasks())),
                "uptime_seconds": str(int(time.monotonic() - self.started_at)),
            },
            "serf_lan": {k: str(v) for k, v in self.runtime.stats().items()},
        }
        if self.consensus is not None and self.consensus.raft is not None:
            stats.update(self.consensus.stats())
        return stats

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.config
        self.started_at = time.monotonic()
        keyring_path = self._prepare_data_dir()
        self._runtime = self._runtime_factory(
            name=c.node,
            bind_addr=c.bind,
            bind_port=c.serf_port,
            advertise_addr=c.advertise,
            advertise_port=None,
            tags=self.tags(),
            config=self.gossip_config,
            keyring=self.keyring,
            keyring_path=keyring_path,
        )
        queue = self._runtime.subscribe()
        self._pump = asyncio.create_task(self._pump_events(queue), name="agent-events")
        try:
            await self._runtime.start()
        except OSError as e:
            raise AgentError(
                f"cannot listen for gossip on {c.bind}:{c.serf_port}: {e.strerror or e}"
            ) from None
        except Exception as e:
            raise AgentError(f"cannot start gossip: {e}") from None
        self._runtime_started = True

        if c.join:
            try:
                n = await self._runtime.join(list(c.join))
            except Exception as e:  # Consul refuses to start when -join fails
                raise AgentError(f"failed to join {', '.join(c.join)}: {e}") from None
            log.info("agent.joined", addresses=list(c.join), nodes=n)

        http = self.http = HTTPServer(self, c.client, c.http_port)
        for comp in [*self.components, http]:
            try:
                await comp.start()
            except OSError as e:
                raise AgentError(f"cannot start {comp.name}: {e.strerror or e}") from None
            self._started.append(comp)
        me = self._runtime.local_member()
        log.info(
            "agent.started",
            node=c.node,
            node_id=self.node_id,
            datacenter=c.datacenter,
            gossip=f"{me.ip}:{me.port}",
            http=f"{c.client}:{http.port}",
            encrypted=self.encryption_enabled,
            version=MESHNODE_VERSION,
        )

    async def leave(self) -> None:
        """Graceful leave (once): peers see us as 'left' rather than 'failed'."""
        async with self._leave_lock:
            if self._left or not self._runtime_started:
                return
            log.info("agent.leaving", node=self.config.node)
            if self.consensus is not None:
                await self.consensus.leave()
            await self.runtime.leave()
            self._left = True
            log.info("agent.left", node=self.config.node)

    def request_shutdown(self, leave: bool = False) -> None:
        """Ask run() to stop the agent (and leave first when `leave`)."""
        self._leave_on_shutdown = self._leave_on_shutdown or leave
        self._shutdown.set()
        self.events.wake_all()

    async def stop(self, timeout: float = COMPONENT_STOP_TIMEOUT) -> None:
        """Stop components in reverse order, then gossip. Idempotent; never raises."""
        if self._stopped:
            return
        self._stopped = True
        self._shutdown.set()
        self.events.wake_all()
        for comp in reversed(self._started):
            try:
                await asyncio.wait_for(comp.stop(), timeout)
            except Exception as e:
                log.error("agent.component_stop_failed", component=comp.name, error=repr(e))
        self._started.clear()
        if self._runtime is not None:
            try:
                await asyncio.wait_for(self._runtime.shutdown(), timeout)
            except Exception as e:
                log.error("agent.gossip_stop_failed", error=repr(e))
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        log.info("agent.stopped", node=self.config.node)

    async def run(self) -> int:
        """Start, serve until a signal or /v1/agent/leave, shut down. Returns the exit code.

        Raises AgentError if the agent cannot start.
        """
        loop = asyncio.get_running_loop()
        handled: list[signal.Signals] = []
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, sig)
                handled.append(sig)
        try:
            self._phase = asyncio.create_task(self.start(), name="agent-start")
            try:
                await self._phase
            except asyncio.CancelledError:
                if self._signals == 0:
                    raise
                # A signal interrupted the start: nothing to leave yet.
                await self.stop(timeout=1.0 if self._forced else COMPONENT_STOP_TIMEOUT)
                return 1 if self._forced else 0
            except BaseException:
                await self.stop(timeout=2.0)
                raise
            await self._shutdown.wait()
            self._phase = asyncio.create_task(self._close(), name="agent-close")
            try:
                await self._phase
            except asyncio.CancelledError:
                if not self._forced:
                    raise
                await self.stop(timeout=1.0)
                return 1
            return 0
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)

    async def _close(self) -> None:
        if self._leave_on_shutdown:
            try:
                await self.leave()
            except Exception as e:
                log.error("agent.leave_failed", error=str(e) or type(e).__name__)
        await self.stop()

    def _on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if sig == signal.SIGHUP:
            log.info("agent.reload_requested", signal=name)
            for comp in self._started:
                reload = getattr(comp, "reload", None)
                if reload is not None:
                    task = asyncio.ensure_future(reload())
                    self._reloads.add(task)
                    task.add_done_callback(self._reloads.discard)
            return
        self._signals += 1
        if self._signals == 1:
            log.info("agent.signal_received", signal=name, action="graceful leave and exit")
            if self._phase is not None and not self._phase.done() and not self._shutdown.is_set():
                self._phase.cancel()  # still starting up
            self.request_shutdown(leave=True)
        else:
            log.warning("agent.forced_exit", signal=name)
            self._forced = True
            if self._phase is not None and not self._phase.done():
                self._phase.cancel()

    # -- data dir -----------------------------------------------------------------------------

    def _prepare_data_dir(self) -> str | None:
        """Node ID and keyring, persisted in the data dir when there is one (not in --dev)."""
        c = self.config
        if c.data_dir is None:
            self.node_id = str(uuid.uuid4())
            self.keyring = Keyring([parse_key(c.encrypt)]) if c.encrypt else None
            return None
        data = Path(c.data_dir)
        try:
            data.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise AgentError(f"cannot create data dir {data}: {e.strerror or e}") from None
        if not data.is_dir():
            raise AgentError(f"data dir {data} is not a directory")
        self.node_id = self._load_node_id(data / "node-id")
        return self._load_keyring(data / "serf" / "local.keyring")

    @staticmethod
    def _load_node_id(path: Path) -> str:
        if path.exists():
            try:
                text = path.read_text().strip()
            except OSError as e:
                raise AgentError(f"cannot read node ID file {path}: {e.strerror or e}") from None
            try:
                return str(uuid.UUID(text))
            except ValueError:
                raise AgentError(f"node ID file {path} does not hold a UUID: {text!r}") from None
        node_id = str(uuid.uuid4())
        try:
            path.write_text(node_id)
        except OSError as e:
            raise AgentError(f"cannot write node ID file {path}: {e.strerror or e}") from None
        return node_id

    def _load_keyring(self, path: Path) -> str:
        """An existing keyring file wins over --encrypt (Consul's rule); --encrypt seeds it."""
        c = self.config
        if path.exists():
            try:
                self.keyring = Keyring.load(path)
            except KeyringError as e:
                raise AgentError(str(e)) from None
            if c.encrypt and parse_key(c.encrypt) != self.keyring.primary_key:
                log.warning(
                    "agent.keyring_overrides_encrypt",
                    path=str(path),
                    note="a keyring file exists; --encrypt is ignored (remove the file to reseed)",
                )
        elif c.encrypt:
            self.keyring = Keyring([parse_key(c.encrypt)])
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.keyring.save(path)
            except OSError as e:
                raise AgentError(f"cannot write keyring file {path}: {e.strerror or e}") from None
        return str(path)

    # -- events -------------------------------------------------------------------------------

    async def fire_event(
        self,
        name: str,
        payload: bytes,
        *,
        node_filter: str = "",
        service_filter: str = "",
        tag_filter: str = "",
    ) -> StoredEvent:
        """Consul's UserEvent: validate, give it an ID, broadcast. ValueError if invalid/too big."""
        if not name:
            raise ValueError("User event missing name")
        validate_event_filters(node_filter, service_filter, tag_filter)
        event = StoredEvent(
            id=str(uuid.uuid4()),
            name=name,
            payload=payload or None,
            node_filter=node_filter,
            service_filter=service_filter,
            tag_filter=tag_filter,
        )
        await self.runtime.user_event(USER_EVENT_PREFIX + name, event.encode(), coalesce=False)
        return event

    def _should_accept(self, ev: StoredEvent) -> bool:
        """Consul's shouldProcessUserEvent: the event's filters must match this node."""
        if ev.version > USER_EVENT_VERSION:
            log.warning("agent.event_version_unknown", event_name=ev.name, version=ev.version)
        try:
            if ev.node_filter and not re.search(ev.node_filter, self.config.node):
                return False
            if ev.service_filter:
                svc_re = re.compile(ev.service_filter)
                tag_re = re.compile(ev.tag_filter) if ev.tag_filter else None
                for svc, tags in self.local_services().items():
                    if svc_re.search(svc) and (
                        tag_re is None or any(tag_re.search(t) for t in tags)
                    ):
                        return True
                return False
        except re.error as e:
            log.warning("agent.event_filter_invalid", event_name=ev.name, error=str(e))
            return False
        return True

    def _ingest_user_event(self, ue: UserEvent) -> None:
        if ue.name.startswith(USER_EVENT_PREFIX):
            try:
                ev = StoredEvent.decode(ue.payload, ue.ltime)
            except ValueError as e:
                log.warning("agent.event_decode_failed", serf_event=ue.name, error=str(e))
                return
        elif ue.name.startswith("consul:"):
            return  # Consul-internal serf events (leader changes and such)
        else:
            # A plain serf event (e.g. `serf event`): list it too, with an ID every agent agrees on.
            digest = uuid.uuid5(uuid.NAMESPACE_OID, f"{ue.ltime}:{ue.name}:{ue.payload.hex()}")
            ev = StoredEvent(
                id=str(digest), name=ue.name, payload=ue.payload or None, ltime=ue.ltime
            )
        if not self._should_accept(ev):
            log.debug("agent.event_filtered", event_name=ev.name, id=ev.id)
            return
        if ev.name == REMOTE_EXEC_EVENT:
            log.info("agent.remote_exec_ignored", id=ev.id)
            return
        log.debug("agent.event_received", event_name=ev.name, id=ev.id, ltime=ev.ltime)
        self.events.add(ev)

    async def _pump_events(self, queue: asyncio.Queue[MemberEvent | UserEvent]) -> None:
        while True:
            item = await queue.get()
            try:
                if isinstance(item, UserEvent):
                    self._ingest_user_event(item)
                elif item.type is MemberEventType.UPDATE:
                    # gossip logs joins, leaves, failures and reaps itself; updates it does not.
                    m = item.member
                    log.info("gossip.member_updated", member=m.name, tags=m.tags)
            except Exception:
                log.exception("agent.event_handling_failed")

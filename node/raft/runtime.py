"""The asyncio driver of the sans-I/O Raft core: clock ticks, disk, network, state machine.

One task runs the Ready loop. Inputs that arrive while a Ready is being persisted (peer
messages, proposals, read requests) wait in a queue and are fed to the core together after
`advance`, so everything proposed during one fsync goes to disk in the next single fsync: that
is the write batching. Storage calls run in a one-thread executor, never on the event loop.

A write is acknowledged (its future resolved) only when the entry is applied, i.e. committed by
a majority that each fsynced it (the core only counts a follower after it answered, and a node
answers only after persisting).

Every message carries the cluster ID chosen at bootstrap. A node drops messages of another
cluster, and a pristine node adopts the ID of the first leader that replicates to it, so two
clusters that were bootstrapped apart (or a stale node of an old cluster) never mix logs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import os
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from gossip.keyring import Keyring
from node.raft.core import (
    ConfigChangeError,
    NotLeader,
    ProposalDropped,
    RaftConfig,
    RaftNode,
    Ready,
    Role,
)
from node.raft.messages import Message, MessageError, MessageType
from node.raft.recovery import recover
from node.raft.storage import RaftStorage
from node.raft.transport import NotSent, RaftTransport, RPCError, TransportError
from node.raft.types import Configuration, EntryType, SnapshotMeta

__all__ = [
    "FSM",
    "NoLeader",
    "RaftRuntime",
    "WriteTimeout",
]

log = structlog.get_logger("raft.runtime")

#: snapshot and compact once this many entries were applied since the last snapshot and
#: SNAPSHOT_INTERVAL passed (Consul's snapshot_threshold and snapshot_interval); at
#: SNAPSHOT_HARD_LIMIT_FACTOR times the threshold whatever the time, so memory stays bounded
SNAPSHOT_THRESHOLD = 16384
SNAPSHOT_INTERVAL = 30.0
SNAPSHOT_HARD_LIMIT_FACTOR = 8
CLUSTER_ID_FILE = "cluster_id"
#: only a leader's traffic may make a pristine node adopt a cluster ID
_LEADER_TYPES = frozenset({MessageType.APP, MessageType.HEARTBEAT, MessageType.SNAP})


class FSM(Protocol):
    """The replicated state machine (node/state's StateStore behind an adapter)."""

    def apply(self, index: int, data: bytes) -> Any: ...
    def apply_noop(self, index: int) -> None: ...
    def result_to_wire(self, result: Any) -> Any: ...
    def result_from_wire(self, wire: Any) -> Any: ...
    def snapshot(self) -> bytes: ...
    def restore(self, data: bytes) -> None: ...


class NoLeader(Exception):
    """No leader is known right now (an election is running or quorum is lost)."""


class WriteTimeout(Exception):
    """The write was not applied in time; it may still be applied later (indeterminate)."""


@dataclass(slots=True)
class _Proposal:
    term: int
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Read:
    future: asyncio.Future[int]
    index: int | None = None


class RaftRuntime:
    def __init__(
        self,
        *,
        node_id: str,
        data_dir: Path,
        host: str,
        port: int,
        fsm: FSM,
        keyring: Keyring | None = None,
        config: RaftConfig | None = None,
        tick_interval: float = 0.1,
        rng: random.Random | None = None,
        on_leader_change: Callable[[str | None], None] | None = None,
        snapshot_threshold: int = SNAPSHOT_THRESHOLD,
        snapshot_interval: float = SNAPSHOT_INTERVAL,
    ) -> None:
        self.node_id = node_id
        self.data_dir = data_dir
        self.fsm = fsm
        self.config = config or RaftConfig()
        self.tick_interval = tick_interval
        self.rng = rng or random.Random()
        self.on_leader_change = on_leader_change
        self.snapshot_threshold = snapshot_threshold
        self.snapshot_interval = snapshot_interval
        self._last_snapshot_at = 0.0
        self.transport = RaftTransport(
            host,
            port,
            keyring=keyring,
            on_message=self._on_wire,
            on_request=self._on_request,
            on_peer_down=self._on_peer_down,
        )
        self.rpc_handlers: dict[str, Callable[[Any], Any]] = {"apply": self._rpc_apply}
        self.storage: RaftStorage | None = None
        self.node: RaftNode | None = None
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="raft-io")
        self._inbox: deque[Callable[[RaftNode], None]] = deque()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._proposals: dict[int, _Proposal] = {}
        self._reads: dict[bytes, _Read] = {}
        self._read_ids = itertools.count(1)
        self._applied = 0
        self._snapshot_index = 0
        self._leader: str | None = None
        self._leader_known = asyncio.Event()
        # servers our configuration does not name yet (a leader replicating to a new learner
        # before its log holds the configuration that names it): id -> address
        self._addresses: dict[str, str] = {}
        self.cluster_id = ""
        #: loop time of the last message from the leader (X-Consul-LastContact on followers)
        self.last_leader_contact = 0.0
        self.dropped_foreign = 0
        self.stopped = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        storage = await loop.run_in_executor(self._io, RaftStorage.open, self.data_dir)
        self.storage = storage
        recovered = await loop.run_in_executor(self._io, recover, self.data_dir, storage, self.fsm)
        if recovered is not None:
            log.warning("raft.recovered_from_peers_json", voters=sorted(recovered.voters),
                        learners=sorted(recovered.learners))  # fmt: skip
        with contextlib.suppress(FileNotFoundError):
            self.cluster_id = (self.data_dir / CLUSTER_ID_FILE).read_text().strip()
        snap = await loop.run_in_executor(self._io, storage.load_snapshot)
        if snap is not None:
            self.fsm.restore(snap[1])
        meta = snap[0] if snap is not None else SnapshotMeta()
        self._applied = self._snapshot_index = meta.index
        self.node = RaftNode(
            self.node_id,
            self.config,
            hard_state=storage.hard_state,
            snapshot=meta,
            entries=list(storage.entries),
            rng=self.rng,
            applied=meta.index,
            snapshot_data=snap[1] if snap is not None else None,
        )
        await self.transport.start()
        self._campaign_if_alone()
        self._tasks = [
            asyncio.create_task(self._ready_loop(), name="raft-ready"),
            asyncio.create_task(self._ticker(), name="raft-tick"),
        ]
        log.info(
            "raft.started",
            id=self.node_id,
            term=storage.hard_state.term,
            last_index=self.node.last_index,
            snapshot_index=meta.index,
        )

    async def stop(self) -> None:
        self.stopped = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await self.transport.stop()
        for p in self._proposals.values():
            if not p.future.done():  # it is in the log: it may still commit without us
                p.future.set_exception(WriteTimeout("raft is shutting down; it may still apply"))
        for r in self._reads.values():
            if not r.future.done():
                r.future.set_exception(NoLeader("raft is shutting down"))
        if self.storage is not None:
            await asyncio.get_running_loop().run_in_executor(self._io, self.storage.close)
        self._io.shutdown(wait=True)

    @property
    def port(self) -> int:
        return self.transport.port

    # -- views --------------------------------------------------------------------------------

    def _core(self) -> RaftNode:
        if self.node is None:
            raise NoLeader("raft has not started")
        return self.node

    @property
    def is_leader(self) -> bool:
        return self.node is not None and self.node.role == Role.LEADER

    @property
    def leader_id(self) -> str | None:
        return self._leader

    @property
    def configuration(self) -> Configuration:
        return self._core().configuration

    def leader_address(self) -> str | None:
        lid = self._leader
        if lid is None:
            return None
        server = self.configuration.servers.get(lid)
        return server.address if server else None

    @property
    def applied(self) -> int:
        return self._applied

    async def wait_for_leader(self, timeout: float) -> str:
        async with asyncio.timeout(timeout):
            while self._leader is None:
                self._leader_known.clear()
                await self._leader_known.wait()
        assert self._leader is not None
        return self._leader

    # -- inputs -------------------------------------------------------------------------------

    def _submit(self, fn: Callable[[RaftNode], None]) -> None:
        self._inbox.append(fn)
        self._wake.set()

    def _on_wire(self, wire: Any) -> None:
        try:
            if not isinstance(wire, list) or len(wire) != 2 or not isinstance(wire[0], str):
                raise MessageError("expected [cluster id, message]")
            msg = Message.from_wire(wire[1])
        except MessageError as e:
            log.warning("raft.bad_message", error=str(e))
            return
        if msg.dst != self.node_id:
            return
        cid = wire[0]
        if cid != self.cluster_id:
            if self.cluster_id or msg.type not in _LEADER_TYPES or not cid:
                self.dropped_foreign += 1
                return
            self.set_cluster_id(cid)
            log.info("raft.cluster_adopted", cluster_id=cid, leader=msg.src)
        if msg.type in _LEADER_TYPES:
            self.last_leader_contact = asyncio.get_running_loop().time()
        self._submit(lambda n: n.step(msg))

    def _on_peer_down(self, address: str) -> None:
        """A refused connection to the leader means its process is gone: elect a new one now
        rather than after an election timeout (see RaftNode.leader_unreachable)."""
        if self._leader is not None and not self.is_leader and address == self.leader_address():
            log.info("raft.leader_unreachable", leader=self._leader, address=address)
            self._submit(lambda n: n.leader_unreachable())

    def set_cluster_id(self, cluster_id: str) -> None:
        """Persist the cluster this node belongs to (at bootstrap, or from the first leader)."""
        path = self.data_dir / CLUSTER_ID_FILE
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(cluster_id)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self.cluster_id = cluster_id

    async def _on_request(self, method: str, args: Any) -> Any:
        handler = self.rpc_handlers.get(method)
        if handler is None:
            raise RPCError(f"unknown method {method!r}")
        result = handler(args)
        if asyncio.iscoroutine(result):
            result = await result
        return result

    async def _rpc_apply(self, args: Any) -> Any:
        if not isinstance(args, list) or len(args) != 2 or not isinstance(args[0], bytes):
            raise RPCError("apply takes [command bytes, timeout]")
        result = await self.apply(args[0], float(args[1]), forward=False)
        return self.fsm.result_to_wire(result)

    def bootstrap(self, config: Configuration) -> None:
        self._submit(lambda n: n.bootstrap(config))
        self._campaign_if_alone()

    def _campaign_if_alone(self) -> None:
        """A one-voter cluster elects itself at once (a --dev agent is ready within a second)."""

        def campaign(n: RaftNode) -> None:
            if n.configuration.voters == {self.node_id}:
                n.campaign()

        self._submit(campaign)

    async def apply(self, command: bytes, timeout: float = 10.0, *, forward: bool = True) -> Any:
        """Replicate `command` and return the state machine's result once it is applied here.

        On a follower the write is forwarded to the leader. Raises NoLeader when none is known
        within `timeout`, WriteTimeout when the outcome is unknown.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            core = self._core()
            if core.role == Role.LEADER:
                fut: asyncio.Future[Any] = loop.create_future()

                def propose(n: RaftNode, fut: asyncio.Future[Any] = fut) -> None:
                    try:
                        index = n.propose(command)
                    except (NotLeader, ProposalDropped) as e:
                        if not fut.done():
                            fut.set_exception(NoLeader(f"not the leader any more: {e}"))
                        return
                    self._proposals[index] = _Proposal(n.term, fut)

                self._submit(propose)
                try:
                    return await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
                except TimeoutError:
                    raise WriteTimeout("the write was not applied in time") from None
            if not forward:
                raise NoLeader("this server is not the leader")
            addr = await self._leader_addr(deadline)
            left = max(0.05, deadline - loop.time())
            try:
                wire = await self.transport.call(addr, "apply", [command, left], left + 0.5)
                return self.fsm.result_from_wire(wire)
            except NotSent as e:
                # the leader is unreachable (most likely dead) and the write never left: wait
                # for the election to name another, or for the connection to come back
                if loop.time() >= deadline:
                    raise NoLeader(f"cannot reach the leader: {e}") from None
                await asyncio.sleep(0.05)
            except TransportError as e:
                raise WriteTimeout(f"forwarding to the leader failed: {e}") from None
            except RPCError as e:
                if "not the leader" in str(e) and loop.time() < deadline:
                    await asyncio.sleep(0.05)  # leadership moved while we forwarded: retry
                    continue
                raise

    async def _leader_addr(self, deadline: float) -> str:
        loop = asyncio.get_running_loop()
        while True:
            addr = self.leader_address()
            if addr is not None and self._leader != self.node_id:
                return addr
            if self.is_leader:
                raise NoLeader("became the leader while forwarding")
            if loop.time() >= deadline:
                raise NoLeader("no cluster leader")
            with contextlib.suppress(TimeoutError):
                await self.wait_for_leader(max(0.01, min(0.5, deadline - loop.time())))
            if self._leader is None:
                await asyncio.sleep(0.02)

    async def read_barrier(self, timeout: float = 10.0) -> int:
        """Linearizable read point (ReadIndex): returns once this node has applied everything
        committed before the call. Works on followers (the core asks the leader)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            ctx = f"{self.node_id}/{next(self._read_ids)}".encode()
            read = _Read(loop.create_future())
            self._reads[ctx] = read

            def request(n: RaftNode, ctx: bytes = ctx, read: _Read = read) -> None:
                try:
                    n.read_index(ctx)
                except NotLeader as e:
                    self._reads.pop(ctx, None)
                    if not read.future.done():
                        read.future.set_exception(NoLeader(str(e) or "no cluster leader"))

            self._submit(request)
            try:
                # a read the leader drops (it lost leadership) is retried with a fresh context
                return await asyncio.wait_for(
                    asyncio.shield(read.future), min(1.0, max(0.01, deadline - loop.time()))
                )
            except TimeoutError:
                self._reads.pop(ctx, None)
                if loop.time() >= deadline:
                    raise NoLeader("no leader confirmed the read in time") from None
            except NoLeader:
                if loop.time() >= deadline:
                    raise
                with contextlib.suppress(TimeoutError):
                    await self.wait_for_leader(max(0.01, min(0.5, deadline - loop.time())))

    async def change_config(self, new: Configuration, timeout: float = 10.0) -> None:
        """Leader only: one single-server change, returned once it is committed and applied."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def change(n: RaftNode) -> None:
            try:
                index = n.change_config(new)
            except (NotLeader, ConfigChangeError, ProposalDropped) as e:
                if not fut.done():
                    fut.set_exception(e)
                return
            self._proposals[index] = _Proposal(n.term, fut)

        self._submit(change)
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise WriteTimeout("the configuration change was not applied in time") from None

    def transfer_leadership(self, target: str) -> None:
        self._submit(lambda n: n.transfer_leadership(target))

    # -- the loops ----------------------------------------------------------------------------

    async def _ticker(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.tick_interval
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            self._submit(lambda n: n.tick())

    async def _ready_loop(self) -> None:
        loop = asyncio.get_running_loop()
        node = self._core()
        storage = self.storage
        assert storage is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._inbox:
                fn = self._inbox.popleft()
                try:
                    fn(node)
                except Exception:  # a bug in one input must not stop consensus on this node
                    log.exception("raft.input_failed")
            while node.has_ready():
                rd = node.ready()
                if rd.snapshot is not None or rd.entries or rd.hard_state is not None:
                    await loop.run_in_executor(
                        self._io, storage.save, rd.hard_state, list(rd.entries), rd.snapshot
                    )
                for m in rd.messages:
                    self._send(m)
                self._apply(rd)
                node.advance(rd)
                if rd.soft_state is not None:
                    self._leadership(rd, node)
                await self._maybe_compact(node, storage)
                if self._inbox:
                    self._wake.set()
                    break

    def _send(self, m: Message) -> None:
        server = self._core().configuration.servers.get(m.dst)
        address = server.address if server is not None else self._addresses.get(m.dst)
        if address is None:
            return
        self.transport.send(address, [self.cluster_id, m.to_wire()])

    def _apply(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            meta, data = rd.snapshot
            self.fsm.restore(data)
            self._applied = self._snapshot_index = meta.index
        for e in rd.committed:
            if e.index <= self._applied:
                continue
            result: Any = None
            error: Exception | None = None
            if e.type == EntryType.NORMAL:
                try:
                    result = self.fsm.apply(e.index, e.data)
                except Exception as exc:  # the FSM reports bad commands as results; this is a bug
                    log.exception("raft.apply_failed", index=e.index)
                    error = exc
            else:
                self.fsm.apply_noop(e.index)
            self._applied = e.index
            p = self._proposals.pop(e.index, None)
            if p is not None and not p.future.done():
                if p.term != e.term:
                    p.future.set_exception(NoLeader("leadership changed; the write was dropped"))
                elif error is not None:
                    p.future.set_exception(error)
                else:
                    p.future.set_result(result)
        for rs in rd.read_states:
            read = self._reads.get(rs.ctx)
            if read is not None:
                read.index = rs.index
        self._serve_reads()

    def _serve_reads(self) -> None:
        for ctx, read in list(self._reads.items()):
            if read.index is not None and read.index <= self._applied:
                del self._reads[ctx]
                if not read.future.done():
                    read.future.set_result(read.index)

    def _leadership(self, rd: Ready, node: RaftNode) -> None:
        ss = rd.soft_state
        assert ss is not None
        leader = ss.leader_id or None
        if leader != self._leader:
            self._leader = leader
            log.info("raft.leader", leader=leader, term=node.term, me=self.node_id)
            if leader is not None:
                self._leader_known.set()
            if self.on_leader_change is not None:
                self.on_leader_change(leader)
        # proposals made while we led stay pending: the entry may still commit under the next
        # leader, and a different entry at its index fails it in _apply

    async def _maybe_compact(self, node: RaftNode, storage: RaftStorage) -> None:
        behind = self._applied - self._snapshot_index
        if behind < self.snapshot_threshold:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if (
            behind < SNAPSHOT_HARD_LIMIT_FACTOR * self.snapshot_threshold
            and now - self._last_snapshot_at < self.snapshot_interval
        ):
            return
        self._last_snapshot_at = now
        index = self._applied
        meta = node.snapshot_meta(index)
        # serialized on the I/O thread (nothing is applied meanwhile: this loop is waiting), so
        # the event loop keeps serving reads while a large state is written out
        data = await loop.run_in_executor(self._io, self.fsm.snapshot)
        await loop.run_in_executor(self._io, storage.compact, meta, data)
        node.compact(meta, data)
        self._snapshot_index = index
        log.info("raft.snapshot_taken", index=index, bytes=len(data))

    # -- helpers for the layer above ------------------------------------------------------------

    def remember_address(self, server_id: str, address: str) -> None:
        """Where to reach a server the configuration does not name (yet)."""
        self._addresses[server_id] = address

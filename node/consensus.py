"""The agent's consensus component: Raft on --server-port, the replicated state, and the
decisions a separate server tier would otherwise make (bootstrap, who votes, leader duties).

Every agent runs one. A node joins the Raft configuration as a learner when the leader's
autopilot adds it (node/raft/autopilot.py), bootstraps the cluster with its peers under
`--bootstrap-expect` (node/raft/bootstrap.py), or alone under `--dev`.

Reads come in Consul's three consistency modes:
* `stale`: this agent's replica, whatever it has applied;
* default: the leader's state. The leader reads locally without a quorum round, as Consul's
  does; a follower first catches up to the leader's commit index (a ReadIndex round);
* `consistent`: linearizable: a ReadIndex barrier confirmed by a quorum, then a local read.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gossip.member import Member, MemberStatus
from node.agent import AgentError
from node.leader import LeaderDuties, MemberInfo, catalog_commands
from node.raft.autopilot import AutopilotConfig, Health, MemberView, next_change
from node.raft.bootstrap import Candidate, PromiseStore, bootstrap_set, coordinator
from node.raft.core import ConfigChangeError, NotLeader, ProposalDropped, RaftConfig
from node.raft.recovery import RecoveryError
from node.raft.runtime import NoLeader, RaftRuntime, WriteTimeout
from node.raft.storage import RaftStorageError
from node.raft.transport import RPCError, TransportError
from node.raft.types import Configuration, Server
from node.state import ApplyResult, StateStore
from node.state import commands as cmd

if TYPE_CHECKING:
    from node.agent import Agent

__all__ = ["CONSISTENCY_MODES", "Consensus", "NoLeader", "WriteTimeout"]

log = structlog.get_logger("node.consensus")

CONSISTENCY_MODES = ("default", "stale", "consistent")
MANAGE_INTERVAL = 0.5
RPC_TIMEOUT = 5.0


@dataclass(slots=True)
class _Seen:
    health: Health
    since: float


class Consensus:
    name = "consensus"

    def __init__(self, agent: Agent, *, raft_config: RaftConfig | None = None) -> None:
        self.agent = agent
        self.raft_config = raft_config or RaftConfig()
        self.autopilot = AutopilotConfig(stabilization=agent.config.server_stabilization_time)
        self.store = StateStore()
        self.raft: RaftRuntime | None = None
        self.duties = LeaderDuties()
        self._tmp: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._seen: dict[str, _Seen] = {}
        self._promises: PromiseStore | None = None
        self._advertised = ""
        self._was_leader = False
        agent.consensus = self

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        c = self.agent.config
        if c.data_dir is None:  # --dev: a throwaway directory
            self._tmp = tempfile.mkdtemp(prefix="meshnode-dev-raft-")
            raft_dir = Path(self._tmp)
        else:
            raft_dir = Path(c.data_dir) / "raft"
        raft_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._promises = PromiseStore(raft_dir / "bootstrap-promise")
        raft = self.raft = RaftRuntime(
            node_id=self.agent.node_id,
            data_dir=raft_dir,
            host=c.bind,
            port=c.server_port,
            fsm=self.store,
            keyring=self.agent.keyring,
            config=self.raft_config,
        )
        raft.rpc_handlers.update(
            {
                "bootstrap_promise": self._rpc_promise,
                "bootstrap_commit": self._rpc_commit,
                "remove_peer": self._rpc_remove_peer,
                "transfer_leader": self._rpc_transfer_leader,
                "session_renew": self._rpc_session_renew,
            }
        )
        try:
            await raft.start()
        except OSError as e:
            raise OSError(e.errno, f"server port {c.bind}:{c.server_port}: {e.strerror}") from None
        except (RecoveryError, RaftStorageError) as e:
            raise AgentError(f"cannot start Raft from {raft_dir}: {e}") from None
        self._advertised = f"{self.agent.runtime.local_member().ip}:{raft.port}"
        assert raft.node is not None
        if c.dev and raft.node.last_index == 0:
            await self._maybe_bootstrap({})  # a one-node cluster, ready before the HTTP API
            with contextlib.suppress(TimeoutError):
                await raft.wait_for_leader(5.0)
        self._task = asyncio.create_task(self._manage(), name="consensus-manage")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.raft is not None:
            with contextlib.suppress(Exception):
                await self._hand_over()
            await self.raft.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    async def leave(self, timeout: float = 5.0) -> None:
        """Before a graceful leave, a voter takes itself out of the configuration (as Consul's
        servers do), so several voters leaving together never strand the rest without a quorum.
        Best effort: gossip reports the leave anyway, and the leader then removes what is left."""
        raft = self.raft
        if raft is None or raft.node_id not in raft.configuration.voters:
            return
        if len(raft.configuration.voters) == 1:
            return  # the last voter: nobody could take over
        log.info("consensus.leaving_configuration")
        try:
            async with asyncio.timeout(timeout):
                # autopilot may add us back as a learner until gossip reports the leave: fine,
                # a learner's absence costs no quorum
                while raft.node_id in raft.configuration.voters:
                    if raft.is_leader:
                        await self._hand_over()  # a leader does not remove itself
                    else:
                        try:
                            await self.remove_peer(raft.node_id, allow_self=True)
                        except (NoLeader, RPCError, WriteTimeout) as e:
                            # leadership moving (others may be leaving too): ask again
                            log.info("consensus.leave_retry", error=str(e))
                        except KeyError:
                            return
                    await asyncio.sleep(0.05)
        except Exception as e:  # a leave must go on even without a leader
            log.warning("consensus.leave_configuration_failed", error=str(e) or repr(e))

    async def _hand_over(self) -> None:
        """A leader that stops passes leadership on first, so writes pause for a round trip
        rather than an election timeout."""
        raft = self._raft()
        if not raft.is_leader:
            return
        voters = sorted(v for v in raft.configuration.voters if v != raft.node_id)
        if not voters:
            return
        raft.transfer_leadership(voters[0])
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                while raft.is_leader:
                    await asyncio.sleep(0.02)

    def _raft(self) -> RaftRuntime:
        if self.raft is None:
            raise NoLeader("consensus has not started")
        return self.raft

    # -- the management loop ---------------------------------------------------------------------

    async def _manage(self) -> None:
        while True:
            try:
                await self._manage_once()
            except asyncio.CancelledError:
                raise
            except (NoLeader, WriteTimeout) as e:
                log.info("consensus.manage_deferred", reason=str(e))
            except Exception:
                log.exception("consensus.manage_failed")
            await asyncio.sleep(MANAGE_INTERVAL)

    async def _manage_once(self) -> None:
        raft = self._raft()
        node = raft.node
        assert node is not None
        now = time.monotonic()
        views = self._member_views(now)
        for m in views.values():
            raft.remember_address(m.id, m.address)
        if not node.configuration.servers and node.last_index == 0:
            await self._maybe_bootstrap(views)
            return
        if not raft.is_leader:
            self._was_leader = False
            return
        if not self._was_leader:
            self._was_leader = True
            self.duties.on_leadership(self.store, now)
        change = next_change(
            node.configuration,
            views,
            leader_id=raft.node_id,
            match=node.match_indexes(),
            last_index=node.last_index,
            now=now,
            cfg=self.autopilot,
        )
        if change is not None:
            try:
                await raft.change_config(change, timeout=5.0)
                log.info("consensus.configuration_changed", voters=sorted(change.voters),
                         learners=sorted(change.learners))  # fmt: skip
            except Exception as e:
                log.warning("consensus.configuration_change_failed", error=str(e))
        await self._leader_writes(views, now)

    async def _leader_writes(self, views: dict[str, MemberView], now: float) -> None:
        raft = self._raft()
        voters = raft.configuration.voters
        members = [
            MemberInfo(v.node, v.id, v.address.rsplit(":", 1)[0], v.health,
                       int(v.address.rsplit(":", 1)[1]), v.id in voters)
            for v in views.values()
        ]  # fmt: skip
        wall = time.time()
        writes = catalog_commands(
            self.store,
            members,
            datacenter=self.agent.config.datacenter,
            now=wall,
            reapable=self.duties.reapable(self.store, members, now),
        )
        writes += [
            cmd.session_destroy(sid, now=wall)
            for sid in self.duties.expired_sessions(self.store, now)
        ]
        reap = self.duties.tombstones_to_reap(self.store, now)
        if reap is not None:
            writes.append(cmd.tombstone_reap(reap))
        for w in writes:
            result = await raft.apply(w, RPC_TIMEOUT, forward=False)
            if isinstance(result, ApplyResult) and not result.ok:
                log.warning("consensus.leader_write_rejected", error=result.error)

    def _member_views(self, now: float) -> dict[str, MemberView]:
        views: dict[str, MemberView] = {}
        for m in self.agent.runtime.members():
            sid = m.tags.get("id", "")
            port = m.tags.get("port", "")
            if not sid or not port.isdigit():
                continue  # a plain serf agent, or a meshnode without a server port
            health = _health(m)
            seen = self._seen.get(sid)
            if seen is None or seen.health != health:
                seen = self._seen[sid] = _Seen(health, now)
            views[sid] = MemberView(sid, m.name, f"{m.ip}:{port}", health, seen.since)
        return views

    # -- bootstrap ---------------------------------------------------------------------------------

    async def _maybe_bootstrap(self, members: dict[str, MemberView]) -> None:
        raft = self._raft()
        c = self.agent.config
        if c.dev or c.bootstrap_expect == 1:
            me = Server(raft.node_id, c.node, self._advertised, True)
            self._commit_bootstrap(Configuration({raft.node_id: me}), str(uuid.uuid4()))
            return
        expect = c.bootstrap_expect
        if expect <= 1:
            return
        candidates = [
            Candidate(m.id, m.node, m.address, self._expect_tag(m.id))
            for m in members.values()
            if m.health == Health.ALIVE
        ]
        config = bootstrap_set(candidates, expect)
        if config is None or coordinator(config) != raft.node_id:
            return
        await self._coordinate(config)

    def _expect_tag(self, member_id: str) -> int:
        for m in self.agent.runtime.members():
            if m.tags.get("id") == member_id:
                raw = m.tags.get("expect", "0")
                return int(raw) if raw.isdigit() else 0
        return 0

    async def _coordinate(self, config: Configuration) -> None:
        raft = self._raft()
        wire = [config.to_wire(), str(uuid.uuid4())]

        async def ask(server: Server, method: str) -> bool:
            if server.id == raft.node_id:
                local = self._rpc_promise if method == "bootstrap_promise" else self._rpc_commit
                try:
                    return await local(wire)
                except RPCError as e:
                    log.info("consensus.bootstrap_refused", peer=server.node, error=str(e))
                    return False
            try:
                return bool(await raft.transport.call(server.address, method, wire, RPC_TIMEOUT))
            except (TransportError, RPCError) as e:
                log.info("consensus.bootstrap_refused", peer=server.node, step=method, error=str(e))
                return False

        servers = list(config.servers.values())
        if not all(await asyncio.gather(*(ask(s, "bootstrap_promise") for s in servers))):
            return
        log.info("consensus.bootstrapping", servers=sorted(s.node for s in servers))
        await asyncio.gather(*(ask(s, "bootstrap_commit") for s in servers))

    def _parse_bootstrap(self, args: Any) -> tuple[Configuration, str]:
        if not isinstance(args, list) or len(args) != 2 or not isinstance(args[1], str):
            raise RPCError("bootstrap takes [configuration, cluster id]")
        try:
            return Configuration.from_wire(args[0]), args[1]
        except (TypeError, ValueError, IndexError, KeyError) as e:
            raise RPCError(f"bad configuration: {e}") from None

    def _pristine(self) -> None:
        node = self._raft().node
        assert node is not None
        if node.last_index != 0 or node.configuration.servers:
            raise RPCError("already part of a Raft cluster")

    async def _rpc_promise(self, args: Any) -> bool:
        config, _ = self._parse_bootstrap(args)
        self._pristine()
        assert self._promises is not None
        if self._raft().node_id not in config.servers:
            raise RPCError("not a member of the proposed configuration")
        if not self._promises.promise(config, time.time()):
            raise RPCError("promised another bootstrap configuration")
        return True

    async def _rpc_commit(self, args: Any) -> bool:
        config, cluster_id = self._parse_bootstrap(args)
        self._pristine()
        assert self._promises is not None
        if not self._promises.holds(config, time.time()):
            raise RPCError("no current promise for this configuration")
        self._commit_bootstrap(config, cluster_id)
        return True

    def _commit_bootstrap(self, config: Configuration, cluster_id: str) -> None:
        raft = self._raft()
        raft.set_cluster_id(cluster_id)
        raft.bootstrap(config)
        log.info("consensus.bootstrapped", voters=sorted(config.voters), cluster=cluster_id)

    # -- what the HTTP API uses --------------------------------------------------------------------

    async def write(self, command: bytes, timeout: float = 10.0) -> ApplyResult:
        """Replicate a command (through the leader); NoLeader or WriteTimeout when it cannot."""
        result = await self._raft().apply(command, timeout)
        if not isinstance(result, ApplyResult):
            raise RuntimeError(f"unexpected apply result {result!r}")
        return result

    async def read_barrier(self, mode: str, timeout: float = 10.0) -> None:
        """Wait until a read of the local store is valid in `mode` (see the module docstring)."""
        raft = self._raft()
        if mode == "stale" or (mode == "default" and raft.is_leader):
            return
        await raft.read_barrier(timeout)

    def known_leader(self) -> bool:
        return self.raft is not None and self.raft.leader_id is not None

    def last_contact_ms(self) -> int:
        """Consul's X-Consul-LastContact: 0 on the leader, else ms since the leader was heard."""
        raft = self.raft
        if raft is None or raft.is_leader:
            return 0
        if not raft.last_leader_contact:
            return 0
        return int((asyncio.get_running_loop().time() - raft.last_leader_contact) * 1000)

    def leader_address(self) -> str:
        return self._raft().leader_address() or ""

    def configuration(self) -> Configuration:
        return self._raft().configuration

    def configuration_index(self) -> int:
        node = self._raft().node
        return node.configuration_index if node is not None else 0

    def last_index(self) -> int:
        node = self._raft().node
        return node.last_index if node is not None else 0

    def is_leader(self) -> bool:
        return self.raft is not None and self.raft.is_leader

    def is_voter(self) -> bool:
        return self.raft is not None and self.raft.node_id in self.configuration().voters

    def stats(self) -> dict[str, dict[str, str]]:
        """The "consul" and "raft" sections of /v1/agent/self Stats, in Consul's names."""
        raft = self._raft()
        node = raft.node
        assert node is not None
        config = node.configuration
        role = "Leader" if raft.is_leader else "Follower" if self.is_voter() else "Learner"
        return {
            "consul": {
                "acl": "disabled",
                "server": str(self.is_voter()).lower(),
                "leader": str(raft.is_leader).lower(),
                "leader_addr": self.leader_address(),
                "known_servers": str(len(config.voters)),
                "bootstrap": str(self.agent.config.bootstrap_expect == 1).lower(),
            },
            "raft": {
                "state": role,
                "term": str(node.term),
                "last_log_index": str(node.last_index),
                "commit_index": str(node.commit_index),
                "applied_index": str(raft.applied),
                "fsm_pending": str(node.commit_index - raft.applied),
                "last_snapshot_index": str(node.snapshot.index),
                "num_peers": str(max(0, len(config.voters) - 1)),
                "learners": str(len(config.learners)),
                "last_contact": f"{self.last_contact_ms()}ms",
            },
        }

    async def remove_peer(self, server_id: str, *, allow_self: bool = False) -> None:
        raft = self._raft()
        if server_id not in raft.configuration.servers:
            raise KeyError(server_id)
        if server_id == raft.leader_id and not (allow_self and server_id == raft.node_id):
            raise ValueError("cannot remove the leader; transfer leadership first")
        await self._leader_call("remove_peer", server_id)

    async def transfer_leader(self, target: str = "") -> str:
        return str(await self._leader_call("transfer_leader", target))

    async def renew_session(self, session_id: str) -> dict[str, Any] | None:
        """Reset the session's TTL on the leader; its JSON there, None when it does not exist."""
        session = await self._leader_call("session_renew", session_id)
        return dict(session) if isinstance(session, dict) else None

    async def _leader_call(self, method: str, args: Any) -> Any:
        """Run one of the leader-only RPCs here when leading, else on the leader."""
        raft = self._raft()
        if raft.is_leader:
            return await raft.rpc_handlers[method](args)
        addr = raft.leader_address()
        if addr is None:
            raise NoLeader("No cluster leader")
        try:
            return await raft.transport.call(addr, method, args, 10.0)
        except TransportError as e:
            raise NoLeader(f"cannot reach the leader: {e}") from None

    def _require_leader(self) -> RaftRuntime:
        raft = self._raft()
        if not raft.is_leader:
            raise RPCError("not the leader")
        return raft

    async def _rpc_remove_peer(self, args: Any) -> bool:
        """The leader computes the new configuration from its own (current) one, so removals
        asked by several agents at once never undo each other."""
        raft = self._require_leader()
        sid = str(args)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while sid in raft.configuration.servers:
            try:
                await raft.change_config(raft.configuration.without(sid), timeout=10.0)
            except ConfigChangeError as e:  # another change is still committing
                if loop.time() > deadline:
                    raise RPCError(f"cannot remove {sid}: {e}") from None
                await asyncio.sleep(0.1)
            except (NotLeader, ProposalDropped) as e:
                raise RPCError(f"not the leader any more: {e}") from None
        return True

    async def _rpc_transfer_leader(self, args: Any) -> str:
        raft = self._require_leader()
        voters = sorted(v for v in raft.configuration.voters if v != raft.node_id)
        if args:
            if args not in voters:
                raise RPCError(f"cannot transfer leadership to {args!r}: not another voter")
            voters = [str(args)]
        if not voters:
            raise RPCError("cannot transfer leadership: no other voter")
        raft.transfer_leadership(voters[0])
        try:
            async with asyncio.timeout(5.0):
                while raft.is_leader:
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise RPCError("leadership transfer timed out") from None
        return voters[0]

    async def _rpc_session_renew(self, args: Any) -> Any:
        self._require_leader()
        if not self.duties.renew(self.store, str(args), time.monotonic()):
            return None
        return self.store.sessions.get(str(args))


def _health(m: Member) -> Health:
    if m.status in (MemberStatus.ALIVE, MemberStatus.LEAVING):
        return Health.ALIVE
    if m.status == MemberStatus.LEFT:
        return Health.LEFT
    return Health.FAILED

"""Anti-entropy: keep the catalog's entry for this node equal to what this agent owns.

Runs at start, after every local change and once a minute (Consul's full-sync interval):
services and checks registered here but missing or different in the catalog are written, and
the catalog's services and checks of this node that the agent no longer has are removed (except
what the leader manages: `serfHealth` and the `consul` service). So a restarted agent, a write
lost to a leader change, or an entry removed behind the agent's back (`PUT
/v1/catalog/deregister`) converges without anyone re-registering. A sync that finds no leader
(or times out) is retried after a second.

A check whose only change is its output, and whose write is deferred (node/local.py,
check_update_interval), is compared without its output, as Consul's full sync does: the deferred
write, or a status change, carries the output.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from node.agent import AgentError
from node.definitions import DefinitionError, load_dir
from node.leader import CONSUL_SERVICE, SERF_CHECK_ID
from node.local import CHECK_UPDATE_INTERVAL, LocalState
from node.raft.runtime import NoLeader, WriteTimeout
from node.raft.transport import RPCError
from node.registration import RegistrationError
from node.state import commands as cmd

if TYPE_CHECKING:
    from node.agent import Agent

__all__ = ["AntiEntropy"]

log = structlog.get_logger("node.antientropy")

SYNC_INTERVAL = 60.0
RETRY_INTERVAL = 1.0


class AntiEntropy:
    name = "anti-entropy"

    def __init__(self, agent: Agent, *, scripts: bool = False,
                 sync_interval: float = SYNC_INTERVAL, retry_interval: float = RETRY_INTERVAL,
                 check_update_interval: float = CHECK_UPDATE_INTERVAL) -> None:  # fmt: skip
        self.agent = agent
        self.sync_interval = sync_interval
        self.retry_interval = retry_interval
        path = None
        if agent.config.data_dir is not None:
            path = Path(agent.config.data_dir) / "local-services.json"
        self._wake = asyncio.Event()
        self.local = LocalState(path, scripts=scripts, on_change=self._wake.set,
                                check_update_interval=check_update_interval)  # fmt: skip
        self._task: asyncio.Task[None] | None = None
        self._from_files: set[str] = set()
        self.syncs = 0
        agent.local = self.local

    async def start(self) -> None:
        self.local.load()
        try:
            self.load_definitions()
        except (DefinitionError, RegistrationError) as e:
            raise AgentError(f"--config-dir: {e}") from None
        self.local.start()
        self._task = asyncio.create_task(self._loop(), name="anti-entropy")

    def load_definitions(self) -> None:
        """(Re)load --config-dir: services defined there are registered (replaced), and those
        an earlier load defined but the files no longer do are removed. Raises
        DefinitionError/RegistrationError, leaving what is registered unchanged."""
        directory = self.agent.config.config_dir
        if directory is None:
            return
        defs = load_dir(Path(directory))
        scratch = LocalState(None, scripts=self.local.scripts, run_checks=False)  # validation
        for svc in defs.services:
            scratch.add_service(svc)
        for chk in defs.checks:
            scratch.add_check(chk)
        wanted = set(scratch.services)
        for sid in sorted(self._from_files - wanted):
            self.local.remove_service(sid)
        for svc in defs.services:
            self.local.add_service(svc, replace_checks=True)
        for chk in defs.checks:
            self.local.add_check(chk)
        self._from_files = wanted
        log.info("antientropy.definitions_loaded", directory=directory,
                 services=sorted(wanted), checks=len(defs.checks))  # fmt: skip

    async def reload(self) -> None:
        """SIGHUP: reload the service definitions; a bad file is logged and changes nothing."""
        try:
            self.load_definitions()
        except (DefinitionError, RegistrationError) as e:
            log.error("antientropy.reload_failed", error=str(e))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.local.stop()

    async def _loop(self) -> None:
        delay = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.sync_once()
                delay = self.sync_interval
            except (NoLeader, WriteTimeout, RPCError) as e:
                log.info("antientropy.sync_deferred", reason=str(e) or type(e).__name__)
                delay = self.retry_interval
            except Exception:
                log.exception("antientropy.sync_failed")
                delay = self.retry_interval

    async def sync_once(self) -> int:
        """One pass; returns how many writes it made."""
        consensus = self.agent.consensus
        if consensus is None:
            return 0
        catalog = consensus.store.catalog
        me = self.agent.config.node
        existing = catalog.node(me) or {}
        node_fields: dict[str, Any] = {
            "node_id": self.agent.node_id,
            "datacenter": self.agent.config.datacenter,
            "tagged_addresses": existing.get("TaggedAddresses") or {},
            "node_meta": existing.get("Meta") or {},
        }
        address = existing.get("Address") or self.agent.runtime.local_member().ip
        writes: list[bytes] = []
        now = time.time()
        in_catalog = (catalog.node_services(me) or {}).get("Services", {})
        checks_in_catalog = {c["CheckID"]: c for c in catalog.node_checks(me)}
        fields = ("Status", "Output", "Name", "Notes", "ServiceID", "Type")
        fields_but_output = tuple(k for k in fields if k != "Output")

        def stale_checks(service_id: str, everything: bool) -> list[dict[str, Any]]:
            service_name = self.local.services.get(service_id, {}).get("Service", "")
            out = []
            for cid, chk in self.local.checks.items():
                if chk.service_id != service_id:
                    continue
                want = chk.catalog(me, service_name)
                have = checks_in_catalog.get(cid)
                compared = fields_but_output if chk.output_pending else fields
                if everything or have is None or any(have.get(k) != want[k] for k in compared):
                    out.append(want)
            return out

        # a service and its checks in one write, as Consul's agent does: no reader ever sees
        # the service without the checks that may keep it out of ?passing
        for sid, svc in self.local.services.items():
            have = in_catalog.get(sid)
            changed = have is None or any(have.get(k) != v for k, v in svc.items())
            checks = stale_checks(sid, everything=changed)
            if changed or checks:
                writes.append(cmd.register(me, address, service=svc, checks=checks, now=now,
                                           **node_fields))  # fmt: skip
        for sid in in_catalog:
            if sid not in self.local.services and sid != CONSUL_SERVICE:
                writes.append(cmd.deregister(me, service_id=sid, now=now))
        node_checks = stale_checks("", everything=False)
        if node_checks:
            writes.append(cmd.register(me, address, checks=node_checks, now=now, **node_fields))
        for cid in checks_in_catalog:
            if cid not in self.local.checks and cid != SERF_CHECK_ID:
                writes.append(cmd.deregister(me, check_id=cid, now=now))
        for w in writes:
            result = await consensus.write(w)
            if not result.ok:
                log.warning("antientropy.write_rejected", error=result.error)
        self.syncs += 1
        return len(writes)

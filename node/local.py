"""What this agent owns: the services and checks registered through /v1/agent, kept on disk so
they survive a restart, and their check runners. Anti-entropy (node/antientropy.py) keeps the
replicated catalog equal to this.

Consul's rules: a service's checks are named `service:<id>` (or `service:<id>:<n>` when it has
several) and `Service '<name>' check`; a TTL check starts critical and turns critical again
when its TTL passes without an update; HTTP and TCP checks run every Interval with a Timeout;
script checks run only with --enable-script-checks. `Connect.SidecarService` is registration
sugar: it registers a second service `<id>-sidecar-proxy` (kind connect-proxy, a port from
21000-21255 unless given) and is not kept on the parent. A check whose output changes but not
its status is written to the catalog at most every `check_update_interval` (Consul's
check_update_interval, 5 minutes), so a check that prints a timestamp does not rewrite the
catalog, and wake every blocking query, on each run; a status change is written at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from node.checks.definition import MAX_OUTPUT, CheckError, CheckSpec
from node.checks.probes import probe
from node.golang import field
from node.registration import RegistrationError, parse_service, validate_for_catalog
from node.state.commands import CHECK_STATUSES, SERVICE_SPEC

__all__ = ["CHECK_UPDATE_INTERVAL", "SIDECAR_SUFFIX", "LocalState", "RegistrationError"]

log = structlog.get_logger("node.local")

CHECK_UPDATE_INTERVAL = 300.0  # Consul's check_update_interval default
SIDECAR_SUFFIX = "-sidecar-proxy"
SIDECAR_PORTS = range(21000, 21256)  # Consul's connect.sidecar_min_port..sidecar_max_port
RETRY_AFTER_FAILURE = 1.0  # a check round that failed (a bug) is retried this soon at the least


def _running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class LocalState:
    """Services and checks of this agent; `changed` fires whenever the catalog must follow."""

    def __init__(self, path: Path | None, *, scripts: bool = False,
                 on_change: Callable[[], None] = lambda: None,
                 check_update_interval: float = CHECK_UPDATE_INTERVAL,
                 run_checks: bool = True) -> None:  # fmt: skip
        """run_checks=False: a scratch copy that only validates (it must not probe anything)."""
        self.path = path
        self.scripts = scripts
        self.run_checks = run_checks
        self.on_change = on_change
        self.check_update_interval = check_update_interval
        self.services: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, CheckSpec] = {}
        self.sidecars: set[str] = set()  # services registered as another's SidecarService
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._waiters: set[asyncio.Future[None]] = set()

    # -- registration ---------------------------------------------------------------------------

    def add_service(self, obj: Any, *, replace_checks: bool = False) -> str:
        svc, raw_checks, sidecar_def = parse_service(obj)
        validate_for_catalog(svc)
        checks = self._service_checks(svc, raw_checks)
        sidecar = None
        if sidecar_def is not None:
            sidecar = self._sidecar(svc, sidecar_def)
        self._put_service(svc, checks, replace_checks)
        if sidecar is not None:
            self._put_service(*sidecar, replace_checks)
            self.sidecars.add(sidecar[0]["ID"])
        self._changed()
        return str(svc["ID"])

    def _service_checks(self, svc: dict[str, Any], raw: list[Any]) -> list[CheckSpec]:
        sid, name = svc["ID"], svc["Service"]
        out = []
        for i, c in enumerate(raw):
            default = f"service:{sid}" if len(raw) == 1 else f"service:{sid}:{i + 1}"
            out.append(self._check(c, service_id=sid, default_id=default,
                                   default_name=f"Service '{name}' check"))  # fmt: skip
        return out

    def _sidecar(self, parent: dict[str, Any],
                 definition: Any) -> tuple[dict[str, Any], list[CheckSpec]]:  # fmt: skip
        """Consul's sidecarServiceFromNodeService: what the sidecar leaves out it inherits
        from the service it fronts."""
        try:
            svc, raw_checks, _ = parse_service(definition, sidecar=True)
        except RegistrationError as e:
            raise RegistrationError(f"Invalid SidecarService: {e}") from None
        sid = parent["ID"] + SIDECAR_SUFFIX
        svc["ID"] = sid
        svc["Service"] = svc["Service"] or parent["Service"] + SIDECAR_SUFFIX
        svc["Kind"] = svc["Kind"] or "connect-proxy"
        svc["Address"] = svc["Address"] or parent["Address"]
        svc["Tags"] = svc["Tags"] or list(parent["Tags"])
        svc["Meta"] = svc["Meta"] or dict(parent["Meta"])
        proxy = dict(svc["Proxy"] or {})
        proxy.setdefault("DestinationServiceName", parent["Service"])
        proxy.setdefault("DestinationServiceID", parent["ID"])
        if not proxy.get("LocalServiceSocketPath") and (
            not proxy.get("LocalServiceAddress") or not proxy.get("LocalServicePort")
        ):
            if parent["SocketPath"]:
                proxy["LocalServiceSocketPath"] = parent["SocketPath"]
            else:
                proxy["LocalServiceAddress"] = proxy.get("LocalServiceAddress") or "127.0.0.1"
                proxy["LocalServicePort"] = proxy.get("LocalServicePort") or parent["Port"]
        svc["Proxy"] = proxy
        if svc["Port"] < 1:
            svc["Port"] = self._sidecar_port(sid)
        validate_for_catalog(svc)
        if not raw_checks:  # Consul's default: is the proxy listening?
            host = svc["Address"] or proxy.get("LocalServiceAddress") or "127.0.0.1"
            host = f"[{host}]" if ":" in host else host
            raw_checks = [{"CheckID": f"service:{sid}:1", "Name": "Connect Sidecar Listening",
                           "TCP": f"{host}:{svc['Port']}", "Interval": "10s"}]  # fmt: skip
        return svc, self._service_checks(svc, raw_checks)

    def _sidecar_port(self, sid: str) -> int:
        """The lowest free port of the range; a re-registered sidecar keeps its port."""
        current = self.services.get(sid, {}).get("Port")
        if isinstance(current, int) and current in SIDECAR_PORTS:
            return current
        used = {s["Port"] for s in self.services.values()}
        port = next((p for p in SIDECAR_PORTS if p not in used), None)
        if port is None:
            raise RegistrationError("Invalid SidecarService: no port provided for "
                                  "sidecar_service and none left in the configured range "
                                  f"[{SIDECAR_PORTS[0]}, {SIDECAR_PORTS[-1]}]")  # fmt: skip
        return port

    def _put_service(self, svc: dict[str, Any], checks: list[CheckSpec],
                     replace_checks: bool) -> None:  # fmt: skip
        sid = svc["ID"]
        before = dict(self.checks)  # Consul's snapshotCheckState: what the new checks keep
        if replace_checks:
            for cid in [k for k, c in self.checks.items() if c.service_id == sid]:
                self._drop_check(cid)
        self.services[sid] = svc
        for chk in checks:
            self._put_check(chk, before.get(chk.id))

    def remove_service(self, sid: str) -> bool:
        if sid not in self.services:
            return False
        del self.services[sid]
        self.sidecars.discard(sid)
        for cid in [k for k, c in self.checks.items() if c.service_id == sid]:
            self._drop_check(cid)
        if sid + SIDECAR_SUFFIX in self.sidecars:  # Consul's removeServiceSidecars
            self.remove_service(sid + SIDECAR_SUFFIX)
        self._changed()
        return True

    def _check(self, obj: Any, **kw: str) -> CheckSpec:
        try:
            return CheckSpec(obj, scripts=self.scripts, **kw)
        except CheckError as e:
            raise RegistrationError(f"Invalid check: {e}") from None

    def add_check(self, obj: Any) -> str:
        """A check of its own (not inline in a service) must be named, as Consul demands."""
        if isinstance(obj, dict) and not field(obj, "Name"):
            raise RegistrationError("Missing check name")
        chk = self._check(obj)
        if chk.service_id and chk.service_id not in self.services:
            raise RegistrationError(f"ServiceID {chk.service_id!r} does not exist")
        self._put_check(chk)
        self._changed()
        return chk.id

    def remove_check(self, cid: str) -> bool:
        if cid not in self.checks:
            return False
        self._drop_check(cid)
        self._changed()
        return True

    def update_check(self, cid: str, status: str, output: str) -> None:
        chk = self.checks.get(cid)
        if chk is None:
            raise KeyError(cid)
        if status not in CHECK_STATUSES:
            raise RegistrationError(f"Status must be one of {', '.join(CHECK_STATUSES)}")
        if chk.ttl:
            chk.ttl_deadline = time.monotonic() + chk.ttl
            self._restart(chk)  # its timer now ends at the new deadline, to the millisecond
        self._update(chk, status, output)

    def _update(self, chk: CheckSpec, status: str, output: str) -> None:
        """Consul's UpdateCheck: a status change is synced at once (with the latest output);
        an output-only change waits for check_update_interval (half of it plus up to all of
        it, staggered as Consul does) unless a status change carries it first. Unlike Consul,
        a check's first result is written at once even when its status stays the initial
        critical, so a failing check's output does not wait minutes to be seen."""
        output = output[:MAX_OUTPUT]
        first, chk.reported = not chk.reported, True
        if (status, output) == (chk.status, chk.output):
            return
        if status == chk.status and not first and self.check_update_interval > 0 and _running():
            chk.output = output
            if chk.deferred is None:
                d = self.check_update_interval
                chk.deferred = asyncio.get_running_loop().call_later(
                    d / 2 + random.uniform(0, d), self._deferred_due, chk
                )
            return
        if chk.deferred is not None:
            chk.deferred.cancel()
            chk.deferred = None
        chk.set(status, output)
        self._changed(persist=False)

    def _deferred_due(self, chk: CheckSpec) -> None:
        chk.deferred = None
        if self.checks.get(chk.id) is chk:
            self._changed(persist=False)

    # -- runners --------------------------------------------------------------------------------

    def start(self) -> None:
        for chk in self.checks.values():
            self._run(chk)

    async def stop(self) -> None:
        tasks = list(self._runners.values())
        self._runners.clear()
        for chk in self.checks.values():
            if chk.deferred is not None:
                chk.deferred.cancel()
                chk.deferred = None
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def _put_check(self, chk: CheckSpec, prev: CheckSpec | None = None) -> None:
        """A check registered again under its ID keeps its state (CheckSpec.restore)."""
        prev = self.checks.get(chk.id) or prev
        if prev is not None:
            chk.restore(prev)
        if chk.id in self.checks:
            self._drop_check(chk.id)
        self.checks[chk.id] = chk
        self._run(chk)

    def _restart(self, chk: CheckSpec) -> None:
        task = self._runners.pop(chk.id, None)
        if task is not None:
            task.cancel()
        self._run(chk)

    def _drop_check(self, cid: str) -> None:
        chk = self.checks.pop(cid, None)
        if chk is not None and chk.deferred is not None:
            chk.deferred.cancel()
            chk.deferred = None
        task = self._runners.pop(cid, None)
        if task is not None:
            task.cancel()

    def _run(self, chk: CheckSpec) -> None:
        if not self.run_checks or not _running():
            return  # loaded before the agent runs: start() launches it
        if chk.id not in self._runners:
            self._runners[chk.id] = asyncio.create_task(self._runner(chk), name=f"check-{chk.id}")

    async def _runner(self, chk: CheckSpec) -> None:
        """One per check. A TTL check's runner is restarted by every update (so its timer is
        exact); once expired it only wakes to reap the service (DeregisterCriticalServiceAfter).
        A failed round is logged and the next comes an interval later: a check never freezes
        silently at its last status."""
        while True:
            try:
                await self._round(chk)
            except Exception:
                log.exception("local.check_round_failed", check=chk.id, service=chk.service_id)
                await asyncio.sleep(max(chk.interval, RETRY_AFTER_FAILURE))

    async def _round(self, chk: CheckSpec) -> None:
        if chk.kind in ("http", "tcp", "script"):
            status, output = await probe(chk)
            self._update(chk, status, output)
            await asyncio.sleep(chk.interval)
        elif chk.kind == "ttl" and (chk.ttl_deadline > time.monotonic()
                                    or chk.status != "critical"):  # fmt: skip
            await asyncio.sleep(max(0.0, chk.ttl_deadline - time.monotonic()))
            if chk.status != "critical":  # Consul's wording, the last output kept
                self._update(chk, "critical", "TTL expired (last output before timeout "
                                              "follows): " + chk.output)  # fmt: skip
        else:  # an expired TTL: nothing to do until an update or the reap
            reap_in = chk.deregister_after - (time.monotonic() - chk.critical_since)
            await asyncio.sleep(max(0.01, reap_in) if chk.deregister_after and
                                chk.critical_since else 3600.0)  # fmt: skip
        self._deregister_if_critical_too_long(chk)

    def _deregister_if_critical_too_long(self, chk: CheckSpec) -> None:
        if (chk.deregister_after and chk.service_id and chk.critical_since
                and time.monotonic() - chk.critical_since >= chk.deregister_after):  # fmt: skip
            log.info("local.service_reaped", service=chk.service_id, check=chk.id)
            self.remove_service(chk.service_id)

    # -- persistence ----------------------------------------------------------------------------

    def _changed(self, *, persist: bool = True) -> None:
        """persist=False for a check's status or output: the file holds definitions only, so
        a check run that changes something costs no disk write on the event loop."""
        if persist:
            self.save()
        self.on_change()
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)
        self._waiters.clear()

    async def wait_changed(self, timeout: float) -> None:
        """Return after the next change or `timeout`; hash-based blocking queries wait here."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.add(fut)
        try:
            await asyncio.wait({fut}, timeout=timeout)
        finally:
            self._waiters.discard(fut)

    def save(self) -> None:
        if self.path is None:
            return
        data = {
            "services": list(self.services.values()),
            "checks": [c.definition | {"CheckID": c.id, "ServiceID": c.service_id}
                       for c in self.checks.values()],
            "sidecars": sorted(self.sidecars),
        }  # fmt: skip
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    def load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            services, checks = data["services"], data["checks"]
            sidecars = set(data.get("sidecars", []))
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("local.state_unreadable", path=str(self.path), error=str(e))
            return
        for svc in services:
            self.services[svc["ID"]] = {k: v for k, v in svc.items() if k in SERVICE_SPEC}
        self.sidecars = sidecars & set(self.services)
        for c in checks:
            with contextlib.suppress(RegistrationError):
                chk = self._check(c)
                self.checks[chk.id] = chk

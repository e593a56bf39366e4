"""What this agent owns: the services and checks registered through /v1/agent, kept on disk so
they survive a restart, and their check runners. Anti-entropy (node/antientropy.py) keeps the
replicated catalog equal to this.

Consul's rules: a service's checks are named `service:<id>` (or `service:<id>:<n>` when it has
several); a TTL check starts critical and turns critical again when its TTL passes without an
update; HTTP and TCP checks run every Interval with a Timeout; script checks run only with
--enable-script-checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from node.checks.definition import MAX_OUTPUT, CheckError, CheckSpec, field
from node.checks.probes import probe
from node.state import commands as cmd
from node.state.commands import SERVICE_SPEC

__all__ = ["LocalState", "LocalStateError"]

log = structlog.get_logger("node.local")


class LocalStateError(ValueError):
    """A registration the agent refuses; the message names the field."""


def _mapping(raw: Any, field: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LocalStateError(f"{field} must be an object")
    return dict(raw)


class LocalState:
    """Services and checks of this agent; `changed` fires whenever the catalog must follow."""

    def __init__(self, path: Path | None, *, scripts: bool = False,
                 on_change: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.path = path
        self.scripts = scripts
        self.on_change = on_change
        self.services: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, CheckSpec] = {}
        self._runners: dict[str, asyncio.Task[None]] = {}
        self._waiters: set[asyncio.Future[None]] = set()

    # -- registration ---------------------------------------------------------------------------

    def add_service(self, obj: Any, *, replace_checks: bool = False) -> str:
        if not isinstance(obj, dict):
            raise LocalStateError("the service must be a JSON object")
        name = field(obj, "Name") or field(obj, "Service")
        if not isinstance(name, str) or not name:
            raise LocalStateError("Missing service name")
        sid = str(field(obj, "ID") or name)
        port = field(obj, "Port", 0)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise LocalStateError(f"invalid Port {port!r}")
        tags = field(obj, "Tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise LocalStateError("Tags must be a list of strings")
        svc: dict[str, Any] = {
            "ID": sid, "Service": name, "Tags": tags, "Port": port,
            "Address": str(field(obj, "Address") or ""),
            "Meta": _mapping(field(obj, "Meta"), "Meta"),
            "Weights": _mapping(field(obj, "Weights"), "Weights"),
            "EnableTagOverride": bool(field(obj, "EnableTagOverride", False)),
            "Kind": str(field(obj, "Kind") or ""),
            "Proxy": field(obj, "Proxy"),
            "Connect": field(obj, "Connect"),
        }  # fmt: skip
        unknown = set(svc) - set(SERVICE_SPEC)
        assert not unknown, unknown
        try:  # the catalog's own rules, so anti-entropy can always write what was accepted
            cmd.register("validate", "127.0.0.1", service=svc, now=0.0)
        except cmd.CommandError as e:
            raise LocalStateError(str(e).split(": ", 1)[-1]) from None
        passing, warning = svc["Weights"].get("Passing", 1), svc["Weights"].get("Warning", 1)
        if not (type(passing) is int and passing >= 1 and type(warning) is int and warning >= 0):
            raise LocalStateError("Invalid Weights: Passing must be >= 1 and Warning >= 0")
        svc["Weights"] = {"Passing": passing, "Warning": warning}
        raw_checks = field(obj, "Checks") or []
        if not isinstance(raw_checks, list):
            raise LocalStateError("Checks must be a list of checks")
        raw_checks = list(raw_checks)
        if field(obj, "Check"):
            raw_checks.insert(0, field(obj, "Check"))
        checks = []
        for i, c in enumerate(raw_checks):
            default = f"service:{sid}" if len(raw_checks) == 1 else f"service:{sid}:{i + 1}"
            checks.append(self._check(c, service_id=sid, default_id=default))
        if replace_checks:
            for cid in [k for k, c in self.checks.items() if c.service_id == sid]:
                self._drop_check(cid)
        self.services[sid] = svc
        for chk in checks:
            self._put_check(chk)
        self._changed()
        return sid

    def remove_service(self, sid: str) -> bool:
        if sid not in self.services:
            return False
        del self.services[sid]
        for cid in [k for k, c in self.checks.items() if c.service_id == sid]:
            self._drop_check(cid)
        self._changed()
        return True

    def _check(self, obj: Any, **kw: str) -> CheckSpec:
        try:
            return CheckSpec(obj, scripts=self.scripts, **kw)
        except CheckError as e:
            raise LocalStateError(str(e)) from None

    def add_check(self, obj: Any) -> str:
        chk = self._check(obj)
        if chk.service_id and chk.service_id not in self.services:
            raise LocalStateError(f"ServiceID {chk.service_id!r} does not exist")
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
        if chk.ttl:
            chk.ttl_deadline = time.monotonic() + chk.ttl
            self._restart(chk)  # its timer now ends at the new deadline, to the millisecond
        if (chk.status, chk.output) != (status, output[:MAX_OUTPUT]):
            try:
                chk.set(status, output)
            except CheckError as e:
                raise LocalStateError(str(e)) from None
            self._changed()

    # -- runners --------------------------------------------------------------------------------

    def start(self) -> None:
        for chk in self.checks.values():
            self._run(chk)

    async def stop(self) -> None:
        tasks = list(self._runners.values())
        self._runners.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t

    def _put_check(self, chk: CheckSpec) -> None:
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
        self.checks.pop(cid, None)
        task = self._runners.pop(cid, None)
        if task is not None:
            task.cancel()

    def _run(self, chk: CheckSpec) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # loaded before the agent runs: start() launches it
        if chk.id not in self._runners:
            self._runners[chk.id] = asyncio.create_task(self._runner(chk), name=f"check-{chk.id}")

    async def _runner(self, chk: CheckSpec) -> None:
        """One per check. A TTL check's runner is restarted by every update (so its timer is
        exact); once expired it only wakes to reap the service (DeregisterCriticalServiceAfter)."""
        while True:
            if chk.kind in ("http", "tcp", "script"):
                status, output = await probe(chk)
                if (status, output) != (chk.status, chk.output):
                    chk.set(status, output)
                    self._changed()
                await asyncio.sleep(chk.interval)
            elif chk.kind == "ttl" and chk.ttl_deadline > time.monotonic():
                await asyncio.sleep(chk.ttl_deadline - time.monotonic())
                if chk.status != "critical":  # Consul's wording, the last output kept
                    chk.set("critical", "TTL expired (last output before timeout follows): "
                                        + chk.output)  # fmt: skip
                    self._changed()
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

    def _changed(self) -> None:
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
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(fut)

    def save(self) -> None:
        if self.path is None:
            return
        data = {
            "services": list(self.services.values()),
            "checks": [c.definition | {"CheckID": c.id, "ServiceID": c.service_id}
                       for c in self.checks.values()],
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
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("local.state_unreadable", path=str(self.path), error=str(e))
            return
        for svc in services:
            self.services[svc["ID"]] = svc
        for c in checks:
            with contextlib.suppress(LocalStateError):
                chk = self._check(c)
                self.checks[chk.id] = chk

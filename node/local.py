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

import aiohttp
import structlog

from node.state import commands as cmd
from node.state.commands import CHECK_STATUSES, SERVICE_SPEC
from node.state.sessions import parse_duration

__all__ = ["CheckSpec", "LocalState", "LocalStateError"]

log = structlog.get_logger("node.local")

MAX_OUTPUT = 4096  # Consul keeps 4 KiB of check output
DEFAULT_TIMEOUT = 10.0
MIN_INTERVAL = 1.0


class LocalStateError(ValueError):
    """A registration the agent refuses; the message names the field."""


def _fold(key: str) -> str:
    return key.replace("_", "").lower()


def _get(obj: dict[str, Any], name: str, default: Any = None) -> Any:
    """Field lookup the way Go decodes JSON: case-insensitive, snake_case accepted."""
    want = _fold(name)
    return next((v for k, v in obj.items() if _fold(k) == want), default)


def _duration(obj: dict[str, Any], name: str, required: bool = False) -> float:
    raw = _get(obj, name)
    if raw in (None, ""):
        if required:
            raise LocalStateError(f"{name} is required")
        return 0.0
    try:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            return float(raw) / 1e9  # Go's time.Duration in JSON: nanoseconds
        return parse_duration(str(raw))
    except ValueError as e:
        raise LocalStateError(f"invalid {name}: {e}") from None


def _mapping(raw: Any, field: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LocalStateError(f"{field} must be an object")
    return dict(raw)


class CheckSpec:
    """A check definition (the agent's view: how to run it) plus its current state."""

    def __init__(self, obj: dict[str, Any], *, service_id: str = "", default_id: str = "",
                 scripts: bool = False) -> None:  # fmt: skip
        if not isinstance(obj, dict):
            raise LocalStateError("a check must be an object")
        self.id = str(_get(obj, "CheckID") or _get(obj, "ID") or default_id or "")
        self.name = str(_get(obj, "Name") or "")
        if not self.id:
            if not self.name:
                raise LocalStateError("check needs a Name or an ID")
            self.id = self.name
        self.name = self.name or self.id
        self.service_id = str(_get(obj, "ServiceID") or service_id)
        self.notes = str(_get(obj, "Notes") or "")
        self.ttl = _duration(obj, "TTL")
        self.http = str(_get(obj, "HTTP") or "")
        self.method = str(_get(obj, "Method") or "GET")
        self.tcp = str(_get(obj, "TCP") or "")
        self.args = _get(obj, "Args") or _get(obj, "ScriptArgs") or []
        self.interval = _duration(obj, "Interval")
        if 0 < self.interval < MIN_INTERVAL:
            self.interval = MIN_INTERVAL  # Consul clamps to 1 s too
        self.timeout = _duration(obj, "Timeout") or DEFAULT_TIMEOUT
        self.deregister_after = _duration(obj, "DeregisterCriticalServiceAfter")
        kinds = [k for k, v in (("ttl", self.ttl), ("http", self.http), ("tcp", self.tcp),
                                ("script", self.args)) if v]  # fmt: skip
        if len(kinds) > 1:
            raise LocalStateError(f"check {self.id!r} has several kinds: {', '.join(kinds)}")
        if not kinds:  # Consul's message for a check it cannot run
            raise LocalStateError("Must provide TTL or HTTP/TCP/Args and Interval")
        self.kind = kinds[0]
        if self.kind in ("http", "tcp", "script") and self.interval <= 0:
            raise LocalStateError(f"check {self.id!r}: Interval is required for {self.kind}")
        if self.kind == "script":
            if not scripts:
                raise LocalStateError(
                    "script checks are disabled: start the agent with --enable-script-checks"
                )
            if not isinstance(self.args, list) or not all(isinstance(a, str) for a in self.args):
                raise LocalStateError("Args must be a list of strings")
        if self.kind == "tcp" and ":" not in self.tcp:
            raise LocalStateError(f"TCP must be host:port, got {self.tcp!r}")
        status = _get(obj, "Status")
        # Consul: TTL checks start critical; others start critical until their first run
        self.status = str(status) if status else "critical"
        if self.status not in CHECK_STATUSES:
            raise LocalStateError(f"Status must be one of {', '.join(CHECK_STATUSES)}")
        self.output = ""
        self.definition = {k: v for k, v in obj.items() if v is not None}
        self.ttl_deadline = time.monotonic() + self.ttl if self.ttl else 0.0
        self.critical_since = time.monotonic() if self.status == "critical" else 0.0

    def set(self, status: str, output: str) -> None:
        if status not in CHECK_STATUSES:
            raise LocalStateError(f"Status must be one of {', '.join(CHECK_STATUSES)}")
        if status == "critical" and self.status != "critical":
            self.critical_since = time.monotonic()
        elif status != "critical":
            self.critical_since = 0.0
        self.status, self.output = status, output[:MAX_OUTPUT]

    def catalog(self, node: str, service_name: str) -> dict[str, Any]:
        """The check as the catalog stores it (CHECK_SPEC fields)."""
        return {
            "Node": node,
            "CheckID": self.id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": service_name,
            "Type": self.kind,
        }


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
        name = _get(obj, "Name") or _get(obj, "Service")
        if not isinstance(name, str) or not name:
            raise LocalStateError("Missing service name")
        sid = str(_get(obj, "ID") or name)
        port = _get(obj, "Port", 0)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise LocalStateError(f"invalid Port {port!r}")
        tags = _get(obj, "Tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise LocalStateError("Tags must be a list of strings")
        svc: dict[str, Any] = {
            "ID": sid, "Service": name, "Tags": tags, "Port": port,
            "Address": str(_get(obj, "Address") or ""),
            "Meta": _mapping(_get(obj, "Meta"), "Meta"),
            "Weights": _mapping(_get(obj, "Weights"), "Weights"),
            "EnableTagOverride": bool(_get(obj, "EnableTagOverride", False)),
            "Kind": str(_get(obj, "Kind") or ""),
            "Proxy": _get(obj, "Proxy"),
            "Connect": _get(obj, "Connect"),
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
        raw_checks = _get(obj, "Checks") or []
        if not isinstance(raw_checks, list):
            raise LocalStateError("Checks must be a list of checks")
        raw_checks = list(raw_checks)
        if _get(obj, "Check"):
            raw_checks.insert(0, _get(obj, "Check"))
        checks = []
        for i, c in enumerate(raw_checks):
            default = f"service:{sid}" if len(raw_checks) == 1 else f"service:{sid}:{i + 1}"
            checks.append(CheckSpec(c, service_id=sid, default_id=default, scripts=self.scripts))
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

    def add_check(self, obj: Any) -> str:
        chk = CheckSpec(obj, scripts=self.scripts)
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
            chk.set(status, output)
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
                status, output = await _probe(chk)
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
                chk = CheckSpec(c, scripts=self.scripts)
                self.checks[chk.id] = chk


async def _probe(chk: CheckSpec) -> tuple[str, str]:
    if chk.kind == "http":
        try:
            timeout = aiohttp.ClientTimeout(total=chk.timeout)
            async with (aiohttp.ClientSession(timeout=timeout) as s,
                        s.request(chk.method, chk.http) as r):  # fmt: skip
                body = (await r.content.read(MAX_OUTPUT)).decode(errors="replace")
                out = f"HTTP {chk.method} {chk.http}: {r.status} {r.reason} Output: {body}"
                if 200 <= r.status < 300:
                    return "passing", out
                return ("warning" if r.status == 429 else "critical"), out
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            return "critical", f"HTTP {chk.method} {chk.http}: {e or type(e).__name__}"
    if chk.kind == "tcp":
        host, _, port = chk.tcp.rpartition(":")
        try:
            async with asyncio.timeout(chk.timeout):
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
            writer.close()
            return "passing", f"TCP connect {chk.tcp}: Success"
        except (OSError, TimeoutError, ValueError) as e:
            return "critical", f"dial tcp {chk.tcp}: {e or type(e).__name__}"
    try:  # script
        proc = await asyncio.create_subprocess_exec(
            *chk.args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(chk.timeout):
                raw, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return "critical", f"Timed out ({chk.timeout:g}s) running check"
        text = raw.decode(errors="replace")[:MAX_OUTPUT]
        code = proc.returncode
        return ("passing" if code == 0 else "warning" if code == 1 else "critical"), text
    except OSError as e:
        return "critical", f"cannot run {chk.args[0] if chk.args else ''}: {e.strerror}"

"""A check definition as Consul takes it (JSON/HCL field names, case-insensitive, snake_case
accepted, Go durations or nanoseconds) and the check's current status.

Consul's rules kept here: exactly one of TTL, HTTP, TCP or Args; HTTP/TCP/script checks need an
Interval, clamped to at least 1 s; checks start critical unless given a Status; script checks
only when the agent allows them; output is capped at 4 KiB. An HTTP check may carry `Method`,
`Header` (a map of lists, as Go's http.Header), `Body`, `TLSSkipVerify`, `TLSServerName` and
`DisableRedirects`.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from node.golang import field, parse_duration
from node.state.commands import CHECK_STATUSES

__all__ = ["MAX_OUTPUT", "CheckError", "CheckSpec", "duration"]

MAX_OUTPUT = 4096  # Consul keeps 4 KiB of check output
DEFAULT_TIMEOUT = 10.0
MIN_INTERVAL = 1.0
MAX_DURATION = (2**63 - 1) / 1e9  # Go's time.Duration: int64 nanoseconds (about 292 years)


class CheckError(ValueError):
    """A check definition that cannot run; the message names the field."""


def duration(obj: dict[str, Any], name: str, required: bool = False) -> float:
    """Seconds, within what Go's time.Duration holds: never NaN or infinite (a runner that
    sleeps NaN seconds never wakes again)."""
    raw = field(obj, name)
    if raw in (None, ""):
        if required:
            raise CheckError(f"{name} is required")
        return 0.0
    try:
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            seconds = float(raw) / 1e9  # Go's time.Duration in JSON: nanoseconds
        else:
            seconds = parse_duration(str(raw))
    except (ValueError, OverflowError) as e:  # OverflowError: an int past any float
        raise CheckError(f"invalid {name}: {e}") from None
    if not math.isfinite(seconds) or abs(seconds) > MAX_DURATION:
        raise CheckError(f"invalid {name}: {raw!r} is not a finite duration of at most "
                         "2562047h47m16.854775807s")  # fmt: skip
    return seconds


def _check_tcp_target(target: str) -> None:
    """host:port with a numeric port in 1-65535 ([v6]:port for IPv6): anything else could
    only fail at every run, or (a port past 65535) crash the probe."""
    _, sep, port = target.rpartition(":")
    if not sep:
        raise CheckError(f"TCP must be host:port, got {target!r}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise CheckError(f"TCP must be host:port with a port in 1-65535, got {target!r}")




def _header(raw: Any) -> dict[str, list[str]]:
    """Consul's Header is Go's http.Header: {"Name": ["value", ...]}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(
        isinstance(v, list) and all(isinstance(x, str) for x in v) for v in raw.values()
    ):
        raise CheckError('Header must be an object of string lists, e.g. {"X-A": ["1"]}')
    return {str(k): list(v) for k, v in raw.items()}


class CheckSpec:
    """A check definition (the agent's view: how to run it) plus its current state."""

    def __init__(self, obj: dict[str, Any], *, service_id: str = "", default_id: str = "",
                 default_name: str = "", scripts: bool = False) -> None:  # fmt: skip
        if not isinstance(obj, dict):
            raise CheckError("a check must be an object")
        self.id = str(field(obj, "CheckID") or field(obj, "ID") or default_id or "")
        self.name = str(field(obj, "Name") or default_name or "")
        if not self.id:
            if not self.name:
                raise CheckError("check needs a Name or an ID")
            self.id = self.name
        self.name = self.name or self.id
        self.service_id = str(field(obj, "ServiceID") or service_id)
        self.notes = str(field(obj, "Notes") or "")
        self.ttl = duration(obj, "TTL")
        self.http = str(field(obj, "HTTP") or "")
        self.method = str(field(obj, "Method") or "GET").upper()
        self.header = _header(field(obj, "Header"))
        self.body = field(obj, "Body") or ""
        if not isinstance(self.body, str):
            raise CheckError("Body must be a string")
        self.tls_skip_verify = bool(field(obj, "TLSSkipVerify", False))
        self.tls_server_name = str(field(obj, "TLSServerName") or "")
        self.disable_redirects = bool(field(obj, "DisableRedirects", False))
        self.tcp = str(field(obj, "TCP") or "")
        self.args = field(obj, "Args") or field(obj, "ScriptArgs") or []
        self.interval = duration(obj, "Interval")
        if 0 < self.interval < MIN_INTERVAL:
            self.interval = MIN_INTERVAL  # Consul clamps to 1 s too
        self.timeout = duration(obj, "Timeout") or DEFAULT_TIMEOUT
        self.deregister_after = duration(obj, "DeregisterCriticalServiceAfter")
        kinds = [k for k, v in (("ttl", self.ttl), ("http", self.http), ("tcp", self.tcp),
                                ("script", self.args)) if v]  # fmt: skip
        if len(kinds) > 1:
            raise CheckError(f"check {self.id!r} has several kinds: {', '.join(kinds)}")
        if not kinds:  # Consul's message for a check it cannot run
            raise CheckError("Must provide TTL or HTTP/TCP/Args and Interval")
        self.kind = kinds[0]
        if self.kind in ("http", "tcp", "script") and self.interval <= 0:
            raise CheckError(f"check {self.id!r}: Interval is required for {self.kind}")
        if self.kind == "script":
            if not scripts:
                raise CheckError(
                    "script checks are disabled: start the agent with --enable-script-checks"
                )
            if not isinstance(self.args, list) or not all(isinstance(a, str) for a in self.args):
                raise CheckError("Args must be a list of strings")
        if self.kind == "tcp":
            _check_tcp_target(self.tcp)
        status = field(obj, "Status")
        # Consul: TTL checks start critical; others start critical until their first run
        self.status = str(status) if status else "critical"
        if self.status not in CHECK_STATUSES:
            raise CheckError(f"Status must be one of {', '.join(CHECK_STATUSES)}")
        self.output = ""
        self.definition = {k: v for k, v in obj.items() if v is not None}
        if default_name and not field(obj, "Name"):
            self.definition["Name"] = default_name
        self.ttl_deadline = time.monotonic() + self.ttl if self.ttl else 0.0
        self.critical_since = time.monotonic() if self.status == "critical" else 0.0
        # an output-only change not yet written to the catalog (check_update_interval)
        self.deferred: asyncio.TimerHandle | None = None
        self.reported = False  # a first result (probe or update) has been recorded

    def restore(self, prev: CheckSpec) -> None:
        """Consul's addServiceInternal ("Restore the fields from the snapshot"): a check
        registered again under its ID (a re-registration, a --config-dir reload) keeps its
        status and output whatever its new definition says, its kind included, so it does
        not flap to critical. It also keeps when it turned critical (the reap clock of
        DeregisterCriticalServiceAfter) and, TTL to TTL, when it was last updated: a
        re-registration is no heartbeat."""
        self.status, self.output = prev.status, prev.output
        self.critical_since = prev.critical_since
        self.reported = prev.reported
        if self.ttl and prev.ttl:
            self.ttl_deadline = prev.ttl_deadline - prev.ttl + self.ttl

    @property
    def output_pending(self) -> bool:
        return self.deferred is not None

    def set(self, status: str, output: str) -> None:
        if status not in CHECK_STATUSES:
            raise CheckError(f"Status must be one of {', '.join(CHECK_STATUSES)}")
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

"""HTTP KV client and Jepsen-style workload pieces shared by the Raft cluster tests.

    kv = KVClient(agent.http_base)
    kv.put("k", "v")                  # True, or False when a ?cas= index did not match
    entry = kv.get("k")               # KVEntry, or None on 404; ?consistent by default

Every failure is a :class:`KVError`: an HTTP status other than 200/404, or a transport
failure (``status is None``; ``sent`` says whether the request may have reached the agent).
``KVError.write_outcome()`` says how a history records a failed write: ``"fail"`` when it
cannot have taken effect, ``"info"`` (indeterminate) otherwise.

:class:`RegisterClient` is one Jepsen client process bound to one agent, doing read / write /
compare-and-set on a key and recording each op in a :class:`LockedRecorder`. Consul's CAS is
index based, so ``cas(old, new)`` is a consistent GET followed by ``PUT ?cas=<ModifyIndex>``;
with unique written values "the index moved" implies "the value is no longer ``old``". After
an indeterminate result the client takes a fresh process id (the op may still take effect
later, and a process has at most one op open). :class:`RegisterWorkload` runs such clients
in threads; :class:`AckedWriter` writes unique keys and keeps the acknowledged ones.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import itertools
import json
import random
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Self

from tests.harness.agents import AgentProc
from tests.harness.linearizability import HistoryRecorder, Kind, Operation, Status

__all__ = [
    "AckedWriter",
    "ClientStats",
    "KVClient",
    "KVEntry",
    "KVError",
    "LockedRecorder",
    "RegisterClient",
    "RegisterWorkload",
    "Response",
    "agent_by_server_address",
    "find_leader",
    "max_gap",
    "raft_args",
    "raft_servers",
    "start_all",
    "unique_value",
    "use_retry_join",
]

WriteOutcome = Literal["fail", "info"]


class KVError(Exception):
    """A KV request that did not give a definite answer.

    status None: transport failure; ``sent`` is False only when the connection was never
    established (so the agent cannot have seen the request).
    """

    def __init__(self, status: int | None, body: str, *, sent: bool = True) -> None:
        super().__init__(f"{status if status is not None else 'transport'}: {body}")
        self.status = status
        self.body = body
        self.sent = sent

    def write_outcome(self, *, no_leader_is_definite: bool = True) -> WriteOutcome:
        """How a history records a write that ended with this error.

        Per the agent's contract only a 500 starting with "timed out" is indeterminate, and
        "No cluster leader" means nothing was proposed; a transport error after the request
        went out is indeterminate (the agent may have forwarded it), as is any other 5xx.
        """
        if self.status is None:
            return "info" if self.sent else "fail"
        if 400 <= self.status < 500:
            return "fail"
        if (
            no_leader_is_definite
            and self.status == 500
            and self.body.startswith("No cluster leader")
        ):
            return "fail"
        return "info"


@dataclass(frozen=True, slots=True)
class KVEntry:
    key: str
    value: bytes | None
    flags: int
    create_index: int
    modify_index: int
    lock_index: int
    session: str | None

    @property
    def text(self) -> str | None:
        return None if self.value is None else self.value.decode()

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> KVEntry:
        raw = d.get("Value")
        return KVEntry(
            key=str(d["Key"]),
            value=None if raw is None else base64.b64decode(raw),
            flags=int(d.get("Flags", 0)),
            create_index=int(d["CreateIndex"]),
            modify_index=int(d["ModifyIndex"]),
            lock_index=int(d.get("LockIndex", 0)),
            session=d.get("Session"),
        )


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    headers: Mapping[str, str]

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.body)


class KVClient:
    """Blocking client for one agent's HTTP API; one connection per request (no keep-alive,
    so a killed or restarted agent never leaves a half-dead pooled socket behind)."""

    def __init__(self, base: str, timeout: float = 3.0) -> None:
        u = urllib.parse.urlsplit(base)
        if u.scheme != "http" or u.hostname is None or u.port is None:
            raise ValueError(f"expected http://host:port, got {base!r}")
        self.base = base
        self.host = u.hostname
        self.port = u.port
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"KVClient({self.base!r})"

    def request(
        self, method: str, path: str, body: bytes | None = None, *, timeout: float | None = None
    ) -> Response:
        """One request; raises KVError(None, ...) on transport failures only."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)
        try:
            try:
                conn.connect()
            except OSError as e:
                raise KVError(None, f"connect: {e!r}", sent=False) from None
            try:
                conn.request(method, path, body=body)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise KVError(None, f"{method} {path}: {e!r}", sent=True) from None
            return Response(resp.status, data, dict(resp.getheaders()))
        finally:
            conn.close()

    @staticmethod
    def _kv_path(key: str, params: Mapping[str, str | int | None]) -> str:
        path = "/v1/kv/" + urllib.parse.quote(key, safe="/")
        q = "&".join(k if v is None else f"{k}={v}" for k, v in params.items())
        return f"{path}?{q}" if q else path

    def get(
        self, key: str, *, mode: Literal["consistent", "default", "stale"] = "consistent",
        timeout: float | None = None,
    ) -> KVEntry | None:  # fmt: skip
        """The entry for key (None when absent); mode picks ?consistent / leader / ?stale."""
        params: dict[str, str | int | None] = {} if mode == "default" else {mode: None}
        r = self.request("GET", self._kv_path(key, params), timeout=timeout)
        if r.status == 404:
            return None
        if r.status != 200:
            raise KVError(r.status, r.text)
        entries = [KVEntry.from_json(d) for d in r.json()]
        match = [e for e in entries if e.key == key]
        if len(match) != 1:
            raise KVError(r.status, f"GET {key!r}: expected one entry for the key, got {r.text}")
        return match[0]

    def get_recurse(
        self, prefix: str, *, mode: Literal["consistent", "default", "stale"] = "consistent",
        timeout: float | None = None,
    ) -> list[KVEntry]:  # fmt: skip
        params: dict[str, str | int | None] = {"recurse": None}
        if mode != "default":
            params[mode] = None
        r = self.request("GET", self._kv_path(prefix, params), timeout=timeout)
        if r.status == 404:
            return []
        if r.status != 200:
            raise KVError(r.status, r.text)
        return [KVEntry.from_json(d) for d in r.json()]

    def put(
        self, key: str, value: bytes | str, *, cas: int | None = None,
        timeout: float | None = None,
    ) -> bool:  # fmt: skip
        """PUT; True when applied, False when a ?cas= index did not match."""
        data = value.encode() if isinstance(value, str) else value
        params: dict[str, str | int | None] = {} if cas is None else {"cas": cas}
        r = self.request("PUT", self._kv_path(key, params), data, timeout=timeout)
        if r.status != 200:
            raise KVError(r.status, r.text)
        return _parse_bool(r)

    def delete(self, key: str, *, cas: int | None = None, timeout: float | None = None) -> bool:
        params: dict[str, str | int | None] = {} if cas is None else {"cas": cas}
        r = self.request("DELETE", self._kv_path(key, params), timeout=timeout)
        if r.status != 200:
            raise KVError(r.status, r.text)
        return _parse_bool(r)

    def get_json(self, path: str, *, timeout: float | None = None) -> Any:
        r = self.request("GET", path, timeout=timeout)
        if r.status != 200:
            raise KVError(r.status, r.text)
        return r.json()

    def leader(self, timeout: float | None = None) -> str:
        """/v1/status/leader: "ip:serverport", or "" when no leader is known."""
        return str(self.get_json("/v1/status/leader", timeout=timeout))

    def peers(self, timeout: float | None = None) -> list[str]:
        return [str(p) for p in self.get_json("/v1/status/peers", timeout=timeout)]

    def raft_configuration(self, timeout: float | None = None) -> dict[str, Any]:
        body = self.get_json("/v1/operator/raft/configuration?stale", timeout=timeout)
        if not isinstance(body, dict):
            raise KVError(200, f"configuration is not an object: {body!r}")
        return body


def _parse_bool(r: Response) -> bool:
    text = r.text.strip()
    if text == "true":
        return True
    if text == "false":
        return False
    raise KVError(r.status, f"expected true/false, got {text!r}")


# ----- cluster views ------------------------------------------------------------------------


def agent_by_server_address(agents: Sequence[AgentProc], address: str) -> AgentProc | None:
    """The agent whose Raft address (bind ip:server port) is `address`."""
    ip, _, port = address.rpartition(":")
    for a in agents:
        if (a.advertise or a.bind) == ip and str(a.ports.server) == port:
            return a
    return None


def find_leader(
    agents: Sequence[AgentProc], *, skip: Sequence[AgentProc] = (), timeout: float = 1.0
) -> AgentProc | None:
    """The leader as the majority of answering agents reports it (None when none is known)."""
    votes: Counter[str] = Counter()
    for a in agents:
        if not a.running or a in skip:
            continue
        with contextlib.suppress(KVError):
            addr = KVClient(a.http_base, timeout).leader()
            if addr:
                votes[addr] += 1
    if not votes:
        return None
    addr, _ = votes.most_common(1)[0]
    return agent_by_server_address(agents, addr)


def raft_servers(agent: AgentProc, timeout: float = 2.0) -> list[dict[str, Any]]:
    """Servers of /v1/operator/raft/configuration (?stale) as this agent sees them."""
    return list(KVClient(agent.http_base, timeout).raft_configuration()["Servers"])


def max_gap(times: Sequence[float], start: float, end: float) -> float:
    """Longest interval inside [start, end] without a timestamp from `times`."""
    points = sorted(t for t in times if start <= t <= end)
    edges = [start, *points, end]
    return max(b - a for a, b in itertools.pairwise(edges))


# ----- history recording --------------------------------------------------------------------


class LockedRecorder(HistoryRecorder):
    """HistoryRecorder for client threads (the base class assumes one event loop).

    Also keeps the error text of failed/indeterminate ops, for failure reports.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self._lock = threading.Lock()
        self.errors: dict[int, str] = {}

    def invoke(
        self, process: Hashable, key: Hashable, kind: Kind, value: object = None
    ) -> Operation:
        with self._lock:
            return super().invoke(process, key, kind, value)

    def _complete(self, op: Operation, status: Status, output: object) -> None:
        with self._lock:
            super()._complete(op, status, output)

    def note(self, op: Operation, error: str) -> None:
        self.errors[op.index] = error

    def describe(self, op: Operation, t0: float) -> str:
        err = self.errors.get(op.index)
        return op.describe(t0) + (f"  ({err})" if err else "")


_values = itertools.count(1)


def unique_value(tag: str = "v") -> str:
    """A value no other write in this test process uses (itertools.count is atomic)."""
    return f"{tag}{next(_values)}"


@dataclass
class ClientStats:
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    anomalies: list[str] = field(default_factory=list)

    def ok(self, kind: str) -> int:
        return self.counts[(kind, "ok")]


class RegisterClient:
    """One Jepsen client bound to one agent; see the module docstring for the CAS mapping."""

    def __init__(
        self,
        kv: KVClient,
        rec: LockedRecorder,
        process_ids: Iterator[int],
        *,
        stats: ClientStats | None = None,
        no_leader_is_definite: bool = True,
    ) -> None:
        self.kv = kv
        self.rec = rec
        self._ids = process_ids
        self.process = next(process_ids)
        self.stats = stats or ClientStats()
        self.no_leader_is_definite = no_leader_is_definite

    def _done(self, op: Operation, status: Status, output: object = None, err: str = "") -> Status:
        if status == "ok":
            self.rec.ok(op, output)
        elif status == "fail":
            self.rec.fail(op)
        else:
            self.rec.info(op)
            self.process = next(self._ids)  # the op stays open forever for the checker
        if err:
            self.rec.note(op, err)
        self.stats.counts[(op.kind, status)] += 1
        return status

    def _write_failed(self, op: Operation, e: KVError) -> Status:
        outcome = e.write_outcome(no_leader_is_definite=self.no_leader_is_definite)
        return self._done(op, outcome, err=str(e))

    def read(self, key: str) -> tuple[Status, str | None]:
        op = self.rec.invoke(self.process, key, "read")
        try:
            entry = self.kv.get(key)
        except KVError as e:
            return self._done(op, "fail", err=str(e)), None  # a read changes nothing
        value = entry.text if entry is not None else None
        return self._done(op, "ok", value), value

    def write(self, key: str, value: str) -> Status:
        op = self.rec.invoke(self.process, key, "write", value)
        try:
            applied = self.kv.put(key, value)
        except KVError as e:
            return self._write_failed(op, e)
        if not applied:
            self.stats.anomalies.append(f"plain PUT {key}={value} via {self.kv.base} -> false")
            return self._done(op, "info", err="plain PUT answered false")
        return self._done(op, "ok")

    def cas(self, key: str, old: str | None, new: str) -> Status:
        """Index-based CAS. A mismatch is recorded as ok/False (not as "fail"): the consistent
        read that saw another value, or the PUT whose index no longer matched, happened inside
        the op's interval, so "the register did not hold `old`" is a checkable fact."""
        op = self.rec.invoke(self.process, key, "cas", (old, new))
        try:
            entry = self.kv.get(key)
        except KVError as e:
            return self._done(op, "fail", err=f"cas read: {e}")
        current = entry.text if entry is not None else None
        if current != old:
            return self._done(op, "ok", False)
        index = entry.modify_index if entry is not None else 0
        try:
            swapped = self.kv.put(key, new, cas=index)
        except KVError as e:
            return self._write_failed(op, e)
        return self._done(op, "ok", swapped)


class _Threads:
    """n worker threads running `_run(i)` until `stop_event`; stop() joins them, bounded."""

    def __init__(self, n: int, name: str) -> None:
        self.n_threads = n
        self.thread_name = name
        self.stop_event = threading.Event()
        self.crashes: list[str] = []
        self._threads: list[threading.Thread] = []

    def _run(self, i: int) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        for i in range(self.n_threads):
            t = threading.Thread(
                target=self._run, args=(i,), name=f"{self.thread_name}-{i}", daemon=True
            )
            self._threads.append(t)
            t.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """Stop and join; an op in flight is bounded by the client timeout."""
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            raise AssertionError(f"threads did not stop: {stuck}")


class RegisterWorkload(_Threads):
    """Client threads doing random read / write / cas ops on a few keys until stopped."""

    def __init__(
        self,
        clients: Sequence[RegisterClient],
        keys: Sequence[str],
        *,
        seed: int,
        weights: Mapping[str, float] | None = None,
        think: tuple[float, float] = (0.0, 0.02),
    ) -> None:
        super().__init__(len(clients), "jepsen-client")
        self.clients = list(clients)
        self.keys = list(keys)
        self.seed = seed
        self.weights = dict(weights or {"read": 0.4, "write": 0.3, "cas": 0.3})
        self.think = think
        self.last_seen: dict[str, str | None] = dict.fromkeys(self.keys)

    def _run(self, i: int) -> None:
        c = self.clients[i]
        rng = random.Random(self.seed * 1000 + i)
        kinds, w = list(self.weights), list(self.weights.values())
        try:
            while not self.stop_event.is_set():
                key = rng.choice(self.keys)
                kind = rng.choices(kinds, w)[0]
                if kind == "read":
                    status, value = c.read(key)
                    if status == "ok":
                        self.last_seen[key] = value
                elif kind == "write":
                    value = unique_value()
                    if c.write(key, value) == "ok":
                        self.last_seen[key] = value
                else:
                    new = unique_value()
                    if c.cas(key, self.last_seen[key], new) == "ok":
                        self.last_seen[key] = new
                lo, hi = self.think
                if hi > 0:
                    self.stop_event.wait(rng.uniform(lo, hi))
        except Exception as e:  # a harness bug must fail the test, not vanish with the thread
            self.crashes.append(f"client {i}: {e!r}")
            raise


class AckedWriter(_Threads):
    """Threads writing unique keys (prefix/<thread>/<n>) through agents picked at random.

    ``acked`` maps every key whose PUT answered ``true`` to its value; ``ack_times`` holds the
    monotonic times of those answers (to measure write availability).
    """

    def __init__(
        self,
        targets: Callable[[], Sequence[AgentProc]],
        prefix: str,
        *,
        threads: int = 4,
        timeout: float = 3.0,
        seed: int = 0,
        think: float = 0.0,
    ) -> None:
        super().__init__(threads, "writer")
        self.targets = targets
        self.prefix = prefix.rstrip("/")
        self.timeout = timeout
        self.seed = seed
        self.think = think
        self.acked: dict[str, str] = {}
        self.ack_times: list[float] = []
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def _run(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        try:
            for n in itertools.count():
                if self.stop_event.is_set():
                    return
                targets = [a for a in self.targets() if a.running]
                if not targets:
                    self.stop_event.wait(0.05)
                    continue
                agent = rng.choice(targets)
                key = f"{self.prefix}/{i}/{n}"
                value = unique_value(f"w{i}-")
                try:
                    ok = KVClient(agent.http_base, self.timeout).put(key, value)
                except KVError as e:
                    with self._lock:
                        self.outcomes[e.write_outcome()] += 1
                        if len(self.errors) < 200:
                            self.errors.append(f"{time.monotonic():.3f} {agent.name}: {e}")
                    self.stop_event.wait(0.05)
                    continue
                with self._lock:
                    if ok:
                        self.acked[key] = value
                        self.ack_times.append(time.monotonic())
                        self.outcomes["ok"] += 1
                    else:
                        self.outcomes["false"] += 1
                if self.think:
                    self.stop_event.wait(self.think)
        except Exception as e:
            self.crashes.append(f"writer {i}: {e!r}")
            raise


# ----- starting Raft clusters ------------------------------------------------------------------


def raft_args(expect: int, stabilization: str = "2s", retry_interval: str = "1s") -> list[str]:
    """Agent flags for a --bootstrap-expect cluster with fast autopilot and retry-join."""
    return [
        "--bootstrap-expect", str(expect), "--server-stabilization-time", stabilization,
        "--retry-interval", retry_interval,
    ]  # fmt: skip


def use_retry_join(agents: Sequence[AgentProc]) -> None:
    """Every agent retry-joins all the others instead of --join'ing the first one, so any of
    them can be (re)started while any other is down."""
    for a in agents:
        a.join = []
        a.retry_join = [b.serf_addr for b in agents if b is not a]


def start_all(agents: Sequence[AgentProc], ready_timeout: float = 30.0) -> None:
    """Start every agent at once, then wait until each serves HTTP."""
    for a in agents:
        a.start()
    for a in agents:
        a.wait_ready(ready_timeout)

"""Start and drive real ``meshnode agent`` and stock ``serf agent`` processes in tests.

    from tests.harness.agents import LocalCluster, wait_until

    with LocalCluster(3, tmp_path) as c:          # 127.0.0.2..4, free ports, 2 and 3 join 1
        c.start()                                  # seed first, then the rest; all ready
        c.wait_converged(timeout=15)               # every agent sees 3 alive members
        status, body = c[0].http("GET", "/v1/agent/self")
        c[2].kill9()
        wait_until(lambda: c[0].member_status("node3") == STATUS_FAILED, 15, desc="node3 failed")

``NetnsAgentCluster(netns, tmp_path)`` does the same with one agent per host of a
``NetnsCluster`` (bind and client address ``{net}.i``, default ports), reachable over HTTP
from the test process through the bridge.

Agents run as ``python -m node agent ...`` with this interpreter (no PATH setup), stdout and
stderr go to ``<workdir>/<name>/agent.log``, data to ``<workdir>/<name>/data``. Everything
started here is killed by ``close()``/``stop()``, by an atexit hook, and (for processes
started from the main thread) by the kernel if the test process dies (PR_SET_PDEATHSIG).
Every process is recorded so that a pytest hook can print log tails of failed tests:
``registry_mark()`` before the test, ``format_logs(since=mark)`` after.

``SerfProc`` wraps ``/usr/bin/serf agent`` (``-log-level=debug -profile=lan``) for interop
tests; ``members()`` and ``event()`` go through the serf CLI's RPC client.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self, TypeVar

from tests.harness.netns import NetnsCluster

__all__ = [
    "STATUS_ALIVE",
    "STATUS_FAILED",
    "STATUS_LEAVING",
    "STATUS_LEFT",
    "AgentCluster",
    "AgentPorts",
    "AgentProc",
    "GiveUp",
    "LocalCluster",
    "NetnsAgentCluster",
    "SerfProc",
    "allocate_ports",
    "format_logs",
    "free_port",
    "registry_mark",
    "serf_bin",
    "wait_until",
]

#: Consul member Status codes (/v1/agent/members)
STATUS_ALIVE, STATUS_LEAVING, STATUS_LEFT, STATUS_FAILED = 1, 2, 3, 4

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PORTS = {"serf": 8301, "server": 8300, "http": 8500, "dns": 8600}

T = TypeVar("T")


class GiveUp(Exception):
    """Raised by a wait_until predicate to stop waiting at once (e.g. the process died)."""


def wait_until(
    predicate: Callable[[], T], timeout: float, interval: float = 0.1, desc: str = "condition"
) -> T:
    """Poll predicate until it returns something truthy and return that.

    Exceptions count as "not yet", except GiveUp, which propagates. On timeout the
    AssertionError names desc and the last value (or exception) seen, so a failing test
    says what it was waiting for.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except GiveUp:
            raise
        except Exception as e:  # a not-yet-listening agent raises; keep polling
            last = e
        else:
            if value:
                return value
            last = value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {desc}; last: {last!r}")
        time.sleep(interval)


# ----- process bookkeeping -----


class _Logged(Protocol):
    name: str
    log_path: Path

    def log_tail(self, lines: int = ...) -> str: ...
    def _reap(self) -> None: ...


_registry: list[_Logged] = []


def registry_mark() -> int:
    """Position in the process registry; pass to format_logs() to get only later processes."""
    return len(_registry)


def format_logs(since: int = 0, lines: int = 60) -> str:
    """Log tails of every agent/serf process created after mark `since` (and started)."""
    parts = []
    for proc in _registry[since:]:
        if not proc.log_path.exists():
            continue
        parts.append(f"----- {type(proc).__name__} {proc.name} ({proc.log_path}) -----")
        parts.append(proc.log_tail(lines))
    return "\n".join(parts)


@atexit.register
def _reap_all() -> None:
    for proc in _registry:
        with contextlib.suppress(Exception):
            proc._reap()


_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not glibc/Linux
    _prctl = None


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGKILL the child if the test process dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _popen(
    argv: Sequence[str],
    log: IO[bytes],
    *,
    cwd: Path,
    env: Mapping[str, str],
    netns: NetnsCluster | None,
    host: int | None,
) -> subprocess.Popen[bytes]:
    # preexec_fn is only safe-ish (and PDEATHSIG only meaningful) from the main thread:
    # the signal fires when the *thread* that forked exits.
    main = threading.current_thread() is threading.main_thread()
    kw: dict[str, Any] = {
        "stdin": subprocess.DEVNULL,
        "stdout": log,
        "stderr": subprocess.STDOUT,
        "cwd": str(cwd),
        "env": dict(env),
        "preexec_fn": _die_with_parent if main else None,
    }
    if netns is not None:
        if host is None:
            raise ValueError("a netns process needs a host index")
        return netns.popen(host, argv, **kw)
    return subprocess.Popen(list(argv), **kw)


def _stop(popen: subprocess.Popen[bytes] | None, sig: int | None, timeout: float) -> int | None:
    """Send sig (plus SIGCONT so a paused process can act on it), wait, then SIGKILL.

    sig=None only waits: the signal was already sent (a second SIGTERM forces an agent out
    without its graceful leave)."""
    if popen is None:
        return None
    if popen.poll() is None:
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(sig)
                popen.send_signal(signal.SIGCONT)
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            popen.wait(timeout=10)
    return popen.returncode


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(text.splitlines()[-lines:])


# ----- ports -----

_handed_out: set[tuple[str, int]] = set()


def free_port(ip: str, *, udp: bool = True) -> int:
    """A port free for TCP (and UDP when udp=True) on ip, never handed out twice by us."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            port = int(s.getsockname()[1])
        if (ip, port) in _handed_out:
            continue
        if udp:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind((ip, port))
            except OSError:
                continue
        _handed_out.add((ip, port))
        return port
    raise RuntimeError(f"no free port found on {ip}")


@dataclass(frozen=True)
class AgentPorts:
    serf: int = DEFAULT_PORTS["serf"]
    server: int = DEFAULT_PORTS["server"]
    http: int = DEFAULT_PORTS["http"]
    dns: int = DEFAULT_PORTS["dns"]


def allocate_ports(ip: str) -> AgentPorts:
    """Distinct free ports on ip (serf and dns free for both TCP and UDP)."""
    while True:  # each probe releases its port, so two probes can return the same one
        ports = AgentPorts(
            serf=free_port(ip), server=free_port(ip, udp=False), http=free_port(ip, udp=False),
            dns=free_port(ip),
        )  # fmt: skip
        if len({ports.serf, ports.server, ports.http, ports.dns}) == 4:
            return ports


# ----- meshnode agent -----

_no_proxy_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AgentProc:
    """One ``meshnode agent`` process; files live in ``<workdir>/<name>/``."""

    def __init__(
        self,
        name: str,
        bind: str,
        workdir: Path,
        *,
        ports: AgentPorts | None = None,
        client: str | None = None,
        advertise: str | None = None,
        join: Iterable[str] = (),
        retry_join: Iterable[str] = (),
        encrypt: str | None = None,
        discover: str | None = None,
        config_files: Iterable[Path | str] = (),
        dev: bool = False,
        log_json: bool = False,
        log_level: str | None = "debug",
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        netns: NetnsCluster | None = None,
        host: int | None = None,
    ) -> None:
        """ports=None: default ports inside a netns (own IP), fresh free ones on loopback."""
        self.name = name
        self.bind = bind
        self.client = client or bind
        self.advertise = advertise
        self.ports = ports or (AgentPorts() if netns is not None else allocate_ports(bind))
        self.join = list(join)
        self.retry_join = list(retry_join)
        self.encrypt = encrypt
        self.discover = discover
        self.config_files = [str(f) for f in config_files]
        self.dev = dev
        self.log_json = log_json
        self.log_level = log_level
        self.extra_args = list(extra_args)
        self.netns = netns
        self.host = host
        self.dir = Path(workdir) / name
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "agent.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        _registry.append(self)

    @property
    def serf_addr(self) -> str:
        """host:port other agents join."""
        return f"{self.advertise or self.bind}:{self.ports.serf}"

    @property
    def http_base(self) -> str:
        return f"http://{self.client}:{self.ports.http}"

    def argv(self) -> list[str]:
        a = [
            sys.executable, "-m", "node", "agent",
            "--node", self.name, "--data-dir", str(self.data_dir), "--bind", self.bind,
            "--client", self.client,
            "--serf-port", str(self.ports.serf), "--server-port", str(self.ports.server),
            "--http-port", str(self.ports.http), "--dns-port", str(self.ports.dns),
        ]  # fmt: skip
        if self.advertise:
            a += ["--advertise", self.advertise]
        for j in self.join:
            a += ["--join", j]
        for j in self.retry_join:
            a += ["--retry-join", j]
        if self.encrypt:
            a += ["--encrypt", self.encrypt]
        if self.discover:
            a += ["--discover", self.discover]
        for f in self.config_files:
            a += ["--config-file", f]
        if self.dev:
            a.append("--dev")
        if self.log_json:
            a.append("--log-json")
        if self.log_level:
            a += ["--log-level", self.log_level]
        return a + self.extra_args

    def start(self) -> AgentProc:
        """Start the process (again, after a stop: same data dir, ports and log file)."""
        if self.running:
            raise RuntimeError(f"agent {self.name} is already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._log is not None:
            self._log.close()
        self._log = self.log_path.open("ab")
        self._log.write(f"=== harness: starting {' '.join(self.argv())}\n".encode())
        self._log.flush()
        self.popen = _popen(
            self.argv(), self._log, cwd=self.dir, env=self.env, netns=self.netns, host=self.host
        )
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"agent {self.name} was never started")
        return self.popen.pid

    def wait_ready(self, timeout: float = 30.0) -> Any:
        """Wait until GET /v1/agent/self answers 200; returns its body. Fails fast on exit."""

        def ready() -> Any:
            if self.popen is not None and self.popen.poll() is not None:
                raise _Exited(self.popen.returncode)
            status, body = self.http("GET", "/v1/agent/self", timeout=1.0)
            return body if status == 200 else None

        try:
            return wait_until(ready, timeout, 0.1, f"agent {self.name} HTTP ready")
        except _Exited as e:
            raise AssertionError(
                f"agent {self.name} exited with rc {e.rc} before it was ready; log tail:\n"
                + self.log_tail()
            ) from None
        except AssertionError as e:
            raise AssertionError(f"{e}\nlog tail of {self.name}:\n{self.log_tail()}") from None

    def http(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float = 3.0,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, Any]:
        """One HTTP request to the agent's API: (status, parsed JSON or text).

        body: bytes/str sent as is, anything else JSON-encoded. HTTP errors are returned as
        statuses; connection errors raise OSError.
        """
        data: bytes | None
        if body is None:
            data = None
        elif isinstance(body, bytes):
            data = body
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = json.dumps(body).encode()
        req = urllib.request.Request(
            self.http_base + path, data=data, method=method.upper(), headers=dict(headers or {})
        )
        if data is not None and not req.has_header("Content-type"):
            req.add_header("Content-Type", "application/json")
        try:
            with _no_proxy_opener.open(req, timeout=timeout) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, _decode(e.read())

    def members(self) -> list[dict[str, Any]]:
        """GET /v1/agent/members (Consul shape: Name, Addr, Port, Tags, Status)."""
        status, body = self.http("GET", "/v1/agent/members")
        if status != 200 or not isinstance(body, list):
            raise AssertionError(f"{self.name}: /v1/agent/members -> {status} {body!r}")
        return body

    def member_status(self, name: str) -> int | None:
        """Status code this agent has for member name, or None if it does not know it."""
        for m in self.members():
            if m.get("Name") == name:
                return int(m["Status"])
        return None

    def alive_members(self) -> set[str]:
        return {str(m["Name"]) for m in self.members() if m.get("Status") == STATUS_ALIVE}

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Send sig (None: it was sent already), wait up to timeout, then SIGKILL; returns the
        exit code."""
        rc = _stop(self.popen, sig, timeout)
        self._close_log()
        return rc

    def kill9(self) -> int | None:
        """Crash the agent (SIGKILL), no chance to leave."""
        return self.stop(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the agent hangs while its sockets stay open."""
        if self.running and self.popen is not None:
            self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running and self.popen is not None:
            self.popen.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def _reap(self) -> None:
        self.stop(signal.SIGKILL, timeout=2)

    def __repr__(self) -> str:
        return f"AgentProc({self.name!r}, bind={self.bind!r}, http={self.ports.http})"


class _Exited(GiveUp):
    def __init__(self, rc: int | None) -> None:
        super().__init__(rc)
        self.rc = rc


def _decode(raw: bytes) -> Any:
    text = raw.decode(errors="replace")
    if not text.strip():
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


# ----- clusters of agents -----


class AgentCluster:
    """A list of AgentProc where agents[0] is the seed the others --join."""

    def __init__(self) -> None:
        self.agents: list[AgentProc] = []

    def __getitem__(self, i: int) -> AgentProc:
        return self.agents[i]

    def __len__(self) -> int:
        return len(self.agents)

    def __iter__(self) -> Iterator[AgentProc]:
        return iter(self.agents)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self, ready_timeout: float = 30.0) -> Self:
        """Start the seed, wait until it serves HTTP, then start the rest and wait for all."""
        if not self.agents:
            return self
        self.agents[0].start().wait_ready(ready_timeout)
        for a in self.agents[1:]:
            a.start()
        for a in self.agents[1:]:
            a.wait_ready(ready_timeout)
        return self

    def wait_converged(self, timeout: float = 30.0, names: Iterable[str] | None = None) -> None:
        """Wait until every running agent sees exactly `names` (default: all) alive."""
        want = set(names) if names is not None else {a.name for a in self.agents}

        def converged() -> bool:
            views = {a.name: sorted(a.alive_members()) for a in self.agents if a.running}
            if all(set(v) == want for v in views.values()):
                return True
            raise ValueError(f"alive members seen by each agent: {views}")

        wait_until(converged, timeout, 0.2, f"all agents to see {sorted(want)} alive")

    def close(self) -> None:
        """Stop every agent: SIGTERM to all at once, then wait, then SIGKILL leftovers."""
        for a in self.agents:
            if a.running and a.popen is not None:
                with contextlib.suppress(ProcessLookupError):
                    a.popen.send_signal(signal.SIGTERM)
                    a.popen.send_signal(signal.SIGCONT)
        for a in self.agents:
            a.stop(None, timeout=5.0)

    def logs(self, lines: int = 60) -> str:
        return "\n".join(f"----- {a.name} -----\n{a.log_tail(lines)}" for a in self.agents)


class LocalCluster(AgentCluster):
    """n agents on 127.0.0.{2..n+1}, each with its own free ports; node1 is the seed."""

    def __init__(
        self, n: int, workdir: Path, *, name_prefix: str = "node", **agent_kwargs: Any
    ) -> None:
        super().__init__()
        if not 1 <= n <= 250:
            raise ValueError(f"n must be 1..250, got {n}")
        for i in range(n):
            ip = f"127.0.0.{i + 2}"
            join = [self.agents[0].serf_addr] if i else []
            self.agents.append(
                AgentProc(f"{name_prefix}{i + 1}", ip, workdir, join=join, **agent_kwargs)
            )


class NetnsAgentCluster(AgentCluster):
    """One agent per NetnsCluster host (bind/client = host ip, default ports); host 1 seeds."""

    def __init__(
        self,
        netns: NetnsCluster,
        workdir: Path,
        *,
        hosts: Iterable[int] | None = None,
        name_prefix: str = "node",
        **agent_kwargs: Any,
    ) -> None:
        super().__init__()
        self.netns = netns
        for k, i in enumerate(hosts if hosts is not None else netns.hosts):
            join = [self.agents[0].serf_addr] if k else []
            self.agents.append(
                AgentProc(
                    f"{name_prefix}{i}", netns.ip(i), workdir, join=join, netns=netns, host=i,
                    **agent_kwargs,
                )
            )  # fmt: skip

    def agent_on(self, host: int) -> AgentProc:
        """The agent running on netns host index `host`."""
        for a in self.agents:
            if a.host == host:
                return a
        raise KeyError(host)


# ----- stock serf -----

SERF_BIN = "/usr/bin/serf"


def serf_bin() -> str | None:
    """Path of the serf binary, or None if it is not installed."""
    return SERF_BIN if os.access(SERF_BIN, os.X_OK) else shutil.which("serf")


class SerfProc:
    """A stock ``serf agent`` (debug log, lan profile); CLI calls go to its rpc_addr."""

    def __init__(
        self,
        name: str,
        bind: str,
        rpc_addr: str,
        workdir: Path,
        *,
        tags: Mapping[str, str] | None = None,
        encrypt: str | None = None,
        join: Iterable[str] = (),
        extra_args: Iterable[str] = (),
        netns: NetnsCluster | None = None,
        host: int | None = None,
    ) -> None:
        """bind and rpc_addr are 'ip:port'."""
        binary = serf_bin()
        if binary is None:
            raise RuntimeError("serf binary not found: apt-get install -y serf")
        self.binary = binary
        self.name = name
        self.bind = bind
        self.rpc_addr = rpc_addr
        self.tags = dict(tags or {})
        self.encrypt = encrypt
        self.join = list(join)
        self.extra_args = list(extra_args)
        self.netns = netns
        self.host = host
        self.dir = Path(workdir) / name
        self.log_path = self.dir / "serf.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        _registry.append(self)

    def argv(self) -> list[str]:
        a = [
            self.binary, "agent", f"-node={self.name}", f"-bind={self.bind}",
            f"-rpc-addr={self.rpc_addr}", "-log-level=debug", "-profile=lan",
        ]  # fmt: skip
        for k, v in self.tags.items():
            a += ["-tag", f"{k}={v}"]
        if self.encrypt:
            a.append(f"-encrypt={self.encrypt}")
        a += [f"-join={j}" for j in self.join]
        return a + self.extra_args

    def start(self) -> SerfProc:
        if self.running:
            raise RuntimeError(f"serf {self.name} is already running")
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._log is not None:
            self._log.close()
        self._log = self.log_path.open("ab")
        self.popen = _popen(
            self.argv(), self._log, cwd=self.dir, env=os.environ, netns=self.netns, host=self.host
        )
        return self

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def cli(self, *args: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
        """Run `serf <args> -rpc-addr=...` (inside the agent's netns host when it has one)."""
        cmd, rest = args[0], list(args[1:])
        argv = [self.binary, cmd, f"-rpc-addr={self.rpc_addr}", *rest]
        if self.netns is not None and self.host is not None:
            return self.netns.run(self.host, argv, timeout=timeout)
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until the RPC endpoint answers `serf members`."""

        def ready() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                raise _Exited(self.popen.returncode)
            return self.cli("members").returncode == 0

        try:
            wait_until(ready, timeout, 0.1, f"serf {self.name} RPC ready")
        except _Exited as e:
            raise AssertionError(
                f"serf {self.name} exited with rc {e.rc}; log tail:\n{self.log_tail()}"
            ) from None

    def members(self) -> list[dict[str, Any]]:
        """`serf members -format=json`: dicts with name, addr, port, tags, status ('alive'...)."""
        r = self.cli("members", "-format=json")
        if r.returncode != 0:
            raise AssertionError(f"serf members on {self.name} failed: {r.stderr.strip()}")
        return list(json.loads(r.stdout)["members"])

    def member_status(self, name: str) -> str | None:
        for m in self.members():
            if m["name"] == name:
                return str(m["status"])
        return None

    def event(self, name: str, payload: str = "", coalesce: bool = True) -> None:
        """Dispatch a user event through this agent (`serf event`)."""
        args = ["event"] + ([] if coalesce else ["-coalesce=false"]) + [name, payload]
        r = self.cli(*args)
        if r.returncode != 0:
            raise AssertionError(f"serf event on {self.name} failed: {r.stderr.strip()}")

    def stop(self, leave: bool = False, timeout: float = 10.0) -> int | None:
        """SIGTERM (no leave: peers see a failure) or SIGINT (graceful leave), then SIGKILL."""
        rc = _stop(self.popen, signal.SIGINT if leave else signal.SIGTERM, timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def kill9(self) -> int | None:
        rc = _stop(self.popen, signal.SIGKILL, 5.0)
        if self._log is not None:
            self._log.close()
            self._log = None
        return rc

    def pause(self) -> None:
        if self.running and self.popen is not None:
            self.popen.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running and self.popen is not None:
            self.popen.send_signal(signal.SIGCONT)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return _tail(self.log_path, lines)

    def _reap(self) -> None:
        self.stop(timeout=2)

    def __repr__(self) -> str:
        return f"SerfProc({self.name!r}, bind={self.bind!r}, rpc={self.rpc_addr!r})"

"""meshnode agents versus stock ``serf agent`` processes, same N, same LAN timings, one run.

    .venv/bin/python bench/gossip_vs_serf.py            # N=16 and N=48, 3 reps each (< 10 min)
    .venv/bin/python bench/gossip_vs_serf.py --quick    # N=16, 1 rep (~1 min)
    .venv/bin/python bench/gossip_vs_serf.py --n 48 --reps 5 --systems meshnode

Each rep of each system starts a fresh cluster (only one system's agents are alive at a time, so
the loopback counters and the two cores belong to it), in ABBA order across reps. As root, the
script re-runs itself in a private network namespace (--netns) so that lo carries only its own
agents' traffic, not that of test suites running on the same machine.

* N-1 agents form a cluster (all join the first one; meshnode agents start 8 at a time).
* (a) a fresh agent is started un-joined; t0 = the join call (meshnode: ``PUT
  /v1/agent/join/<seed>`` on its HTTP API; serf: the ``join`` msgpack RPC). Every agent is
  polled every 50 ms until each one lists all N alive.
* (b) a random older agent (the same index for both systems) is SIGKILLed; t0 = the kill. The
  other agents are polled every 100 ms until each reports it failed (meshnode Status 4, serf
  "failed").
* (c)/(d) polling stops and clients disconnect; after 2 s, a window of --idle seconds (10) with
  no requests at all: CPU % of one core and RSS per agent (/proc/<pid>/stat, status) and
  loopback rx bytes/s divided by the live agents (/proc/net/dev ``lo``).

Goals (printed PASS/FAIL; the exit status is 0 either way, this is a measurement):
convergence and detection within 1.2x of serf, idle CPU at most 2x serf's, RSS at most 60 MB.
Every process started here is killed by PID at the end, on error and on Ctrl-C.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import atexit
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import aiohttp  # noqa: E402
import msgpack  # noqa: E402

from bench.runner import die_with_parent, log  # noqa: E402
from bench.stats import fmt3, med  # noqa: E402
from tests.harness.agents import (  # noqa: E402
    STATUS_ALIVE,
    STATUS_FAILED,
    AgentProc,
    free_port,
)

SERF = "/usr/bin/serf"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SETTLE_AFTER_FORM = 2.0
SETTLE_BEFORE_IDLE = 2.0

#: serf anchor (/work/shared/reference/anchors.md section 2), for orientation only
ANCHOR: dict[int, dict[str, float]] = {
    16: {"conv": 0.365, "det_all": 6.65, "cpu": 0.31, "rss": 14.8, "bps": 346},
    48: {"conv": 0.643, "det_all": 8.50, "cpu": 0.24, "rss": 15.0, "bps": 281},
}
GOAL_CONV_RATIO = 1.2
GOAL_DET_RATIO = 1.2
GOAL_CPU_RATIO = 2.0
GOAL_RSS_MB = 60.0


# ----- process bookkeeping -----------------------------------------------------------------


@dataclass
class Agent:
    name: str
    ip: str
    gossip_addr: str  # "ip:port" that others join
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes] | None = None
    proc: AgentProc | None = None
    http_base: str = ""
    rpc_port: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def kill9(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        if self.proc is not None:
            self.proc.stop(signal.SIGKILL, timeout=2)  # closes the harness's log handle
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None

    def log_tail(self, lines: int = 1) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"<no log: {e}>"
        return "\n".join(text.splitlines()[-lines:])


class Registry:
    """Every agent started by this script, stopped by PID (idempotent; also runs at exit)."""

    def __init__(self) -> None:
        self.agents: dict[int, Agent] = {}

    def add(self, a: Agent) -> Agent:
        self.agents[a.pid] = a
        return a

    def kill(self, a: Agent) -> None:
        a.kill9()
        self.agents.pop(a.pid, None)

    def kill_all(self) -> None:
        for a in list(self.agents.values()):
            if a.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(a.pid, signal.SIGKILL)
        for a in list(self.agents.values()):
            self.kill(a)


REG = Registry()
atexit.register(REG.kill_all)


# ----- /proc readings ----------------------------------------------------------------------


def proc_ticks(pid: int) -> int:
    """utime + stime of the process (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def proc_cpu_ns(pid: int) -> int:
    """On-CPU ns summed over the process's current threads (schedstat): finer than stat's ticks,
    which at 0.2 % of a core over 10 s are only 2 ticks; threads that exit are not counted."""
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(OSError, ValueError, IndexError),
                open(f"/proc/{pid}/task/{tid}/schedstat") as f,
            ):
                total += int(f.read().split()[0])
    return total


def proc_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def descendants(pid: int) -> list[int]:
    """Children of pid, transitively (an agent that forks helpers is charged for them)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            parent[int(d)] = int(s[s.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def lo_rx() -> tuple[int, int]:
    """(bytes, packets) received on lo; every datagram/segment on loopback is counted once."""
    with open("/proc/net/dev") as f:
        for line in f:
            if line.strip().startswith("lo:"):
                v = line.split(":", 1)[1].split()
                return int(v[0]), int(v[1])
    return 0, 0


# ----- the two systems ---------------------------------------------------------------------


class System(abc.ABC):
    label: str

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir

    @abc.abstractmethod
    def start_agent(self, i: int, join: str | None) -> Agent: ...

    @abc.abstractmethod
    async def wait_ready(self, a: Agent, timeout: float) -> None: ...

    @abc.abstractmethod
    async def join(self, a: Agent, addr: str) -> None: ...

    @abc.abstractmethod
    async def alive_names(self, a: Agent) -> set[str]: ...

    @abc.abstractmethod
    async def is_failed(self, a: Agent, name: str) -> bool: ...

    @abc.abstractmethod
    async def close_clients(self) -> None: ...

    def settle_formation(self) -> float:
        return SETTLE_AFTER_FORM


class SerfRPC:
    """Serf's msgpack RPC (handshake, then {Command, Seq} headers with msgpack bodies)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.seq = 0
        self.unpacker = msgpack.Unpacker(raw=False)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        await self.call("handshake", {"Version": 1}, body=False)

    async def _next(self) -> Any:
        assert self.reader is not None
        while True:
            try:
                return next(self.unpacker)
            except StopIteration:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("serf RPC connection closed") from None
                self.unpacker.feed(data)

    async def call(self, cmd: str, req: Any = None, body: bool = True) -> Any:
        assert self.writer is not None
        async with self.lock:
            self.seq += 1
            out: bytes = msgpack.packb({"Command": cmd, "Seq": self.seq})
            if req is not None:
                out += msgpack.packb(req)
            self.writer.write(out)
            hdr = await self._next()
            if hdr.get("Error"):
                raise RuntimeError(f"serf RPC {cmd}: {hdr['Error']}")
            return (await self._next()) if body else None

    async def members_filtered(self, status: str = "", name: str = "") -> list[dict[str, Any]]:
        r = await self.call("members-filtered", {"Tags": {}, "Status": status, "Name": name})
        return list(r["Members"])

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None


class SerfSystem(System):
    """Stock serf agents on 127.0.2.x, driven over the msgpack RPC (the CLI is too slow to poll)."""

    label = "serf"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.rpc: dict[str, SerfRPC] = {}

    def start_agent(self, i: int, join: str | None) -> Agent:
        ip = f"127.0.2.{i + 2}"
        name = f"serf{i:03d}"
        port = free_port(ip)
        rpc_port = free_port(ip, udp=False)
        argv = [
            SERF, "agent", f"-node={name}", f"-bind={ip}:{port}", f"-rpc-addr={ip}:{rpc_port}",
            "-profile=lan", "-log-level=warn",
        ]  # fmt: skip
        if join:
            argv.append(f"-join={join}")
        log_path = self.workdir / f"{name}.log"
        logf = log_path.open("wb")
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            cwd=str(self.workdir), preexec_fn=die_with_parent,
        )  # fmt: skip
        return REG.add(Agent(name, ip, f"{ip}:{port}", popen, log_path, logf, rpc_port=rpc_port))

    async def wait_ready(self, a: Agent, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not a.running():
                raise RuntimeError(f"{a.name} exited: {a.log_tail()}")
            c = SerfRPC(a.ip, a.rpc_port)
            try:
                await c.connect()
            except OSError:
                c.close()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{a.name} RPC not up after {timeout}s") from None
                await asyncio.sleep(0.05)
                continue
            self.rpc[a.name] = c
            return

    async def join(self, a: Agent, addr: str) -> None:
        await self.rpc[a.name].call("join", {"Existing": [addr], "Replay": False})

    async def alive_names(self, a: Agent) -> set[str]:
        return {str(m["Name"]) for m in await self.rpc[a.name].members_filtered(status="alive")}

    async def is_failed(self, a: Agent, name: str) -> bool:
        for m in await self.rpc[a.name].members_filtered(name=name):
            if m["Name"] == name:
                return bool(m["Status"] == "failed")
        return False

    async def close_clients(self) -> None:
        for c in self.rpc.values():
            c.close()
        self.rpc.clear()


class MeshSystem(System):
    """meshnode agents (``python -m node agent``) on 127.0.0.x, driven over the HTTP API."""

    label = "meshnode"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.session: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0),
                timeout=aiohttp.ClientTimeout(total=5.0),
            )
        return self.session

    def start_agent(self, i: int, join: str | None) -> Agent:
        ip = f"127.0.0.{i + 2}"
        name = f"mesh{i:03d}"
        proc = AgentProc(name, ip, self.workdir, join=[join] if join else [], log_level="warn")
        proc.start()
        assert proc.popen is not None
        return REG.add(
            Agent(
                name, ip, proc.serf_addr, proc.popen, proc.log_path, proc=proc,
                http_base=proc.http_base,
            )
        )  # fmt: skip

    async def _get(self, a: Agent, path: str) -> tuple[int, Any]:
        async with self._session().get(a.http_base + path) as r:
            body = await r.read()
            return r.status, (json.loads(body) if r.status == 200 else body)

    async def wait_ready(self, a: Agent, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not a.running():
                raise RuntimeError(f"{a.name} exited rc={a.popen.returncode}: {a.log_tail()}")
            try:
                status, _ = await self._get(a, "/v1/agent/self")
                if status == 200:
                    return
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{a.name} HTTP not up after {timeout}s: {a.log_tail()}")
            await asyncio.sleep(0.1)

    async def join(self, a: Agent, addr: str) -> None:
        async with self._session().put(f"{a.http_base}/v1/agent/join/{addr}") as r:
            text = await r.text()
            if r.status != 200:
                raise RuntimeError(f"join via {a.name} -> {r.status} {text}")

    async def _members(self, a: Agent) -> list[dict[str, Any]]:
        status, body = await self._get(a, "/v1/agent/members")
        if status != 200 or not isinstance(body, list):
            raise RuntimeError(f"{a.name} /v1/agent/members -> {status}")
        return body

    async def alive_names(self, a: Agent) -> set[str]:
        return {str(m["Name"]) for m in await self._members(a) if m["Status"] == STATUS_ALIVE}

    async def is_failed(self, a: Agent, name: str) -> bool:
        return any(
            m["Name"] == name and m["Status"] == STATUS_FAILED for m in await self._members(a)
        )

    async def close_clients(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None


# ----- one repetition ----------------------------------------------------------------------


@dataclass
class Rep:
    system: str
    n: int
    rep: int
    formation: float | None = None
    join_call_ms: float | None = None
    conv: float | None = None
    det_first: float | None = None
    det_median: float | None = None
    det_all: float | None = None
    cpu: float | None = None
    cpu_max: float | None = None
    cpu_ns: float | None = None
    rss: float | None = None
    rss_max: float | None = None
    bps: float | None = None
    pps: float | None = None
    background_bps: float | None = None
    poll_cores_join: float | None = None
    poll_cores_fail: float | None = None
    error: str | None = None
    setup_failed: bool = False
    notes: list[str] = field(default_factory=list)


async def until_all(
    agents: Sequence[Agent],
    pred: Callable[[Agent], Awaitable[bool]],
    t0: float,
    interval: float,
    timeout: float,
) -> dict[str, float]:
    """Poll pred per agent (request, then sleep interval) until true; {name: seconds since t0}."""
    seen: dict[str, float] = {}
    deadline = time.perf_counter() + timeout

    async def one(a: Agent) -> None:
        while time.perf_counter() < deadline:
            try:
                ok = await pred(a)
            except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError):
                ok = False  # a busy agent may drop a poll; it counts as "not yet"
            if ok:
                seen[a.name] = time.perf_counter() - t0
                return
            await asyncio.sleep(interval)

    await asyncio.gather(*(one(a) for a in agents))
    return seen


def agents_cpu_s(agents: Sequence[Agent]) -> float:
    """On-CPU seconds of the given agents (schedstat), to show what the polling costs them."""
    return sum(proc_cpu_ns(a.pid) for a in agents if a.running()) / 1e9


async def run_rep(
    sys_: System, n: int, rep: int, args: argparse.Namespace, rnd: random.Random
) -> Rep:
    r = Rep(sys_.label, n, rep)
    live: list[Agent] = []
    r.setup_failed = True
    try:
        # background loopback traffic from other users of this machine, before we start
        b1, _ = lo_rx()
        await asyncio.sleep(1.0)
        b2, _ = lo_rx()
        r.background_bps = float(b2 - b1)

        # N-1 agents form a cluster
        t_form = time.perf_counter()
        seed = sys_.start_agent(0, None)
        await sys_.wait_ready(seed, 30)
        live.append(seed)
        for lo in range(1, n - 1, args.start_batch):
            batch = [
                sys_.start_agent(i, seed.gossip_addr)
                for i in range(lo, min(lo + args.start_batch, n - 1))
            ]
            live += batch
            for a in batch:
                await sys_.wait_ready(a, 90)
        names = {a.name for a in live}

        async def sees_all(a: Agent) -> bool:
            return names <= await sys_.alive_names(a)

        seen = await until_all(live, sees_all, t_form, 0.1, 90)
        if len(seen) != len(live):
            raise RuntimeError(f"initial {n - 1} agents did not converge in 90 s")
        r.formation = max(seen.values())
        await asyncio.sleep(sys_.settle_formation())

        # (a) a fresh agent joins
        fresh = sys_.start_agent(n - 1, None)
        await sys_.wait_ready(fresh, 30)
        live.append(fresh)
        await asyncio.sleep(0.5)
        names = {a.name for a in live}
        r.setup_failed = False
        c0 = agents_cpu_s(live)
        t0 = time.perf_counter()
        await sys_.join(fresh, seed.gossip_addr)
        r.join_call_ms = (time.perf_counter() - t0) * 1000
        seen = await until_all(live, sees_all, t0, args.join_poll_ms / 1000, 30)
        r.poll_cores_join = (agents_cpu_s(live) - c0) / (time.perf_counter() - t0)
        if len(seen) == len(live):
            r.conv = max(seen.values())
        else:
            r.notes.append(f"join: {len(live) - len(seen)} agents never saw all {n} alive in 30 s")
        await asyncio.sleep(1.0)

        # (b) SIGKILL a random older, non-seed agent
        victim = live[rnd.randrange(1, n - 1)]
        t0 = time.perf_counter()
        os.kill(victim.pid, signal.SIGKILL)
        live.remove(victim)
        REG.kill(victim)  # reap

        async def sees_failed(a: Agent) -> bool:
            return await sys_.is_failed(a, victim.name)

        c0 = agents_cpu_s(live)
        seen = await until_all(live, sees_failed, t0, args.fail_poll_ms / 1000, 60)
        r.poll_cores_fail = (agents_cpu_s(live) - c0) / (time.perf_counter() - t0)
        vals = sorted(seen.values())
        if vals:
            r.det_first = vals[0]
            r.det_median = statistics.median(vals)
        if len(seen) == len(live):
            r.det_all = vals[-1]
        else:
            r.notes.append(f"kill: {len(live) - len(seen)} agents never saw it failed in 60 s")

        # (c)/(d) idle window, nobody polling
        await sys_.close_clients()
        await asyncio.sleep(SETTLE_BEFORE_IDLE)
        pids = {a.pid: [a.pid, *descendants(a.pid)] for a in live}
        t1 = {p: sum(proc_ticks(q) for q in qs) for p, qs in pids.items()}
        ns1 = {p: sum(proc_cpu_ns(q) for q in qs) for p, qs in pids.items()}
        lb1, lp1 = lo_rx()
        s1 = time.perf_counter()
        await asyncio.sleep(args.idle)
        dt = time.perf_counter() - s1
        lb2, lp2 = lo_rx()
        t2 = {p: sum(proc_ticks(q) for q in qs) for p, qs in pids.items()}
        ns2 = {p: sum(proc_cpu_ns(q) for q in qs) for p, qs in pids.items()}
        rss = [sum(proc_rss_kb(q) for q in qs) / 1024 for qs in pids.values()]
        cpu = [(t2[p] - t1[p]) / CLK_TCK / dt * 100 for p in pids]
        r.cpu = sum(cpu) / len(cpu)
        r.cpu_max = max(cpu)
        r.cpu_ns = sum(ns2[p] - ns1[p] for p in pids) / 1e9 / dt * 100 / len(pids)
        r.rss = sum(rss) / len(rss)
        r.rss_max = max(rss)
        r.bps = (lb2 - lb1) / dt / len(live)
        r.pps = (lp2 - lp1) / dt / len(live)
        dead = [a.name for a in live if not a.running()]
        if dead:
            r.notes.append(f"agents exited during the rep: {dead}")
    except Exception as e:  # one broken rep must not lose the others; it is reported
        r.error = f"{type(e).__name__}: {e}"
    finally:
        await sys_.close_clients()
        REG.kill_all()
    log(f"  {describe(r)}")
    return r


def describe(r: Rep) -> str:
    def f(x: float | None, nd: int = 3) -> str:
        return "n/a" if x is None else f"{x:.{nd}f}"

    s = (
        f"{r.system} N={r.n} rep{r.rep}: form {f(r.formation, 2)}s, join call "
        f"{f(r.join_call_ms, 1)}ms, conv {f(r.conv)}s, detect first/median/all "
        f"{f(r.det_first, 2)}/{f(r.det_median, 2)}/{f(r.det_all, 2)}s, idle cpu {f(r.cpu, 2)}% "
        f"(max {f(r.cpu_max, 2)}; schedstat {f(r.cpu_ns, 3)}%), "
        f"rss {f(r.rss, 1)} MB (max {f(r.rss_max, 1)}), "
        f"lo {f(r.bps, 0)} B/s/agent {f(r.pps, 1)} pkt/s/agent, background lo "
        f"{f(r.background_bps, 0)} B/s"
    )
    if r.notes:
        s += f" NOTES: {'; '.join(r.notes)}"
    if r.error:
        s += f" ERROR: {r.error}"
    return s


# ----- report ------------------------------------------------------------------------------


METRICS: list[tuple[str, str, int]] = [
    ("formation", "initial formation of N-1 agents (s)", 2),
    ("join_call_ms", "join call latency (ms)", 1),
    ("conv", "(a) join -> every agent lists all N alive (s)", 3),
    ("det_first", "(b) kill -9 -> first agent reports failed (s)", 2),
    ("det_median", "(b) kill -9 -> median agent reports failed (s)", 2),
    ("det_all", "(b) kill -9 -> every agent reports failed (s)", 2),
    ("cpu", "(c) idle CPU % of one core per agent (mean)", 3),
    ("cpu_max", "(c) idle CPU % busiest agent", 2),
    ("cpu_ns", "(c) idle CPU % per agent, schedstat (ns res.)", 3),
    ("rss", "(c) RSS MB per agent (mean)", 1),
    ("rss_max", "(c) RSS MB largest agent", 1),
    ("bps", "(d) loopback rx bytes/s per agent", 0),
    ("pps", "(d) loopback rx packets/s per agent", 1),
    ("background_bps", "loopback B/s before start (other users)", 0),
    ("poll_cores_join", "agents' CPU (cores) while polled in (a)", 2),
    ("poll_cores_fail", "agents' CPU (cores) while polled in (b)", 2),
]
ANCHOR_KEYS = {"conv": "conv", "det_all": "det_all", "cpu": "cpu", "rss": "rss", "bps": "bps"}


def report(results: list[Rep], ns: Sequence[int], systems: Sequence[str]) -> None:
    print()
    print(
        f"# gossip_vs_serf {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} CPUs; "
        "figures are median [min..max] over reps"
    )
    for n in ns:
        mine = [r for r in results if r.n == n]
        vals: dict[str, dict[str, list[float | None]]] = {
            s: {k: [getattr(r, k) for r in mine if r.system == s] for k, _, _ in METRICS}
            for s in systems
        }
        reps = {s: sum(1 for r in results if r.system == s and r.n == n) for s in systems}
        print()
        print(f"## N={n} (reps: {', '.join(f'{s} {reps[s]}' for s in systems)})")
        head = f"{'metric':<48} | " + " | ".join(f"{s:<30}" for s in systems)
        if "meshnode" in systems and "serf" in systems:
            head += " | mesh/serf"
        head += " | serf anchor"
        print(head)
        print("-" * len(head))
        for key, label, nd in METRICS:
            row = f"{label:<48} | " + " | ".join(f"{fmt3(vals[s][key], nd):<30}" for s in systems)
            if "meshnode" in systems and "serf" in systems:
                a, b = med(vals["meshnode"][key]), med(vals["serf"][key])
                row += " | " + (f"{a / b:8.2f}x" if a is not None and b else "      n/a")
            anc = ANCHOR.get(n, {}).get(ANCHOR_KEYS.get(key, ""), None)
            row += " | " + (f"{anc:g}" if anc is not None else "")
            print(row)
        errs = [r for r in results if r.n == n and (r.error or r.notes)]
        for r in errs:
            print(f"  note: {r.system} rep{r.rep}: {r.error or ''} {'; '.join(r.notes)}")
        if "meshnode" in systems and "serf" in systems:
            print_goals(n, vals)


def print_goals(n: int, vals: dict[str, dict[str, list[float | None]]]) -> None:
    def ratio(key: str) -> float | None:
        a, b = med(vals["meshnode"][key]), med(vals["serf"][key])
        return a / b if a is not None and b else None

    def verdict(ok: bool | None) -> str:
        return "n/a " if ok is None else ("PASS" if ok else "FAIL")

    print(f"goals N={n}:")
    for key, what, limit in (
        ("conv", "convergence (a) within 1.2x serf", GOAL_CONV_RATIO),
        ("det_all", "detection (b, every agent) within 1.2x serf", GOAL_DET_RATIO),
        ("cpu", "idle CPU at most 2x serf", GOAL_CPU_RATIO),
    ):
        q = ratio(key)
        ok = None if q is None else q <= limit
        shown = "n/a" if q is None else f"{q:.2f}x"
        print(f"  {verdict(ok)}  {what:<46} measured {shown} (limit {limit:g}x)")
    rss = med(vals["meshnode"]["rss_max"])
    ok = None if rss is None else rss <= GOAL_RSS_MB
    shown = "n/a" if rss is None else f"{rss:.1f} MB"
    print(f"  {verdict(ok)}  {'RSS at most 60 MB per agent (largest agent)':<46} measured {shown}")


# ----- main --------------------------------------------------------------------------------


async def amain(args: argparse.Namespace, workdir: Path, results: list[Rep]) -> None:
    """Append one Rep per (N, rep, system) to results (kept on abort for a partial report)."""
    ns: list[int] = args.n
    classes: dict[str, type[System]] = {"serf": SerfSystem, "meshnode": MeshSystem}
    t_start = time.monotonic()
    for n in ns:
        for rep in range(args.reps):
            order = list(args.systems) if rep % 2 == 0 else list(reversed(args.systems))
            for name in order:
                d = workdir / f"{name}-n{n}-rep{rep}"
                d.mkdir(parents=True)
                sys_ = classes[name](d)
                log(f"[{time.monotonic() - t_start:6.1f}s] {name} N={n} rep {rep} ...")
                victim_seed = n * 1000 + rep  # the same victim index for both systems
                r = await run_rep(sys_, n, rep, args, random.Random(victim_seed))
                if r.error and r.setup_failed:
                    # a cluster that never formed measured nothing: say so, and try once more
                    log(f"  retrying {name} N={n} rep {rep} once")
                    d = workdir / f"{name}-n{n}-rep{rep}-retry"
                    d.mkdir(parents=True)
                    r2 = await run_rep(classes[name](d), n, rep, args, random.Random(victim_seed))
                    r2.notes.insert(0, f"first attempt failed during setup: {r.error}")
                    r = r2
                results.append(r)


def can_unshare() -> bool:
    return os.geteuid() == 0 and bool(shutil.which("unshare")) and bool(shutil.which("ip"))


def reexec_in_private_netns() -> None:
    """Run this script again inside a new network namespace whose lo only carries our traffic.

    Other users of the machine (test suites) also talk over the host's lo, which would be
    charged to our agents in (d). The namespace disappears when its last process exits.
    """
    if os.environ.get("MESHBENCH_IN_NETNS") == "1":
        return
    if not can_unshare():
        raise SystemExit("--netns private needs root, unshare (util-linux) and ip (iproute2)")
    env = {**os.environ, "MESHBENCH_IN_NETNS": "1"}
    argv = [
        "unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
        sys.executable, *sys.argv,
    ]  # fmt: skip
    os.execvpe("unshare", argv, env)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, action="append", help="cluster size (repeatable; 16 and 48)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--idle", type=float, default=10.0, help="idle window seconds (10)")
    ap.add_argument("--quick", action="store_true", help="N=16, 1 rep")
    ap.add_argument("--systems", default="serf,meshnode", help="comma list of serf,meshnode (both)")
    ap.add_argument(
        "--netns", choices=("auto", "private", "host"), default="auto",
        help="private: run in a fresh network namespace (root) so lo counts only our agents;\n"
        "auto (default): private when root with unshare and ip, else host",
    )  # fmt: skip
    ap.add_argument(
        "--join-poll-ms", type=float, default=50.0, help="(a) poll interval per agent (50)"
    )
    ap.add_argument(
        "--fail-poll-ms", type=float, default=100.0, help="(b) poll interval per agent (100)"
    )
    ap.add_argument(
        "--start-batch", type=int, default=8,
        help="start the initial agents this many at a time, each batch ready before the next\n"
        "(8; 48 Python agents starting at once on 2 cores is a start-up storm)",
    )  # fmt: skip
    ap.add_argument("--budget", type=float, default=900.0, help="abort after this many seconds")
    args = ap.parse_args(argv)
    if args.quick:
        args.n = args.n or [16]
        args.reps = 1
    args.n = args.n or [16, 48]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    for s in args.systems:
        if s not in ("serf", "meshnode"):
            ap.error(f"unknown system {s!r}")
    for n in args.n:
        if not 3 <= n <= 200:
            ap.error("--n must be 3..200")
    if "serf" in args.systems and not os.access(SERF, os.X_OK):
        ap.error(f"{SERF} not found (apt-get install serf) - or use --systems meshnode")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.netns == "private" or (args.netns == "auto" and can_unshare()):
        reexec_in_private_netns()

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    workdir = Path(tempfile.mkdtemp(prefix="meshbench-gvs-"))
    t0 = time.monotonic()
    results: list[Rep] = []
    aborted = False
    try:
        asyncio.run(asyncio.wait_for(amain(args, workdir, results), args.budget))
    except (KeyboardInterrupt, TimeoutError) as e:
        log(f"aborted ({type(e).__name__} {e}); cleaning up; partial results follow")
        aborted = True
    finally:
        REG.kill_all()
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, args.n, args.systems)
    if aborted:
        print("# ABORTED before all reps ran (see stderr)")
        return 3
    lo_note = "private netns" if os.environ.get("MESHBENCH_IN_NETNS") == "1" else "host netns"
    print(
        f"# {time.monotonic() - t0:.0f}s total; idle window {args.idle:g}s; loopback counters "
        f"from the {lo_note}; serf: {SERF} -profile=lan; meshnode: {sys.executable} -m node agent"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

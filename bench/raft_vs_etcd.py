"""meshnode's Raft-backed KV versus a 3-member etcd cluster, same load generator, one run.

    .venv/bin/python bench/raft_vs_etcd.py                      # both systems, 2 reps (~3 min)
    .venv/bin/python bench/raft_vs_etcd.py --duration 5 --reps 1 --only etcd
    .venv/bin/python bench/raft_vs_etcd.py --json out.json --profile /tmp/prof

Both clusters have 3 members on loopback (127.0.0.2-4), keep their log on /tmp with fsync on
every commit (etcd's default; meshnode's Raft log fdatasyncs every batch) and use the same Raft
timing: heartbeat 100 ms, election timeout 1 s (etcd --heartbeat-interval 100
--election-timeout 1000; meshnode's are fixed at those values). Only one system runs at a time;
reps alternate the order (etcd, meshnode, meshnode, etcd, ...) so drift hits both alike.

Load: wrk with the Lua scripts in bench/lua/ (as in the etcd anchor, which used etcd's v3 JSON
gateway because the Debian package has no `benchmark` tool). Per rep and system:
* put, 1 connection   (wrk -t1 -c1):  etcd POST /v3/kv/put, meshnode PUT /v1/kv/bench/<key>;
  sequential 12-byte / 18-char keys, 256-byte values;
* put, 64 connections (wrk -t2 -c64);
* linearizable read of one key, 64 connections: etcd POST /v3/kv/range (serializable=false, the
  default), meshnode GET /v1/kv/<key>?consistent.
By default the load goes to the current leader of each system (--target leader, as the anchor
did); --target spread points wrk's threads at all three members (-t3 -c63, 21 connections per
member; followers forward), the 1-connection run still goes to the leader.
After each put run the keys under the run's prefix are counted: every acknowledged write must
be there (at most one more per connection: requests in flight when wrk stopped).

Failover (--failovers per rep): SIGKILL the leader (found through etcd's maintenance status /
meshnode's /v1/status/leader and /v1/operator/raft/configuration); t0 = the kill. Both survivors
are polled every 5 ms for a new leader, and 4 writer loops per survivor (started 0.125 s apart,
0.5 s client timeout each, as in the anchor) write through it until one write is acknowledged.
The killed member is then restarted on its data dir and the cluster must heal before the next.
Then as many hung-leader runs: the leader gets SIGSTOP instead (its sockets stay open, so only
the election timeout reveals it, as with a vanished host), is measured the same way, and gets
SIGCONT. meshnode's survivors learn of a *killed* leader from its refused connections and elect
at once; a hung one costs both systems an election timeout.

Goals (PASS/MISS; exit status 0 either way, this is a measurement): meshnode >= 50 % of etcd's
writes/s at 64 connections, >= 50 % of etcd's linearizable reads/s, failover (kill -> first
acknowledged write) <= etcd's. Missing tools (wrk, etcd-server, etcd-client) are installed with
apt-get as root. Every process started here is killed by PID at the end, on error and on
Ctrl-C/SIGTERM/--budget, and by the kernel if this script dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import abc
import argparse
import base64
import contextlib
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.runner import (  # noqa: E402
    CLK_TCK,
    PROCS,
    apt_install,
    begin,
    by_system,
    finish,
    finish_profile,
    loadavg,
    log,
    print_notes,
    proc_rss_mb,
    proc_ticks,
    run_reps,
    start_profile,
)
from bench.stats import goal, print_table  # noqa: E402
from tests.harness.agents import AgentProc, LocalCluster, free_port  # noqa: E402

LUA_DIR = Path(__file__).resolve().parent / "lua"
WRK = "/usr/bin/wrk"
ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
SYSTEMS = ("etcd", "meshnode")
MEMBER_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
VALUE_SIZE = 256
VALUE = b"v" * VALUE_SIZE
READ_KEY = "bench/read"
WRK_TIMEOUT = "10s"  # wrk drops slower responses from its histogram; keep them in (both systems)
T = TypeVar("T")

#: etcd 3.4 anchor on this machine (/work/shared/reference/anchors.md section 1, invocation 3)
ANCHOR: dict[str, float] = {
    "put1_rps": 777, "put1_p50": 1.18, "put1_p99": 4.52,
    "put64_rps": 4598, "put64_p50": 13.1, "put64_p99": 29.1,
    "read64_rps": 6779, "read64_p50": 8.6, "read64_p99": 23.9,
    "fo_leader": 1.22, "fo_write": 1.28,
}  # fmt: skip
GOAL_PUT64 = 0.5
GOAL_READ64 = 0.5
GOAL_FAILOVER = 1.0


# ----- HTTP --------------------------------------------------------------------------------


def request(
    host: str, port: int, method: str, path: str, body: bytes | None = None,
    timeout: float = 3.0, headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:  # fmt: skip
    """One request on a fresh connection (no proxies, no retries); raises OSError."""
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def http_json(
    host: str, port: int, method: str, path: str, body: Any = None, timeout: float = 3.0
) -> tuple[int, Any]:
    raw = None if body is None else json.dumps(body).encode()
    hdr = {"Content-Type": "application/json"} if raw is not None else {}
    st, data = request(host, port, method, path, raw, timeout, hdr)
    try:
        return st, json.loads(data) if data.strip() else None
    except ValueError:
        return st, data.decode(errors="replace")


def wait_for(pred: Callable[[], T | None], timeout: float, desc: str, interval: float = 0.1) -> T:
    """Poll pred() until truthy; exceptions count as not yet. Raises RuntimeError naming desc."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            v = pred()
            if v:
                return v
            last = v
        except Exception as e:
            last = e
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {desc}; last: {last!r}")
        time.sleep(interval)


# ----- the two systems ---------------------------------------------------------------------


class System(abc.ABC):
    """A 3-member cluster under test; member i listens for clients on endpoint(i)."""

    name: str
    put_lua: str
    read_lua: str

    def __init__(self, workdir: Path, log_level: str) -> None:
        self.workdir = workdir
        self.log_level = log_level

    @abc.abstractmethod
    def start(self) -> None:
        """Start all members; return once a leader is known and a write went through."""

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def endpoint(self, i: int) -> tuple[str, int]: ...

    @abc.abstractmethod
    def pid(self, i: int) -> int | None: ...

    @abc.abstractmethod
    def leader(self, among: Sequence[int] | None = None) -> tuple[int, str]:
        """(member index, leader id) as reported now by the running members, or raise."""

    @abc.abstractmethod
    def new_leader_seen(self, i: int, old_id: str) -> bool:
        """Member i knows a leader other than old_id (one quick status request)."""

    @abc.abstractmethod
    def write(self, i: int, key: str, timeout: float) -> tuple[bool, str]:
        """One write through member i: (acknowledged, short outcome for the error tally)."""

    @abc.abstractmethod
    def prepare_read_key(self) -> None:
        """Write the key the read load uses and check that a linearizable read returns it."""

    @abc.abstractmethod
    def count_keys(self, prefix: str) -> int: ...

    @abc.abstractmethod
    def wrk_env(self, prefix: str) -> dict[str, str]: ...

    @abc.abstractmethod
    def kill9(self, i: int) -> None: ...

    @abc.abstractmethod
    def restart(self, i: int) -> None:
        """Start killed member i again on its data dir."""

    @classmethod
    @abc.abstractmethod
    def versions(cls) -> str: ...

    @abc.abstractmethod
    def log_tails(self, lines: int = 30) -> str: ...

    def url(self, i: int) -> str:
        host, port = self.endpoint(i)
        return f"http://{host}:{port}"

    def healthy(self, timeout: float = 60.0) -> int:
        """Every member agrees on one leader and accepts a write; returns the leader index."""

        def check() -> tuple[int, str] | None:  # a tuple, since leader index 0 is falsy
            li, lid = self.leader()
            for i in range(3):
                ok, what = self.write(i, "bench/health", 2.0)
                if not ok:
                    raise RuntimeError(f"write through member {i + 1}: {what}")
            return (li, lid) if self.leader()[1] == lid else None

        return wait_for(check, timeout, f"{self.name}: one leader and writes OK", 0.2)[0]

    def cpu_ticks(self) -> int:
        return sum(proc_ticks(p) for i in range(3) if (p := self.pid(i)) is not None)


class Etcd(System):
    name = "etcd"
    put_lua = "etcd_put.lua"
    read_lua = "etcd_range.lua"

    def __init__(self, workdir: Path, log_level: str) -> None:
        super().__init__(workdir, log_level)
        self.cports = [free_port(ip, udp=False) for ip in MEMBER_IPS]
        self.pports = [free_port(ip, udp=False) for ip in MEMBER_IPS]
        self.names = ["e1", "e2", "e3"]
        self.popens: list[subprocess.Popen[bytes] | None] = [None, None, None]
        self.logs: list[IO[bytes] | None] = [None, None, None]

    def argv(self, i: int) -> list[str]:
        cluster = ",".join(
            f"{self.names[j]}=http://{MEMBER_IPS[j]}:{self.pports[j]}" for j in range(3)
        )
        ip = MEMBER_IPS[i]
        return [
            ETCD, "--name", self.names[i],
            "--data-dir", str(self.workdir / f"{self.names[i]}.data"),
            "--listen-client-urls", f"http://{ip}:{self.cports[i]}",
            "--advertise-client-urls", f"http://{ip}:{self.cports[i]}",
            "--listen-peer-urls", f"http://{ip}:{self.pports[i]}",
            "--initial-advertise-peer-urls", f"http://{ip}:{self.pports[i]}",
            "--initial-cluster", cluster, "--initial-cluster-state", "new",
            "--initial-cluster-token", "raft-vs-etcd",
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--logger", "zap", "--log-level", self.log_level,
        ]  # fmt: skip

    def _start(self, i: int) -> None:
        f = (self.workdir / f"{self.names[i]}.log").open("ab")
        self.logs[i] = f
        self.popens[i] = PROCS.start(self.argv(i), f)

    def start(self) -> None:
        for i in range(3):
            self._start(i)
        self.healthy()

    def stop(self) -> None:
        for i in range(3):
            self.kill9(i)

    def endpoint(self, i: int) -> tuple[str, int]:
        return MEMBER_IPS[i], self.cports[i]

    def pid(self, i: int) -> int | None:
        p = self.popens[i]
        return p.pid if p is not None and p.poll() is None else None

    def status(self, i: int, timeout: float = 1.0) -> dict[str, Any]:
        """etcd's endpoint status (what `etcdctl endpoint status` shows), via the gateway."""
        st, js = http_json(*self.endpoint(i), "POST", "/v3/maintenance/status", {}, timeout)
        if st != 200 or not isinstance(js, dict):
            raise RuntimeError(f"status of e{i + 1}: {st} {js!r}")
        return js

    def leader(self, among: Sequence[int] | None = None) -> tuple[int, str]:
        ids: dict[str, int] = {}
        leaders: set[str] = set()
        for i in among if among is not None else range(3):
            if self.pid(i) is None:
                continue
            js = self.status(i)
            ids[str(js["header"]["member_id"])] = i
            leaders.add(str(js.get("leader", "0")))
        if len(leaders) != 1:
            raise RuntimeError(f"members disagree on the leader: {leaders}")
        lid = leaders.pop()
        if lid == "0" or lid not in ids:
            raise RuntimeError(f"leader {lid} unknown or not running")
        return ids[lid], lid

    def new_leader_seen(self, i: int, old_id: str) -> bool:
        lid = str(self.status(i, timeout=0.2).get("leader", "0"))
        return lid not in ("0", old_id)

    def write(self, i: int, key: str, timeout: float) -> tuple[bool, str]:
        body = {"key": b64(key.encode()), "value": b64(b"x")}
        try:
            st, js = http_json(*self.endpoint(i), "POST", "/v3/kv/put", body, timeout)
        except TimeoutError:
            return False, "client timeout"
        except (OSError, http.client.HTTPException) as e:
            return False, type(e).__name__
        if st == 200 and isinstance(js, dict) and "header" in js:
            return True, "ok"
        return False, f"{st} {str(js)[:120]}"

    def prepare_read_key(self) -> None:
        li, _ = self.leader()
        st, js = http_json(
            *self.endpoint(li), "POST", "/v3/kv/put", {"key": b64(READ_KEY.encode()),
                                                       "value": b64(VALUE)},
        )  # fmt: skip
        if st != 200:
            raise RuntimeError(f"etcd put of the read key: {st} {js!r}")
        for i in range(3):
            st, js = http_json(*self.endpoint(i), "POST", "/v3/kv/range",
                               {"key": b64(READ_KEY.encode())})  # fmt: skip
            kvs = js.get("kvs", []) if isinstance(js, dict) else []
            if st != 200 or len(kvs) != 1 or base64.b64decode(kvs[0]["value"]) != VALUE:
                raise RuntimeError(f"etcd linearizable range via e{i + 1}: {st} {js!r}")

    def count_keys(self, prefix: str) -> int:
        start = base64.b64decode(prefix)  # 4 base64 chars -> 3 bytes
        end = bytearray(start)
        end[-1] += 1  # prefixes are chosen so that the last byte is not 0xff
        li, _ = self.leader()
        st, js = http_json(
            *self.endpoint(li), "POST", "/v3/kv/range",
            {"key": b64(start), "range_end": b64(bytes(end)), "count_only": True}, 30.0,
        )  # fmt: skip
        if st != 200 or not isinstance(js, dict):
            raise RuntimeError(f"etcd count {prefix}: {st} {js!r}")
        return int(js.get("count", 0))

    def wrk_env(self, prefix: str) -> dict[str, str]:
        return {
            "BENCH_PREFIX": prefix, "BENCH_VALUE_B64": b64(VALUE),
            "BENCH_READ_KEY_B64": b64(READ_KEY.encode()),
        }  # fmt: skip

    def kill9(self, i: int) -> None:
        p = self.popens[i]
        if p is not None:
            PROCS.kill(p)
        f = self.logs[i]
        if f is not None:
            f.close()
            self.logs[i] = None

    def restart(self, i: int) -> None:
        self._start(i)  # the data dir exists, so --initial-cluster-state is ignored

    @classmethod
    def versions(cls) -> str:
        out = []
        for argv in ([ETCD, "--version"], [ETCDCTL, "version"]):
            with contextlib.suppress(Exception):
                r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
                out.append(r.stdout.splitlines()[0].strip())
        return "; ".join(out)

    def log_tails(self, lines: int = 30) -> str:
        parts = []
        for n in self.names:
            with contextlib.suppress(OSError):
                text = (self.workdir / f"{n}.log").read_text(errors="replace")
                parts.append(f"--- {n} ---\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)


class Meshnode(System):
    name = "meshnode"
    put_lua = "meshnode_put.lua"
    read_lua = "meshnode_get.lua"

    def __init__(self, workdir: Path, log_level: str) -> None:
        super().__init__(workdir, log_level)
        self.cluster = LocalCluster(
            3, workdir, log_level=log_level, extra_args=["--bootstrap-expect", "3"]
        )
        self.agents: list[AgentProc] = list(self.cluster)

    def start(self) -> None:
        self.cluster.start(ready_timeout=60)
        self.healthy()

    def stop(self) -> None:
        self.cluster.close()

    def endpoint(self, i: int) -> tuple[str, int]:
        a = self.agents[i]
        return a.client, a.ports.http

    def pid(self, i: int) -> int | None:
        a = self.agents[i]
        return a.pid if a.running else None

    def server_addr(self, i: int) -> str:
        a = self.agents[i]
        return f"{a.bind}:{a.ports.server}"

    def leader(self, among: Sequence[int] | None = None) -> tuple[int, str]:
        seen: set[str] = set()
        asked = [i for i in (among if among is not None else range(3)) if self.pid(i)]
        for i in asked:
            st, body = http_json(*self.endpoint(i), "GET", "/v1/status/leader", timeout=2.0)
            if st != 200 or not isinstance(body, str):
                raise RuntimeError(f"/v1/status/leader on {self.agents[i].name}: {st} {body!r}")
            seen.add(body)
        if len(seen) != 1 or "" in seen:
            raise RuntimeError(f"agents report leaders {seen}")
        addr = seen.pop()
        idx = [i for i in range(3) if self.server_addr(i) == addr]
        if not idx:
            raise RuntimeError(f"leader {addr} is none of our agents")
        # cross-check with the Raft configuration the leader publishes
        st, cfg = http_json(
            *self.endpoint(asked[0]), "GET", "/v1/operator/raft/configuration", timeout=2.0
        )
        if st != 200 or not isinstance(cfg, dict):
            raise RuntimeError(f"/v1/operator/raft/configuration: {st} {cfg!r}")
        servers = cfg.get("Servers", [])
        flagged = [s for s in servers if s.get("Leader")]
        voters = [s for s in servers if s.get("Voter")]
        if len(flagged) != 1 or flagged[0].get("Address") != addr:
            raise RuntimeError(f"raft configuration disagrees with leader {addr}: {servers}")
        if len(voters) != 3:
            raise RuntimeError(f"{len(voters)} voters in the raft configuration: {servers}")
        return idx[0], addr

    def new_leader_seen(self, i: int, old_id: str) -> bool:
        st, body = http_json(*self.endpoint(i), "GET", "/v1/status/leader", timeout=0.2)
        return st == 200 and isinstance(body, str) and body not in ("", old_id)

    def write(self, i: int, key: str, timeout: float) -> tuple[bool, str]:
        try:
            st, body = request(*self.endpoint(i), "PUT", f"/v1/kv/{key}", b"x", timeout)
        except TimeoutError:
            return False, "client timeout"
        except (OSError, http.client.HTTPException) as e:
            return False, type(e).__name__
        if st == 200 and body.strip() == b"true":
            return True, "ok"
        return False, f"{st} {body[:120].decode(errors='replace').strip()}"

    def prepare_read_key(self) -> None:
        li, _ = self.leader()
        st, body = request(*self.endpoint(li), "PUT", f"/v1/kv/{READ_KEY}", VALUE)
        if st != 200 or body.strip() != b"true":
            raise RuntimeError(f"meshnode put of the read key: {st} {body!r}")
        for i in range(3):
            st, js = http_json(*self.endpoint(i), "GET", f"/v1/kv/{READ_KEY}?consistent")
            ok = (
                st == 200 and isinstance(js, list) and len(js) == 1
                and base64.b64decode(js[0].get("Value") or "") == VALUE
            )  # fmt: skip
            if not ok:
                raise RuntimeError(f"meshnode ?consistent read via node{i + 1}: {st} {js!r}")

    def count_keys(self, prefix: str) -> int:
        li, _ = self.leader()
        st, js = http_json(*self.endpoint(li), "GET", f"/v1/kv/bench/{prefix}/?keys", timeout=30)
        if st == 404:
            return 0
        if st != 200 or not isinstance(js, list):
            raise RuntimeError(f"meshnode ?keys bench/{prefix}/: {st} {str(js)[:200]}")
        return len(js)

    def wrk_env(self, prefix: str) -> dict[str, str]:
        return {"BENCH_PREFIX": prefix, "BENCH_VALUE_SIZE": str(VALUE_SIZE),
                "BENCH_READ_KEY": READ_KEY}  # fmt: skip

    def kill9(self, i: int) -> None:
        self.agents[i].kill9()

    def restart(self, i: int) -> None:
        a = self.agents[i]
        # the seed may be the one that died: rejoin through whoever is alive
        a.join = []
        a.retry_join = [b.serf_addr for j, b in enumerate(self.agents) if j != i]
        a.start()
        a.wait_ready(60)

    @classmethod
    def versions(cls) -> str:
        r = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%h %cs"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "node"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        state = " + uncommitted node/ changes" if dirty.stdout.strip() else ""
        return f"meshnode {r.stdout.strip()}{state}, Python {sys.version.split()[0]}"

    def log_tails(self, lines: int = 30) -> str:
        return self.cluster.logs(lines)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ----- load --------------------------------------------------------------------------------


@dataclass
class Run:
    """One wrk run."""

    label: str
    cmd: str = ""
    target: str = ""
    rps: float | None = None
    requests: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    max_ms: float | None = None
    errors: dict[str, int] = field(default_factory=dict)
    cluster_cores: float | None = None
    leader_cores: float | None = None
    cpu_us_per_req: float | None = None
    acked: int | None = None
    stored: int | None = None
    leader_before: str = ""
    leader_after: str = ""
    error: str = ""


def read_wrk(r: Run, out: subprocess.CompletedProcess[str]) -> dict[str, Any] | None:
    """Rate, latency and errors from the BENCH_RESULT line of bench/lua/common.lua's done(),
    into r; the whole line (for what else a caller counts), or None with r.error set."""
    m = re.search(r"^BENCH_RESULT (\{.*\})$", out.stdout, re.M)
    if m is None:
        r.error = f"wrk rc={out.returncode}: {(out.stderr or out.stdout).strip()[-300:]}"
        return None
    js: dict[str, Any] = json.loads(m.group(1))
    lat = js["latency_us"]
    r.requests = int(js["requests"])
    r.rps = r.requests / (js["duration_us"] / 1e6)
    r.p50_ms, r.p99_ms = lat["p50"] / 1000, lat["p99"] / 1000
    r.mean_ms, r.max_ms = lat["mean"] / 1000, lat["max"] / 1000
    r.errors = {k: int(v) for k, v in js["errors"].items() if v}
    return js


def run_wrk(
    system: System, label: str, lua: str, conns: int, threads: int, duration: float,
    spread: bool, prefix: str,
) -> Run:  # fmt: skip
    """wrk against the leader (or all members when spread), with cluster CPU over the run."""
    r = Run(label)
    li, r.leader_before = system.leader()
    env = {**os.environ, **system.wrk_env(prefix)}
    if spread:
        env["BENCH_TARGETS"] = ",".join("{}:{}".format(*system.endpoint(i)) for i in range(3))
        r.target = "all 3 members"
    else:
        env.pop("BENCH_TARGETS", None)
        r.target = f"leader {system.url(li)}"
    argv = [
        WRK, f"-t{threads}", f"-c{conns}", f"-d{duration:g}s", "--timeout", WRK_TIMEOUT,
        "--latency", "-s", str(LUA_DIR / lua), system.url(li),
    ]  # fmt: skip
    r.cmd = " ".join(argv)
    lpid = system.pid(li)
    lticks0 = proc_ticks(lpid) if lpid is not None else 0
    ticks0, t0 = system.cpu_ticks(), time.monotonic()
    try:
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=duration + 30, env=env
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        r.error = "wrk did not finish in time"
        return r
    dt = time.monotonic() - t0
    ticks = system.cpu_ticks() - ticks0
    if lpid is not None:
        r.leader_cores = (proc_ticks(lpid) - lticks0) / CLK_TCK / dt
    js = read_wrk(r, out)
    if js is None:
        return r
    r.cluster_cores = ticks / CLK_TCK / dt
    if r.requests:
        r.cpu_us_per_req = ticks / CLK_TCK * 1e6 / r.requests
    r.acked = r.requests - int(js["errors"]["status"])
    with contextlib.suppress(Exception):
        r.leader_after = system.leader()[1]
    return r


@dataclass
class Failover:
    old_leader: str = ""
    t_leader: float | None = None
    t_write: float | None = None
    write_via: str = ""
    outcomes: dict[str, int] = field(default_factory=dict)
    #: every write attempt: (sent s, done s, member 1-3, outcome), times after the kill
    attempts: list[tuple[float, float, int, str]] = field(default_factory=list)
    heal_s: float | None = None
    error: str = ""


def failover(system: System, timeout: float, tag: str, sig: int = signal.SIGKILL) -> Failover:
    """SIGKILL (or SIGSTOP) the leader; time until a survivor sees a new one and a write is
    acknowledged. A stopped leader keeps its sockets open, so nothing but the election timeout
    tells the others it is gone (a hung process, or a host that vanished)."""
    res = Failover()
    li, res.old_leader = system.leader()
    survivors = [i for i in range(3) if i != li]
    go, stop = threading.Event(), threading.Event()
    lock = threading.Lock()
    t0 = 0.0

    def watch(i: int) -> None:
        go.wait()
        while not stop.is_set():
            with contextlib.suppress(Exception):
                if system.new_leader_seen(i, res.old_leader):
                    with lock:
                        if res.t_leader is None:
                            res.t_leader = time.perf_counter() - t0
                    return
            time.sleep(0.005)

    def writer(i: int, k: int) -> None:
        go.wait()
        time.sleep(k * 0.125)  # staggered: 0.5 s timeouts resolve the first OK to ~0.125 s
        n = 0
        while not stop.is_set():
            n += 1
            sent = time.perf_counter() - t0
            ok, what = system.write(i, f"bench/failover/{tag}/{i}-{k}-{n}", 0.5)
            with lock:
                res.attempts.append((sent, time.perf_counter() - t0, i + 1, what))
                res.outcomes[what] = res.outcomes.get(what, 0) + 1
                if ok:
                    if res.t_write is None:
                        res.t_write = time.perf_counter() - t0
                        res.write_via = f"member {i + 1}"
                    return
            time.sleep(0.005)

    threads = [threading.Thread(target=watch, args=(i,), daemon=True) for i in survivors]
    threads += [
        threading.Thread(target=writer, args=(i, k), daemon=True)
        for i in survivors for k in range(4)
    ]  # fmt: skip
    for t in threads:
        t.start()
    pid = system.pid(li)
    if pid is None:
        raise RuntimeError("leader process is not running")
    os.kill(pid, sig)
    t0 = time.perf_counter()
    go.set()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and (res.t_leader is None or res.t_write is None):
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=3)
    res.attempts.sort()
    if res.t_write is None:
        res.error = f"no write acknowledged within {timeout:g}s"
    th = time.monotonic()
    if sig == signal.SIGSTOP:
        os.kill(pid, signal.SIGCONT)  # it comes back as a follower of the new leader
    else:
        system.kill9(li)  # reap it and close its log
        system.restart(li)
    system.healthy()
    res.heal_s = time.monotonic() - th
    return res


def after_leader(fo: Failover, limit: int = 8) -> list[str]:
    """The write attempts that were in flight when a new leader was first seen, and after."""
    if fo.t_leader is None:
        return []
    tl = fo.t_leader
    rows = [a for a in fo.attempts if a[1] >= tl and (fo.t_write is None or a[0] <= fo.t_write)]
    out = [f"attempts in flight at/after new leader seen ({tl:.3f} s) up to the first OK:"]
    for sent, done, member, what in rows[:limit]:
        out.append(f"  sent {sent:.3f} done {done:.3f} via member {member}: {what}")
    if len(rows) > limit:
        out.append(f"  ... {len(rows) - limit} more")
    return out


# ----- one rep -----------------------------------------------------------------------------


@dataclass
class Rep:
    system: str
    rep: int
    runs: dict[str, Run] = field(default_factory=dict)
    failovers: list[Failover] = field(default_factory=list)
    hangs: list[Failover] = field(default_factory=list)
    start_s: float | None = None
    rss_mb: list[float] = field(default_factory=list)
    loadavg: str = ""
    error: str = ""
    notes: list[str] = field(default_factory=list)


def note_run(res: Rep, key: str, r: Run, errors: str) -> None:
    """Notes under the table on a wrk run: the leader changed, wrk counted errors, or it failed."""
    if r.leader_after and r.leader_after != r.leader_before:
        res.notes.append(f"{key}: leader changed during the run "
                         f"({r.leader_before} -> {r.leader_after})")  # fmt: skip
    if r.errors:
        res.notes.append(f"{key}: wrk errors {errors}")
    if r.error:
        res.notes.append(f"{key}: {r.error}")


def run_rep(system: System, res: Rep, args: argparse.Namespace, profile_dir: Path | None) -> None:
    """Fill res as the rep goes, so an abort still reports what was measured."""
    rep = res.rep
    t0 = time.monotonic()
    system.start()
    res.start_s = time.monotonic() - t0
    system.prepare_read_key()
    log(f"  {system.name} up in {res.start_s:.1f}s (leader {system.leader()[1]})")
    spread = args.target == "spread"
    plan = [
        ("put1", system.put_lua, 1, 1, False, f"r{rep:02d}a"),
        ("put64", system.put_lua, 63 if spread else 64, 3 if spread else 2, spread, f"r{rep:02d}b"),
        ("read64", system.read_lua, 63 if spread else 64, 3 if spread else 2, spread, ""),
    ]  # fmt: skip
    for key, lua, conns, threads, sp, prefix in plan:
        r = run_wrk(system, key, lua, conns, threads, args.duration, sp, prefix)
        if prefix and not r.error:
            try:
                r.stored = system.count_keys(prefix)
            except Exception as e:
                res.notes.append(f"{key}: counting stored keys failed: {e}")
            if r.stored is not None and r.acked is not None:
                lost = r.acked - r.stored
                extra = r.stored - r.acked
                if lost > 0:
                    res.notes.append(f"{key}: {lost} ACKNOWLEDGED WRITES MISSING "
                                     f"({r.acked} acked, {r.stored} stored)")  # fmt: skip
                elif extra > conns:
                    res.notes.append(f"{key}: {extra} more keys stored than acked + in flight")
        note_run(res, key, r, f"{r.errors}")
        res.runs[key] = r
        log(f"  {system.name} {key}: {fmt(r.rps, 0)} req/s p50 {fmt(r.p50_ms, 2)} ms "
            f"p99 {fmt(r.p99_ms, 2)} ms, cluster {fmt(r.cluster_cores, 2)} cores "
            f"(leader {fmt(r.leader_cores, 2)}), "
            f"errors {r.errors or 0}, acked {r.acked} stored {r.stored}")  # fmt: skip
        time.sleep(1.0)
    res.rss_mb = [proc_rss_mb(p) for i in range(3) if (p := system.pid(i)) is not None]
    for k in range(args.failovers):
        fo = failover(system, args.failover_timeout, f"r{rep}f{k}")
        res.failovers.append(fo)
        log(f"  {system.name} failover {k}: old leader {fo.old_leader}, new leader seen "
            f"{fmt(fo.t_leader, 3)} s, first write OK {fmt(fo.t_write, 3)} s via {fo.write_via}"
            f" (healed in {fmt(fo.heal_s, 1)} s); attempts {fo.outcomes}")  # fmt: skip
        for line in after_leader(fo):
            log(f"    {line}")
        if fo.error:
            res.notes.append(f"failover {k}: {fo.error}; attempts {fo.outcomes}")
        time.sleep(1.0)
    for k in range(args.failovers):
        fo = failover(system, args.failover_timeout, f"r{rep}h{k}", signal.SIGSTOP)
        res.hangs.append(fo)
        log(f"  {system.name} hung leader {k}: new leader seen {fmt(fo.t_leader, 3)} s, first "
            f"write OK {fmt(fo.t_write, 3)} s; attempts {fo.outcomes}")  # fmt: skip
        if fo.error:
            res.notes.append(f"hung leader {k}: {fo.error}; attempts {fo.outcomes}")
        time.sleep(1.0)
    if profile_dir is not None and system.name == "meshnode" and rep == 0:
        # an extra put64 run at the end, not counted: py-spy pauses the leader 100 times a second
        _, lua, conns, threads, sp, _ = plan[1]
        li, _ = system.leader()
        pid = system.pid(li)
        out = profile_dir / "meshnode-leader-put64.collapsed"
        prof = None if pid is None else start_profile(pid, out, args.duration, system.url(li))
        if prof is not None:
            r = run_wrk(system, "put64", lua, conns, threads, args.duration, sp, f"r{rep:02d}p")
            if note := finish_profile(prof):
                res.notes.append(note)
            res.notes.append(
                f"profiled extra put64 run (not in the table): {fmt(r.rps, 0)} "
                f"req/s, p99 {fmt(r.p99_ms, 1)} ms; collapsed stacks in {prof.out}"
            )


# ----- report ------------------------------------------------------------------------------


def fmt(x: float | None, nd: int) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


METRICS: list[tuple[str, str, int]] = [
    ("put1_rps", "put, 1 conn: writes/s", 0),
    ("put1_p50", "put, 1 conn: p50 ms", 2),
    ("put1_p99", "put, 1 conn: p99 ms", 2),
    ("put64_rps", "put, 64 conns: writes/s", 0),
    ("put64_p50", "put, 64 conns: p50 ms", 2),
    ("put64_p99", "put, 64 conns: p99 ms", 2),
    ("read64_rps", "linearizable read, 64 conns: reads/s", 0),
    ("read64_p50", "linearizable read, 64 conns: p50 ms", 2),
    ("read64_p99", "linearizable read, 64 conns: p99 ms", 2),
    ("fo_leader", "failover: kill -9 leader -> new leader seen s", 3),
    ("fo_write", "failover: kill -9 leader -> first write OK s", 3),
    ("hang_leader", "hung leader (SIGSTOP) -> new leader seen s", 3),
    ("hang_write", "hung leader (SIGSTOP) -> first write OK s", 3),
    ("put1_cpu", "cluster CPU us per put, 1 conn", 0),
    ("put64_cpu", "cluster CPU us per put, 64 conns", 0),
    ("read64_cpu", "cluster CPU us per read, 64 conns", 0),
    ("put64_cores", "cluster CPU cores busy, put 64 conns", 2),
    ("put64_lcores", "leader's CPU cores busy, put 64 conns", 2),
    ("read64_lcores", "leader's CPU cores busy, read 64 conns", 2),
    ("rss", "RSS per member after load, MB (max)", 1),
    ("start_s", "cluster start -> leader + first write s", 1),
    ("heal_s", "restart killed member -> healthy s", 1),
]


def values(reps: Sequence[Rep]) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {k: [] for k, _, _ in METRICS}
    for r in reps:
        for run in ("put1", "put64", "read64"):
            x = r.runs.get(run)
            out[f"{run}_rps"].append(x.rps if x else None)
            out[f"{run}_p50"].append(x.p50_ms if x else None)
            out[f"{run}_p99"].append(x.p99_ms if x else None)
            out[f"{run}_cpu"].append(x.cpu_us_per_req if x else None)
        x = r.runs.get("put64")
        out["put64_cores"].append(x.cluster_cores if x else None)
        out["put64_lcores"].append(x.leader_cores if x else None)
        x = r.runs.get("read64")
        out["read64_lcores"].append(x.leader_cores if x else None)
        out["rss"].append(max(r.rss_mb) if r.rss_mb else None)
        out["start_s"].append(r.start_s)
        for fo in r.failovers:
            out["fo_leader"].append(fo.t_leader)
            out["fo_write"].append(fo.t_write)
            out["heal_s"].append(fo.heal_s)
        for fo in r.hangs:
            out["hang_leader"].append(fo.t_leader)
            out["hang_write"].append(fo.t_write)
    return out


def report(results: list[Rep], systems: Sequence[str], args: argparse.Namespace) -> None:
    print()
    print(
        f"# raft_vs_etcd {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} CPUs; "
        f"wrk {args.duration:g}s per run, target {args.target}; figures are median [min..max] "
        "over reps (failover: over every kill)"
    )
    vals, nreps = by_system(results, systems, values)
    both = "meshnode" in systems and "etcd" in systems
    print_table(
        METRICS, vals, nreps, label_width=46, width=32,
        ratio=("meshnode", "etcd", "mesh/etcd") if both else None,
        anchor=("etcd anchor", ANCHOR),
    )  # fmt: skip
    print_notes(results)
    if both:
        print_goals(vals)


def print_goals(vals: dict[str, dict[str, list[float | None]]]) -> None:
    print("goals:")
    for key, what, limit, at_least in (
        ("put64_rps", "writes/s at 64 conns >= 50% of etcd", GOAL_PUT64, True),
        ("read64_rps", "linearizable reads/s >= 50% of etcd", GOAL_READ64, True),
        ("fo_write", "failover (kill -> first write OK) <= etcd", GOAL_FAILOVER, False),
        ("hang_write", "hung leader (no RST: timeouts only) <= etcd", GOAL_FAILOVER, False),
    ):
        verdict, shown = goal(vals["meshnode"][key], vals["etcd"][key], limit, at_least)
        print(f"  {verdict}  {what:<44} measured {shown} of etcd (limit {limit:g}x)")


# ----- setup and main ----------------------------------------------------------------------


def fsync_probe(d: Path, n: int = 300) -> tuple[float, float]:
    """p50/p99 ms of a 4 KiB write + fdatasync where both systems keep their logs."""
    path = d / "fsync.probe"
    buf = os.urandom(4096)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    lat = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            os.write(fd, buf)
            os.fdatasync(fd)
            lat.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    q = statistics.quantiles(lat, n=100)
    return q[49], q[98]


def ensure_tools(systems: Sequence[str]) -> None:
    """apt-get install what is missing (as root), and say so."""
    need = [] if os.access(WRK, os.X_OK) else ["wrk"]
    if "etcd" in systems:
        need += [] if os.access(ETCD, os.X_OK) else ["etcd-server"]
        need += [] if os.access(ETCDCTL, os.X_OK) else ["etcd-client"]
    apt_install(need)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    ap.add_argument("--only", choices=SYSTEMS, help="measure one system only")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--reps", type=int, default=2, help="fresh clusters per system (2)")
    ap.add_argument(
        "--failovers",
        type=int,
        default=2,
        help="leader kills (and as many leader hangs) per rep (2)",
    )
    ap.add_argument("--failover-timeout", type=float, default=20.0, help="per kill (20 s)")
    ap.add_argument(
        "--target", choices=("leader", "spread"), default="leader",
        help="leader: load on the current leader (default, like the anchor);\n"
        "spread: wrk -t3 -c63, one thread per member (21 connections each)",
    )  # fmt: skip
    ap.add_argument("--log-level", default="warn", help="members' log level (warn)")
    ap.add_argument(
        "--profile", type=Path, help="py-spy the meshnode leader in an extra put64 run (rep 0)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work dir (data, member logs)")
    ap.add_argument("--budget", type=float, default=1800.0, help="abort after this many s")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.reps < 1 or args.failovers < 0:
        ap.error("--duration > 0, --reps >= 1, --failovers >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    systems = [args.only] if args.only else list(SYSTEMS)
    ensure_tools(systems)
    workdir = begin(args.budget, "raft-vs-etcd-", keep=args.keep)
    t_start = time.monotonic()
    f50 = f99 = 0.0
    classes: dict[str, type[System]] = {"etcd": Etcd, "meshnode": Meshnode}

    def probe() -> None:
        nonlocal f50, f99
        f50, f99 = fsync_probe(workdir)
        log(f"fsync 4 KiB on {workdir}: p50 {f50:.2f} ms p99 {f99:.2f} ms; load {loadavg()}")

    results, aborted = run_reps(
        systems, args.reps, workdir, t_start,
        make=lambda name, d: classes[name](d, args.log_level), record=Rep,
        measure=lambda system, res, d: run_rep(system, res, args, args.profile), before=probe,
    )  # fmt: skip
    report(results, systems, args)
    wrk_v = subprocess.run([WRK, "--version"], capture_output=True, text=True).stdout
    vers = {"wrk": wrk_v.split("[")[0].strip(), **{n: classes[n].versions() for n in systems}}
    print(
        f"# {time.monotonic() - t_start:.0f}s total; fsync 4 KiB p50 {f50:.2f} ms p99 "
        f"{f99:.2f} ms on {workdir.parent}; wrk --timeout {WRK_TIMEOUT}; "
        + "; ".join(f"{k}: {v.strip()}" for k, v in vers.items())
    )
    fields = {"fsync_ms": {"p50": f50, "p99": f99}, "versions": vers, "anchor_etcd": ANCHOR}
    return finish(
        args, workdir, results, aborted, systems, values, fields, "*.collapsed", keep=args.keep
    )


if __name__ == "__main__":
    sys.exit(main())

"""meshnode's DNS server versus dnsmasq, same records, same load generator (dnsperf), one run.

    .venv/bin/python bench/dns_vs_dnsmasq.py                    # 3 reps of 10 s per system
    .venv/bin/python bench/dns_vs_dnsmasq.py --duration 5 --reps 1 --json out.json
    .venv/bin/python bench/dns_vs_dnsmasq.py --profile /tmp/prof  # + py-spy of the agent

The query is `web.service.consul SRV` for a service with 10 passing instances on 10 nodes; the
answer holds 10 SRV records and, in the additional section, the 10 A records of their targets.
* meshnode: one agent, `python -m node agent --dev --node bench --bind 127.0.0.2 --client
  127.0.0.2 --serf-port/--server-port/--http-port/--dns-port <free> --log-level warn`, started
  through tests/harness/agents.py; the instances go in through PUT /v1/catalog/register (node
  nI, address 10.0.0.I, service webI on port 800I, one passing check each).
* dnsmasq: `dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --port P
  --listen-address 127.0.0.3 --bind-interfaces --cache-size 1000 --pid-file` with the same
  records: `--srv-host=web.service.consul,nI.node.dc1.consul,800I,1,1` and
  `--host-record=nI.node.dc1.consul,10.0.0.I`, the names and TTL (0) meshnode serves.
Before and after every measured run, `dig` must get 10 SRV answers and their 10 A records.

Load: `dnsperf -s IP -p P -d <one line: web.service.consul SRV> -e -l D -c 10 -T 1 -q 100 -v`
for both. -e (EDNS0, 4 kB) so that neither server truncates the ~600-byte answer to 512 bytes;
-T 1: one dnsperf worker (a sender and a receiver thread), so that on 2 cores the server keeps
about one core to itself; -c 10: ten source sockets (dnsmasq gave ~20 % more than with one);
-q 100 (dnsperf's default) outstanding queries: above ~200 the server's socket buffer
(rmem_default) overflows and queries are lost; no -Q, the load is closed-loop, so the average
latency is about 100 / (queries/s). -v makes dnsperf print every response with its latency;
p50/p99 come from those lines (dnsperf 2.10 itself reports only the average, min, max and
stddev). A 1 s dnsperf run before each measured run warms both servers (meshnode's cache of
rendered replies) and is not counted.

Each rep starts a fresh server of one system, then the other; the order alternates (dnsmasq,
meshnode, meshnode, dnsmasq, ...) and only one server runs at a time. Server CPU per query is
utime+stime from /proc/<pid>/stat over the measured run divided by the completed queries;
dnsperf's own CPU comes from getrusage(RUSAGE_CHILDREN).

Goal (PASS/MISS; exit status 0 either way, this is a measurement): meshnode >= 50 % of dnsmasq's
queries/s (medians). Missing tools (dnsperf, dnsmasq-base, dnsutils) are installed with apt-get
as root; dnsmasq-base has the binary without Debian's dnsmasq service, and the script checks
afterwards that no dnsmasq it did not start runs or listens on port 53. Every process started
here is killed by PID at the end, on error, on Ctrl-C/SIGTERM/--budget, and by the kernel if
this script dies (PR_SET_PDEATHSIG); the temp dir is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

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
    log,
    print_notes,
    proc_rss_mb,
    proc_ticks,
    run_reps,
    start_profile,
)
from bench.stats import goal, med, print_table  # noqa: E402
from tests.harness.agents import AgentProc, free_port, wait_until  # noqa: E402

DNSPERF = "/usr/bin/dnsperf"
DNSMASQ = "/usr/sbin/dnsmasq"
DIG = "/usr/bin/dig"
TOOLS = {DNSPERF: "dnsperf", DNSMASQ: "dnsmasq-base", DIG: "dnsutils"}
SYSTEMS = ("dnsmasq", "meshnode")
MESH_IP = "127.0.0.2"
DNSMASQ_IP = "127.0.0.3"
QNAME = "web.service.consul"
INSTANCES = 10
CLIENTS = 10  # dnsperf -c
THREADS = 1  # dnsperf -T
OUTSTANDING = 100  # dnsperf -q
WARMUP_S = 1
GOAL_QPS = 0.5
#: measured on this machine before this script existed (the brief's reference figures)
REFERENCE_QPS = {"dnsmasq": 79_000.0}


def instance(i: int) -> tuple[str, str, int]:
    """(node name, node address, service port) of instance i (1-based)."""
    return f"n{i}", f"10.0.0.{i}", 8000 + i


# ----- the two servers ---------------------------------------------------------------------


class Server:
    """A DNS server under test, answering QNAME SRV on (ip, port)."""

    name = ""
    ip = ""
    port = 0

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def pid(self) -> int | None:
        return None

    def log_tails(self, lines: int = 30) -> str:
        return ""


class Dnsmasq(Server):
    name = "dnsmasq"

    def __init__(self, workdir: Path) -> None:
        self.ip = DNSMASQ_IP
        self.port = free_port(self.ip)
        self.workdir = workdir
        self.popen: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "dnsmasq.log"
        self._log: IO[bytes] | None = None

    def argv(self) -> list[str]:
        a = [
            DNSMASQ, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--port={self.port}", f"--listen-address={self.ip}", "--bind-interfaces",
            "--cache-size=1000", "--pid-file", "--log-facility=-",
        ]  # fmt: skip
        for i in range(1, INSTANCES + 1):
            node, addr, port = instance(i)
            a.append(f"--srv-host={QNAME},{node}.node.dc1.consul,{port},1,1")
            a.append(f"--host-record={node}.node.dc1.consul,{addr}")
        return a

    def start(self) -> None:
        self._log = self.log_path.open("ab")
        self.popen = PROCS.start(self.argv(), self._log)

    def stop(self) -> None:
        if self.popen is not None:
            PROCS.kill(self.popen, signal.SIGTERM)
        if self._log is not None:
            self._log.close()
            self._log = None

    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None and self.popen.poll() is None else None

    def log_tails(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


class Meshnode(Server):
    name = "meshnode"

    def __init__(self, workdir: Path) -> None:
        self.ip = MESH_IP
        self.agent = AgentProc("bench", self.ip, workdir, dev=True, log_level="warn")
        self.port = self.agent.ports.dns

    def start(self) -> None:
        log(f"  {' '.join(self.agent.argv())}")
        self.agent.start()
        self.agent.wait_ready(60)
        for i in range(1, INSTANCES + 1):
            node, addr, port = instance(i)
            body = {
                "Node": node, "Address": addr,
                "Service": {"ID": f"web{i}", "Service": "web", "Port": port},
                "Check": {"CheckID": f"c{i}", "Status": "passing", "ServiceID": f"web{i}"},
            }  # fmt: skip
            st, resp = self.agent.http("PUT", "/v1/catalog/register", body)
            if st != 200 or resp is not True:
                raise RuntimeError(f"PUT /v1/catalog/register {node}: {st} {resp!r}")

    def stop(self) -> None:
        self.agent.stop()

    def pid(self) -> int | None:
        return self.agent.pid if self.agent.running else None

    def log_tails(self, lines: int = 30) -> str:
        return self.agent.log_tail(lines)


# ----- dig and dnsperf ---------------------------------------------------------------------


@dataclass
class DigCheck:
    srv: int
    additional_a: int
    size: int
    status: str


def dig(server: Server) -> DigCheck:
    """One `dig QNAME SRV` against the server: answer counts and message size."""
    argv = [DIG, "+time=2", "+tries=1", "-p", str(server.port), f"@{server.ip}", QNAME, "SRV"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    m = re.search(r"status: (\w+)", out)
    size = re.search(r"MSG SIZE\s+rcvd: (\d+)", out)
    srv = a = 0
    section = ""
    for line in out.splitlines():
        if line.startswith(";; ") and line.endswith("SECTION:"):
            section = line
        elif line and not line.startswith(";"):
            f = line.split()
            if len(f) >= 4 and f[2] == "IN":
                srv += "ANSWER" in section and f[3] == "SRV"
                a += "ADDITIONAL" in section and f[3] == "A"
    return DigCheck(srv, a, int(size.group(1)) if size else 0, m.group(1) if m else "no answer")


def check_answer(server: Server, timeout: float) -> DigCheck:
    def full() -> DigCheck | None:
        if server.pid() is None:
            raise RuntimeError(f"{server.name} is not running")
        d = dig(server)
        return d if d.status == "NOERROR" and d.srv == INSTANCES == d.additional_a else None

    try:
        got = wait_until(full, timeout, 0.2, f"{server.name}: {INSTANCES} SRV + A answers")
    except AssertionError as e:
        last = dig(server) if server.pid() else "server gone"
        raise RuntimeError(f"{e}\nlast dig: {last}") from None
    assert got is not None  # wait_until returns only a truthy value
    return got


@dataclass
class Run:
    """One measured dnsperf run against one server."""

    qps: float | None = None
    sent: int = 0
    completed: int = 0
    lost: int = 0
    rcodes: dict[str, int] = field(default_factory=dict)
    resp_size: int = 0
    run_s: float = 0.0
    avg_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    std_ms: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    lat_samples: int = 0
    server_us_per_q: float | None = None
    server_cores: float | None = None
    client_cores: float | None = None
    server_rss_mb: float | None = None


def dnsperf_argv(server: Server, qfile: Path, seconds: float, verbose: bool) -> list[str]:
    argv = [
        DNSPERF, "-s", server.ip, "-p", str(server.port), "-d", str(qfile), "-e",
        "-l", f"{seconds:g}", "-c", str(CLIENTS), "-T", str(THREADS), "-q", str(OUTSTANDING),
    ]  # fmt: skip
    return [*argv, "-v"] if verbose else argv


def percentile(sorted_xs: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_xs:
        return None
    k = max(0, min(len(sorted_xs) - 1, int(-(-q * len(sorted_xs) // 100)) - 1))
    return sorted_xs[k]


def parse_dnsperf(text: str) -> Run:
    """dnsperf's statistics block, and latencies from its -v lines ("> NOERROR name type s")."""
    r = Run()

    def num(label: str) -> str | None:
        m = re.search(rf"^\s*{label}:\s+(.*)$", text, re.M)
        return m.group(1) if m else None

    if (v := num("Queries sent")) is not None:
        r.sent = int(v.split()[0])
    if (v := num("Queries completed")) is not None:
        r.completed = int(v.split()[0])
    if (v := num("Queries lost")) is not None:
        r.lost = int(v.split()[0])
    if (v := num("Response codes")) is not None:
        r.rcodes = {k: int(n) for k, n in re.findall(r"(\w+) (\d+) \(", v)}
    if (v := num("Average packet size")) is not None and (m := re.search(r"response (\d+)", v)):
        r.resp_size = int(m.group(1))
    if (v := num(r"Run time \(s\)")) is not None:
        r.run_s = float(v)
    if (v := num("Queries per second")) is not None:
        r.qps = float(v)
    if (v := num(r"Average Latency \(s\)")) is not None:
        m = re.match(r"([\d.]+) \(min ([\d.]+), max ([\d.]+)\)", v)
        if m:
            r.avg_ms, r.min_ms, r.max_ms = (float(x) * 1000 for x in m.groups())
    if (v := num(r"Latency StdDev \(s\)")) is not None:
        r.std_ms = float(v) * 1000
    lat = sorted(
        float(line.rsplit(" ", 1)[1]) * 1000 for line in text.splitlines() if line.startswith("> ")
    )
    r.lat_samples = len(lat)
    r.p50_ms, r.p99_ms, r.p999_ms = (percentile(lat, q) for q in (50, 99, 99.9))
    return r


def run_dnsperf(
    server: Server, qfile: Path, seconds: float, out: Path, verbose: bool = True
) -> Run:
    """dnsperf for `seconds` (bounded: killed 30 s after that), with server and client CPU."""
    pid = server.pid()
    if pid is None:
        raise RuntimeError(f"{server.name} is not running")
    argv = dnsperf_argv(server, qfile, seconds, verbose)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = proc_ticks(pid)
    with out.open("wb") as f:
        p = PROCS.start(argv, f)
        try:
            p.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"dnsperf did not finish within {seconds + 30:g} s") from None
        finally:
            PROCS.kill(p)  # only reaps it when it has exited; kills it on timeout or Ctrl-C
    t1 = proc_ticks(pid)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.read_text(errors="replace")
    out.unlink()
    if p.returncode != 0:
        raise RuntimeError(f"dnsperf exited {p.returncode}: {text[-2000:]}")
    r = parse_dnsperf(text)
    if r.qps is None or not r.run_s:
        raise RuntimeError(f"no statistics in dnsperf's output: {text[-2000:]}")
    if server.pid() is None:
        raise RuntimeError(f"{server.name} died during the run")
    cpu_s = (t1 - t0) / CLK_TCK
    r.server_cores = cpu_s / r.run_s
    r.server_us_per_q = cpu_s * 1e6 / r.completed if r.completed else None
    client_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    r.client_cores = client_s / r.run_s
    r.server_rss_mb = proc_rss_mb(pid)
    return r


# ----- one rep -----------------------------------------------------------------------------


@dataclass
class Rep:
    system: str
    rep: int
    loadavg: str = ""
    start_s: float | None = None
    dig_size: int = 0
    run: Run | None = None
    error: str = ""
    notes: list[str] = field(default_factory=list)


def run_rep(server: Server, res: Rep, args: argparse.Namespace, qfile: Path, d: Path) -> None:
    t = time.monotonic()
    server.start()
    res.dig_size = check_answer(server, 60).size
    res.start_s = time.monotonic() - t
    log(f"  {server.name} on {server.ip}:{server.port} (pid {server.pid()}) answers "
        f"{INSTANCES} SRV + {INSTANCES} A, {res.dig_size} bytes to dig; "
        f"ready in {res.start_s:.1f}s")  # fmt: skip
    run_dnsperf(server, qfile, WARMUP_S, d / "warmup.out", verbose=False)
    r = res.run = run_dnsperf(server, qfile, args.duration, d / "dnsperf.out")
    log(f"  {server.name}: {r.qps:,.0f} q/s, avg {fmt(r.avg_ms, 3)} ms, p99 "
        f"{fmt(r.p99_ms, 3)} ms, lost {r.lost}, rcodes {r.rcodes}, response {r.resp_size} B, "
        f"server {fmt(r.server_us_per_q, 1)} us/query ({fmt(r.server_cores, 2)} cores), "
        f"dnsperf {fmt(r.client_cores, 2)} cores")  # fmt: skip
    if r.lost:
        res.notes.append(f"{r.lost} queries lost of {r.sent}")
    if set(r.rcodes) - {"NOERROR"}:
        res.notes.append(f"response codes {r.rcodes}")
    if r.lat_samples != r.completed:
        res.notes.append(f"{r.lat_samples} latency lines for {r.completed} completed queries")
    after = dig(server)
    if (after.srv, after.additional_a) != (INSTANCES, INSTANCES):
        res.notes.append(f"after the run dig got {after}")
    if args.profile is not None and server.name == "meshnode" and res.rep == 0:
        profile(server, res, args, qfile, d)


def profile(server: Server, res: Rep, args: argparse.Namespace, qfile: Path, d: Path) -> None:
    """An extra, uncounted run with py-spy on the agent (it pauses it 100 times a second)."""
    pid = server.pid()
    out = args.profile / "meshnode-dns.collapsed"
    what = f"{server.ip}:{server.port}"
    prof = None if pid is None else start_profile(pid, out, args.duration, what)
    if prof is None:
        return
    # should this fail or be aborted, py-spy stops with the agent or in run_reps' PROCS.kill_all()
    r = run_dnsperf(server, qfile, args.duration, d / "profiled.out", verbose=False)
    if note := finish_profile(prof):
        res.notes.append(note)
    res.notes.append(
        f"profiled extra run (not in the table): {r.qps or 0:,.0f} q/s; collapsed stacks in {out}"
    )


# ----- report ------------------------------------------------------------------------------


def fmt(x: float | None, nd: int) -> str:
    return "n/a" if x is None else f"{x:,.{nd}f}"


METRICS: list[tuple[str, str, int]] = [
    ("qps", "queries/s", 0),
    ("avg_ms", "average latency ms (dnsperf)", 3),
    ("p50_ms", "p50 latency ms (dnsperf -v)", 3),
    ("p99_ms", "p99 latency ms (dnsperf -v)", 3),
    ("max_ms", "max latency ms (dnsperf)", 2),
    ("lost", "queries lost", 0),
    ("resp_size", "response bytes (dnsperf average)", 0),
    ("server_us_per_q", "server CPU us per query", 2),
    ("server_cores", "server CPU cores busy", 2),
    ("client_cores", "dnsperf CPU cores busy", 2),
    ("server_rss_mb", "server RSS MB after the run", 1),
    ("start_s", "start -> full answer to dig, s", 1),
]


def values(reps: Sequence[Rep]) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {k: [] for k, _, _ in METRICS}
    for r in reps:
        d = asdict(r.run) if r.run is not None else {}
        for key, _, _ in METRICS:
            out[key].append(r.start_s if key == "start_s" else d.get(key))
    return out


def report(results: list[Rep], systems: Sequence[str], args: argparse.Namespace) -> None:
    print()
    print(
        f"# dns_vs_dnsmasq {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} CPUs; "
        f"`{QNAME} SRV` ({INSTANCES} SRV + {INSTANCES} A); dnsperf -e -l {args.duration:g} "
        f"-c {CLIENTS} -T {THREADS} -q {OUTSTANDING} -v; median [min..max] over reps"
    )
    vals, nreps = by_system(results, systems, values)
    both = len(systems) == 2
    print_table(
        METRICS, vals, nreps, label_width=34, width=30,
        ratio=("meshnode", "dnsmasq", "mesh/dnsmasq") if both else None, ratio_na="",
    )  # fmt: skip
    print_notes(results)
    if both:
        verdict, shown = goal(vals["meshnode"]["qps"], vals["dnsmasq"]["qps"], GOAL_QPS)
        a, b = med(vals["meshnode"]["qps"]), med(vals["dnsmasq"]["qps"])
        print(f"goal: {verdict}  meshnode queries/s >= {GOAL_QPS:.0%} of dnsmasq: measured "
              f"{shown} ({fmt(a, 0)} vs {fmt(b, 0)} q/s; reference on this machine: dnsmasq "
              f"~{REFERENCE_QPS['dnsmasq']:,.0f} q/s)")  # fmt: skip


# ----- setup and main ----------------------------------------------------------------------


def dnsmasq_pids() -> set[int]:
    pids = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            with contextlib.suppress(OSError):
                if (p / "comm").read_text().strip() == "dnsmasq":
                    pids.add(int(p.name))
    return pids


def port53_listeners() -> str:
    try:
        out = subprocess.run(["ss", "-Hlunp", "sport = :53"], capture_output=True, text=True)
    except OSError:
        return ""
    return out.stdout.strip()


def ensure_tools() -> None:
    """apt-get install what is missing (as root), say so, and leave no system dnsmasq behind."""
    need = sorted({pkg for path, pkg in TOOLS.items() if not os.access(path, os.X_OK)})
    if not need:
        return
    before = dnsmasq_pids()
    apt_install(need)
    for pid in sorted(dnsmasq_pids() - before):  # started by the package: not ours to keep
        log(f"a dnsmasq (pid {pid}) appeared during the install; killing it")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    if listeners := port53_listeners():
        log(f"warning: something listens on UDP port 53 (not started by this script):\n{listeners}")


def versions() -> dict[str, str]:
    def first(argv: list[str], pat: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            m = re.search(pat, p.stdout + p.stderr)
            if m:
                return m.group(1)
        return "?"

    return {
        "dnsperf": first([DNSPERF, "-h"], r"Version (\S+)"),
        "dnsmasq": first([DNSMASQ, "--version"], r"Dnsmasq version (\S+)"),
        "meshnode": first(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], r"(\S+)"),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per dnsperf run (10)")
    ap.add_argument("--reps", type=int, default=3, help="fresh servers per system (3)")
    ap.add_argument("--only", choices=SYSTEMS, help="measure one system only")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument(
        "--profile", type=Path, help="py-spy the meshnode agent in an extra run (rep 0)"
    )
    ap.add_argument("--budget", type=float, default=900.0, help="abort after this many s (900)")
    args = ap.parse_args(argv)
    if args.duration < 1 or args.reps < 1:
        ap.error("--duration >= 1, --reps >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    systems = [args.only] if args.only else list(SYSTEMS)
    ensure_tools()
    workdir = begin(args.budget, "dns-vs-dnsmasq-")
    qfile = workdir / "queries.txt"
    qfile.write_text(f"{QNAME} SRV\n")
    t_start = time.monotonic()
    classes: dict[str, type[Dnsmasq | Meshnode]] = {"dnsmasq": Dnsmasq, "meshnode": Meshnode}
    results, aborted = run_reps(
        systems, args.reps, workdir, t_start,
        make=lambda name, d: classes[name](d), record=Rep,
        measure=lambda server, res, d: run_rep(server, res, args, qfile, d), pause=1.0,
    )  # fmt: skip
    shutil.rmtree(workdir, ignore_errors=True)
    report(results, systems, args)
    vers = versions()
    print(f"# {time.monotonic() - t_start:.0f}s total; " + "; ".join(
        f"{k} {v}" for k, v in vers.items()))  # fmt: skip
    dnsperf = (
        f"dnsperf -s IP -p PORT -d queries.txt -e -l {args.duration:g} -c {CLIENTS} "
        f"-T {THREADS} -q {OUTSTANDING} -v"
    )
    fields = {"versions": vers, "dnsperf": dnsperf}
    return finish(args, workdir, results, aborted, systems, values, fields, "*.collapsed")


if __name__ == "__main__":
    sys.exit(main())

"""Stale KV reads over HTTP: meshnode's ?stale versus etcd's serializable range, same load, one run.

    .venv/bin/python bench/kv_read.py                       # both systems, 2 reps (~3.5 min)
    .venv/bin/python bench/kv_read.py --duration 5 --reps 1 --only meshnode
    .venv/bin/python bench/kv_read.py --json out.json --profile /tmp/prof

The clusters are the ones bench/raft_vs_etcd.py starts (3 members on 127.0.0.2-4, same Raft
timing, data on /tmp); this script imports them from there and adds only the read runs. One
system runs at a time; reps alternate the order (etcd, meshnode, meshnode, etcd, ...).

Per rep and system, one key (bench/read, 256-byte value) is written and then read by wrk with
64 connections, 2 threads (--conns, --threads) for --duration seconds, four times:
* local read on a follower: meshnode GET /v1/kv/bench/read?stale (the agent's own replica, no
  Raft round), etcd POST /v3/kv/range {"serializable": true} (etcd's local read: the like-for-like
  of ?stale); this pair carries the goal;
* local read on the leader: the same two requests sent to the leader;
* default read on a follower, for context: meshnode with no flag (the follower first catches up
  to the leader's commit index: one ReadIndex round), etcd's default linearizable range
  (ReadIndex through the leader);
* default read on the leader: meshnode's leader answers from its store without a quorum round
  (Consul's default); etcd's linearizable range still confirms leadership with a quorum.
The wrk Lua scripts are generated into the work dir (bench/lua/ has no ?stale or serializable
variant) and load bench/lua/common.lua, so results come out of the same done() as
raft_vs_etcd.py's.

Figures per run: reads/s, p50/p99 latency, response bytes, CPU of the member under load and of
the whole cluster per read (utime+stime from /proc), and the CPU of everything else on the
machine during the run (all busy CPU from /proc/stat minus the cluster and wrk), which shows
whether something else was competing for the 2 cores. Goal (PASS/MISS; exit status 0 either
way): meshnode ?stale reads/s on a follower >= 0.5 x etcd serializable reads/s on a follower.

Every process is killed by PID at the end, on error, on Ctrl-C/SIGTERM/--budget, and by the
kernel if this script dies (bench/runner.py's Procs, LocalCluster); the work dir is removed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.raft_vs_etcd import (  # noqa: E402
    LUA_DIR,
    READ_KEY,
    SYSTEMS,
    VALUE,
    WRK,
    WRK_TIMEOUT,
    Etcd,
    Meshnode,
    Rep,
    Run,
    System,
    b64,
    ensure_tools,
    fmt,
    http_json,
    note_run,
    read_wrk,
)
from bench.runner import (  # noqa: E402
    CLK_TCK,
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

#: etcd 3.4 anchor on this machine (/work/shared/reference/anchors.md section 1, invocation 3;
#: load on the leader, 64 connections): serializable and linearizable range reads/s, p50/p99
ANCHOR: dict[str, float] = {
    "local_l_rps": 7340,
    "default_l_rps": 6779, "default_l_p50": 8.6, "default_l_p99": 23.9,
}  # fmt: skip
GOAL_STALE = 0.5
#: a run where everything but the cluster and wrk kept this much CPU busy gets a note (on an
#: otherwise idle machine it is 0.0-0.3: loopback softirq time that no process is charged for)
DISTURBED_CORES = 0.5

#: run key -> (on the follower?, local read?, label); in this order in every rep
RUNS: dict[str, tuple[bool, bool, str]] = {
    "local_f": (True, True, "local read, follower"),
    "local_l": (False, True, "local read, leader"),
    "default_f": (True, False, "default read, follower"),
    "default_l": (False, False, "default read, leader"),
}


def lua_str(s: str) -> str:
    """A Lua string literal (the generated scripts only carry ASCII paths and JSON)."""
    if not s.isascii() or not s.isprintable():
        raise ValueError(f"not printable ASCII: {s!r}")
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def read_lua(workdir: Path, system: str, local: bool) -> Path:
    """Write the wrk script of one read kind; it shares common.lua's setup() and done()."""
    if system == "meshnode":
        method, path, body = "GET", f"/v1/kv/{READ_KEY}" + ("?stale" if local else ""), ""
    else:
        method, path = "POST", "/v3/kv/range"
        req: dict[str, Any] = {"key": b64(READ_KEY.encode())}
        if local:
            req["serializable"] = True
        body = json.dumps(req, separators=(",", ":"))
    lines = [
        f"-- generated by bench/kv_read.py: {system} {'local' if local else 'default'} read",
        f"local common = dofile({lua_str(str(LUA_DIR / 'common.lua'))})",
        "setup = common.setup",
        "done = common.done",
        f"wrk.method = {lua_str(method)}",
        f"wrk.path = {lua_str(path)}",
    ]
    if body:
        lines += ['wrk.headers["Content-Type"] = "application/json"', f"wrk.body = {lua_str(body)}"]
    out = workdir / f"{system}_{'local' if local else 'default'}.lua"
    out.write_text("\n".join(lines) + "\n")
    return out


def check_reads(system: System) -> None:
    """Every member answers both read kinds with the value (and 200), before any load."""
    for i in range(3):
        for local in (True, False):
            if isinstance(system, Meshnode):
                path = f"/v1/kv/{READ_KEY}" + ("?stale" if local else "")
                st, js = http_json(*system.endpoint(i), "GET", path)
                got = js[0].get("Value") if isinstance(js, list) and len(js) == 1 else None
            else:
                req: dict[str, Any] = {"key": b64(READ_KEY.encode()), "serializable": local}
                st, js = http_json(*system.endpoint(i), "POST", "/v3/kv/range", req)
                kvs = js.get("kvs", []) if isinstance(js, dict) else []
                got = kvs[0].get("value") if len(kvs) == 1 else None
            if st != 200 or base64.b64decode(got or "") != VALUE:
                kind = "local" if local else "default"
                raise RuntimeError(f"{system.name} {kind} read via member {i + 1}: {st} {js!r}")


def busy_ticks() -> int:
    """Busy clock ticks of the whole machine (all CPUs) since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v[:8]) - v[3] - v[4]  # user..steal, less idle and iowait


def children_cpu_s() -> float:
    """CPU seconds of this script's reaped children (wrk, once it has exited)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


@dataclass
class ReadRun(Run):
    """One wrk read run; `member` is the one under load."""

    member: str = ""
    member_cores: float | None = None
    member_cpu_us_per_req: float | None = None
    wrk_cores: float | None = None
    other_cores: float | None = None
    bytes_per_resp: float | None = None
    loadavg: str = ""


def run_read(
    system: System, key: str, lua: Path, conns: int, threads: int, duration: float
) -> ReadRun:
    """wrk against one member (the leader or a follower) with CPU accounting over the run."""
    follower = RUNS[key][0]
    r = ReadRun(key, loadavg=loadavg())
    li, r.leader_before = system.leader()
    target = next(i for i in range(3) if i != li) if follower else li
    r.member = f"member {target + 1} ({'follower' if follower else 'leader'})"
    r.target = system.url(target)
    argv = [
        WRK, f"-t{threads}", f"-c{conns}", f"-d{duration:g}s", "--timeout", WRK_TIMEOUT,
        "--latency", "-s", str(lua), r.target,
    ]  # fmt: skip
    r.cmd = " ".join(argv)
    env = {k: v for k, v in os.environ.items() if k != "BENCH_TARGETS"}
    pid = system.pid(target)
    m0 = proc_ticks(pid) if pid is not None else 0
    c0, b0, w0, t0 = system.cpu_ticks(), busy_ticks(), children_cpu_s(), time.monotonic()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, env=env)
    except subprocess.TimeoutExpired:
        r.error = "wrk did not finish in time"
        return r
    dt = time.monotonic() - t0
    cluster = system.cpu_ticks() - c0
    member = (proc_ticks(pid) - m0) if pid is not None else 0
    wrk_s = children_cpu_s() - w0
    r.cluster_cores = cluster / CLK_TCK / dt
    r.member_cores = member / CLK_TCK / dt
    r.wrk_cores = wrk_s / dt
    r.other_cores = max(0.0, (busy_ticks() - b0 - cluster) / CLK_TCK / dt - r.wrk_cores)
    js = read_wrk(r, out)
    if js is None:
        return r
    if r.requests:
        r.cpu_us_per_req = cluster / CLK_TCK * 1e6 / r.requests
        r.member_cpu_us_per_req = member / CLK_TCK * 1e6 / r.requests
        r.bytes_per_resp = int(js["bytes"]) / r.requests
    with contextlib.suppress(Exception):
        r.leader_after = system.leader()[1]
    return r


def run_rep(system: System, res: Rep, args: argparse.Namespace, workdir: Path) -> None:
    """Fill res as the rep goes, so an abort still reports what was measured."""
    t0 = time.monotonic()
    system.start()
    res.start_s = time.monotonic() - t0
    system.prepare_read_key()
    check_reads(system)
    log(f"  {system.name} up in {res.start_s:.1f}s (leader {system.leader()[1]})")
    time.sleep(2.0)  # let the new cluster's own start-up writes (catalog, autopilot) settle
    for key, (_, local, _) in RUNS.items():
        lua = read_lua(workdir, system.name, local)
        r = run_read(system, key, lua, args.conns, args.threads, args.duration)
        res.runs[key] = r
        note_run(res, key, r, f"{r.errors} (of {r.requests} requests)")
        if r.other_cores is not None and r.other_cores >= DISTURBED_CORES:
            res.notes.append(
                f"{key}: disturbed: other processes used {r.other_cores:.2f} cores of "
                f"{os.cpu_count()} during the run ({fmt(r.rps, 0)} reads/s)"
            )
        log(f"  {system.name} {key} on {r.member}: {fmt(r.rps, 0)} req/s p50 {fmt(r.p50_ms, 2)}"
            f" ms p99 {fmt(r.p99_ms, 2)} ms, member {fmt(r.member_cores, 2)} cores, cluster "
            f"{fmt(r.cluster_cores, 2)}, wrk {fmt(r.wrk_cores, 2)}, other "
            f"{fmt(r.other_cores, 2)}; load {r.loadavg}; errors {r.errors or 0}")  # fmt: skip
        time.sleep(1.0)
    res.rss_mb = [proc_rss_mb(p) for i in range(3) if (p := system.pid(i)) is not None]
    if args.profile is not None and isinstance(system, Meshnode) and res.rep == 0:
        profile_stale(system, res, args, workdir)


def profile_stale(system: Meshnode, res: Rep, args: argparse.Namespace, workdir: Path) -> None:
    """An extra ?stale run on the follower under py-spy (not in the table: py-spy pauses the
    agent 100 times a second)."""
    li, _ = system.leader()
    fi = next(i for i in range(3) if i != li)
    pid = system.pid(fi)
    out = args.profile / "meshnode-follower-stale.collapsed"
    prof = None if pid is None else start_profile(pid, out, args.duration, system.url(fi))
    if prof is None:
        return
    lua = read_lua(workdir, "meshnode", True)
    r = run_read(system, "local_f", lua, args.conns, args.threads, args.duration)
    if note := finish_profile(prof):
        res.notes.append(note)
    res.notes.append(f"profiled extra ?stale follower run (not in the table): {fmt(r.rps, 0)} "
                     f"req/s, p99 {fmt(r.p99_ms, 1)} ms; collapsed stacks in {out}")  # fmt: skip


# ----- report ------------------------------------------------------------------------------

RUN_NAMES = {
    "local_f": "?stale | serializable, on a follower",
    "local_l": "?stale | serializable, on the leader",
    "default_f": "default | linearizable, on a follower",
    "default_l": "default | linearizable, on the leader",
}
FIELDS: list[tuple[str, str, int]] = [
    ("rps", "reads/s", 0),
    ("p50", "p50 ms", 2),
    ("p99", "p99 ms", 2),
    ("mcpu", "member CPU us/read", 1),
    ("ccpu", "cluster CPU us/read", 1),
    ("mcores", "member CPU cores busy", 2),
    ("bytes", "response bytes", 0),
    ("other", "other processes' cores", 2),
]


def values(reps: Sequence[Rep]) -> dict[str, list[float | None]]:
    keys = [f"{k}_{f}" for k in RUNS for f, _, _ in FIELDS] + ["rss", "start_s"]
    out: dict[str, list[float | None]] = {k: [] for k in keys}
    for r in reps:
        for key in RUNS:
            x = r.runs.get(key)
            rr = x if isinstance(x, ReadRun) else ReadRun(key)  # a missing run: all None
            for f, v in (
                ("rps", rr.rps), ("p50", rr.p50_ms), ("p99", rr.p99_ms),
                ("mcpu", rr.member_cpu_us_per_req), ("ccpu", rr.cpu_us_per_req),
                ("mcores", rr.member_cores), ("bytes", rr.bytes_per_resp),
                ("other", rr.other_cores),
            ):  # fmt: skip
                out[f"{key}_{f}"].append(v)
        out["rss"].append(max(r.rss_mb) if r.rss_mb else None)
        out["start_s"].append(r.start_s)
    return out


def report(results: list[Rep], systems: Sequence[str], args: argparse.Namespace) -> None:
    print()
    print(
        f"# kv_read {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; {os.cpu_count()} CPUs; wrk "
        f"-t{args.threads} -c{args.conns} {args.duration:g}s per run; median [min..max] over reps"
    )
    vals, nreps = by_system(results, systems, values)
    both = "meshnode" in systems and "etcd" in systems
    rows = [(f"{k}_{f}", f"{RUN_NAMES[k]}: {lab}", nd) for k in RUNS for f, lab, nd in FIELDS]
    rows += [("rss", "RSS per member after load, MB (max)", 1),
             ("start_s", "cluster start -> leader + first write s", 1)]  # fmt: skip
    print_table(
        rows, vals, nreps, label_width=62, width=30, title="metric (meshnode | etcd)",
        ratio=("meshnode", "etcd", "mesh/etcd") if both else None,
        anchor=("etcd anchor", ANCHOR),
    )  # fmt: skip
    for r in results:
        loads = ", ".join(f"{k} {x.loadavg}" for k, x in r.runs.items() if isinstance(x, ReadRun))
        print(f"  load average ({r.system} rep{r.rep}): at start {r.loadavg}; runs: {loads}")
    print_notes(results)
    if both:
        verdict, shown = goal(
            vals["meshnode"]["local_f_rps"], vals["etcd"]["local_f_rps"], GOAL_STALE
        )
        print("goal:")
        print(f"  {verdict}  meshnode ?stale reads/s on a follower >= {GOAL_STALE:g}x etcd "
              f"serializable reads/s on a follower: measured {shown}")  # fmt: skip


# ----- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    ap.add_argument("--reps", type=int, default=2, help="fresh clusters per system (2)")
    ap.add_argument("--conns", type=int, default=64, help="wrk connections (64)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    ap.add_argument("--only", choices=SYSTEMS, help="measure one system only")
    ap.add_argument("--json", type=Path, help="write every figure to this file")
    ap.add_argument("--log-level", default="warn", help="members' log level (warn)")
    ap.add_argument(
        "--profile", type=Path,
        help="py-spy the meshnode follower in an extra ?stale run (rep 0; .venv/bin/py-spy)",
    )  # fmt: skip
    ap.add_argument("--keep", action="store_true", help="keep the work dir (data, member logs)")
    ap.add_argument("--budget", type=float, default=1200.0, help="abort after this many s")
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.reps < 1 or args.conns < args.threads or args.threads < 1:
        ap.error("--duration > 0, --reps >= 1, --threads >= 1, --conns >= --threads")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    systems = [args.only] if args.only else list(SYSTEMS)
    ensure_tools(systems)
    workdir = begin(args.budget, "kv-read-", keep=args.keep)
    t_start = time.monotonic()
    classes: dict[str, type[System]] = {"etcd": Etcd, "meshnode": Meshnode}
    log(f"work dir {workdir}; load {loadavg()}")
    results, aborted = run_reps(
        systems, args.reps, workdir, t_start,
        make=lambda name, d: classes[name](d, args.log_level), record=Rep,
        measure=lambda system, res, d: run_rep(system, res, args, d),
    )  # fmt: skip
    report(results, systems, args)
    wrk_v = subprocess.run([WRK, "--version"], capture_output=True, text=True).stdout
    vers = {"wrk": wrk_v.split("[")[0].strip(), **{n: classes[n].versions() for n in systems}}
    print(
        f"# {time.monotonic() - t_start:.0f}s total; load at end {loadavg()}; wrk --timeout "
        f"{WRK_TIMEOUT}; " + "; ".join(f"{k}: {v.strip()}" for k, v in vers.items())
    )
    fields = {"versions": vers, "anchor_etcd": ANCHOR}
    return finish(
        args, workdir, results, aborted, systems, values, fields,
        "meshnode-follower-stale.collapsed", keep=args.keep,
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())

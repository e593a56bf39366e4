"""Process and run plumbing the benchmark scripts share, so each keeps only its systems, load
and report.

* PROCS: every process a script starts itself, killed by PID at the end, on error, from an
  atexit hook and, should the script die, by the kernel (PR_SET_PDEATHSIG);
* begin() + run_reps(): SIGTERM and --budget (SIGALRM) become exceptions that stop the reps but
  still let the partial table print; a temp work dir; reps alternating the order of systems
  (A B, B A, ...) so slow drift hits both alike; one result record per rep, filled as it goes;
* finish(): the epilogue after the table (profiles, kept work dir, --json, abort status);
* /proc readings (CPU ticks, RSS, load average), py-spy start/stop and its summary.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import Field, asdict, dataclass
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol, TypeVar

from bench.stats import med

CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BudgetExceeded(Exception):
    """--budget ran out; the partial table is still printed."""


# ----- processes ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def die_with_parent() -> None:
    """preexec_fn: the kernel SIGKILLs the child if this script dies without cleaning up."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Procs:
    """Processes this script started itself (servers, load generators, py-spy), killed by PID;
    idempotent."""

    def __init__(self) -> None:
        self.popens: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, argv: Sequence[str], log_file: IO[bytes]) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        self.popens[p.pid] = p
        return p

    def kill(self, p: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(sig)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(timeout=10)
        self.popens.pop(p.pid, None)

    def kill_all(self) -> None:
        for p in list(self.popens.values()):
            self.kill(p)


PROCS = Procs()
atexit.register(PROCS.kill_all)


def proc_ticks(pid: int) -> int:
    """utime + stime of a process (all threads), 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return 0
    fields = s[s.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def proc_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def apt_install(need: Sequence[str]) -> None:
    """apt-get install the missing packages (as root), and say so on stdout."""
    if not need:
        return
    if os.geteuid() != 0:
        raise SystemExit(f"missing {need}: run as root or apt-get install -y {' '.join(need)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *need]
    log(f"installing {' '.join(need)}: {' '.join(cmd)}")
    # apt-get's chatter goes to stderr with the other progress; stdout keeps only the table
    if subprocess.run(cmd, env=env, stdout=sys.stderr).returncode != 0:
        log("apt-get install failed; running apt-get update and trying once more")
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=sys.stderr, check=True)
        subprocess.run(cmd, env=env, stdout=sys.stderr, check=True)
    print(f"# installed with apt-get: {' '.join(need)}")


# ----- the reps ----------------------------------------------------------------------------


class RepRecord(Protocol):
    """What run_reps needs of a script's per-rep result (a dataclass, for --json)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]
    system: str
    rep: int
    loadavg: str
    error: str
    notes: list[str]


class Subject(Protocol):
    """A system under test, as run_reps handles it."""

    def stop(self) -> None: ...

    def log_tails(self, lines: int = 30) -> str: ...


R = TypeVar("R", bound=RepRecord)
S = TypeVar("S", bound=Subject)


def begin(budget: float, workdir_prefix: str, keep: bool = False) -> Path:
    """Turn SIGTERM into KeyboardInterrupt and --budget into BudgetExceeded (from now on), and
    make the work dir in /tmp, removed at exit unless keep."""

    def on_signal(signum: int, frame: object) -> None:
        if signum == signal.SIGALRM:
            raise BudgetExceeded(f"--budget {budget:g}s")
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(max(1, int(budget)))
    workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix, dir="/tmp"))
    if not keep:
        atexit.register(shutil.rmtree, workdir, True)
    return workdir


def run_reps(
    systems: Sequence[str], reps: int, workdir: Path, t_start: float,
    make: Callable[[str, Path], S], record: Callable[[str, int], R],
    measure: Callable[[S, R, Path], None], *,
    before: Callable[[], None] | None = None, pause: float = 0.0,
) -> tuple[list[R], str]:  # fmt: skip
    """Run `reps` reps of every system, alternating their order, one system at a time.

    Per rep and system: make(name, dir) builds it in a fresh dir under workdir, record(name,
    rep) is appended to the results before measure(system, record, dir) fills it, and the
    system is stopped whatever happens. A failed rep is noted (with the system's log tails)
    and the next one runs; Ctrl-C, SIGTERM or the budget stops them all. Returns the results
    and why the reps were aborted ("" when they all ran); every process in PROCS is killed.
    """
    results: list[R] = []
    aborted = ""
    try:
        if before is not None:
            before()
        for rep in range(reps):
            order = systems if rep % 2 == 0 else list(reversed(systems))
            for name in order:
                d = workdir / f"{name}-rep{rep}"
                d.mkdir()
                system = make(name, d)
                res = record(name, rep)
                res.loadavg = loadavg()
                results.append(res)
                log(f"[{time.monotonic() - t_start:6.1f}s] {name} rep {rep} (load {res.loadavg})")
                try:
                    measure(system, res, d)
                except (KeyboardInterrupt, BudgetExceeded):
                    res.error = "aborted during this rep"
                    raise
                except Exception as e:
                    res.error = f"{type(e).__name__}: {e}"
                    log(f"  {name} rep {rep} FAILED: {res.error}\n{system.log_tails()}")
                finally:
                    system.stop()
                if pause:
                    time.sleep(pause)
    except (KeyboardInterrupt, BudgetExceeded) as e:
        aborted = f"{type(e).__name__} {e}"
        log(f"aborted ({aborted}); cleaning up; partial results follow")
    finally:
        signal.alarm(0)
        PROCS.kill_all()
    return results, aborted


def by_system(
    results: Sequence[R], systems: Sequence[str],
    values: Callable[[Sequence[R]], dict[str, list[float | None]]],
) -> tuple[dict[str, dict[str, list[float | None]]], dict[str, int]]:  # fmt: skip
    """Per system: every figure over its reps (values() of its results), and how many reps."""
    vals = {s: values([r for r in results if r.system == s]) for s in systems}
    nreps = {s: sum(1 for r in results if r.system == s) for s in systems}
    return vals, nreps


def print_notes(results: Sequence[RepRecord]) -> None:
    """A rep's error, then its notes, a line each under the table."""
    for r in results:
        for n in ([r.error] if r.error else []) + r.notes:
            print(f"  note: {r.system} rep{r.rep}: {n}")


def finish(
    args: argparse.Namespace, workdir: Path, results: Sequence[R], aborted: str,
    systems: Sequence[str], values: Callable[[Sequence[R]], dict[str, list[float | None]]],
    json_fields: dict[str, Any], profile_glob: str, keep: bool = False,
) -> int:  # fmt: skip
    """After the table: py-spy summaries, the kept work dir, --json (args, json_fields,
    medians, reps, aborted), and the exit status (3 if aborted)."""
    if args.profile is not None:
        for prof in sorted(args.profile.glob(profile_glob)):
            print(f"# profile {prof}:\n{summarize_profile(prof)}")
    if keep:
        print(f"# work dir kept: {workdir}")
    if args.json is not None:
        doc = {
            "args": {k: str(v) for k, v in vars(args).items()},
            **json_fields,
            "medians": {
                s: {k: med(v) for k, v in figures.items()}
                for s, figures in by_system(results, systems, values)[0].items()
            },
            "reps": [asdict(r) for r in results],
            "aborted": aborted,
        }
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"# figures written to {args.json}")
    if aborted:
        print(f"# ABORTED ({aborted}) before all reps ran")
        return 3
    return 0


# ----- profiling (optional) ----------------------------------------------------------------


@dataclass
class Profile:
    popen: subprocess.Popen[bytes]
    out: Path
    log: IO[bytes]


def start_profile(pid: int, out: Path, duration: float, what: str) -> Profile | None:
    """py-spy (from the venv) on pid for about `duration` s, raw stacks of all threads to out;
    None (and a log line) when there is no py-spy."""
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        log("  --profile: no py-spy in the venv (.venv/bin/pip install py-spy); skipped")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    f = (out.parent / "py-spy.log").open("ab")
    argv = [str(spy), "record", "-p", str(pid), "-d", str(max(1, round(duration))), "-r", "100",
            "-f", "raw", "--threads", "-o", str(out)]  # fmt: skip
    log(f"  profiling {what} (pid {pid}): {' '.join(argv)}")
    return Profile(PROCS.start(argv, f), out, f)


def finish_profile(p: Profile) -> str:
    """Wait for py-spy to write its profile (SIGINT makes it write what it has); "" or a note."""
    try:
        p.popen.wait(timeout=30)
    except subprocess.TimeoutExpired:
        PROCS.kill(p.popen, signal.SIGINT)
    PROCS.popens.pop(p.popen.pid, None)
    p.log.close()
    if not p.out.exists():
        return f"py-spy wrote no profile; see {p.out.parent / 'py-spy.log'}"
    return ""


def summarize_profile(path: Path, top: int = 15) -> str:
    """Per thread: share of samples, top self frames, top inclusive meshnode frames.

    Input: py-spy --threads raw output, lines "thread (tid): name;frame;...;frame count".
    A thread's share is of all samples of all threads; the main thread runs the event loop, a
    leaf in Runner.run is time in uvloop's C code (socket I/O and its callbacks' C parts).
    """
    by_thread: dict[str, dict[str, dict[str, int]]] = {}
    totals: dict[str, int] = {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        first, _, rest = stack.partition(";")
        name = first.split(": ", 1)[-1] if first.startswith("thread (") else "?"
        name = re.sub(r"_\d+$", "", name)  # raft-io_0 -> raft-io
        frames = [re.sub(r":\d+\)$", ")", fr) for fr in (rest or first).split(";")]
        t = by_thread.setdefault(name, {"self": {}, "incl": {}})
        totals[name] = totals.get(name, 0) + n
        t["self"][frames[-1]] = t["self"].get(frames[-1], 0) + n
        for fr in set(frames):
            t["incl"][fr] = t["incl"].get(fr, 0) + n
    total = sum(totals.values())
    if not total:
        return "(no samples)"
    lines = [f"{total} samples (100 Hz, all threads)"]
    for name in sorted(totals, key=lambda k: -totals[k]):
        tn = totals[name]
        lines.append(f"thread {name}: {tn} samples ({100 * tn / total:.1f}%); top self:")
        for fr, n in sorted(by_thread[name]["self"].items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"  {100 * n / tn:5.1f}%  {fr}")
        own = [
            (fr, n) for fr, n in by_thread[name]["incl"].items()
            if re.search(r"\((node|gossip)/", fr) and not re.search(r"\(node/(cli|__main__)", fr)
        ]  # fmt: skip
        if own:
            lines.append(f"thread {name}: top inclusive meshnode frames:")
            for fr, n in sorted(own, key=lambda kv: -kv[1])[:top]:
                lines.append(f"  {100 * n / tn:5.1f}%  {fr}")
    return "\n".join(lines)

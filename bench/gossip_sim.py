"""The sans-I/O gossip core at 1,000 and 10,000 nodes on the deterministic simulator, versus SWIM.

    .venv/bin/python bench/gossip_sim.py --n 1000                 # ~6-9 min on 2 cores
    .venv/bin/python bench/gossip_sim.py                          # 1000 then 10000 (time-bounded)
    .venv/bin/python bench/gossip_sim.py --n 300,1000 --crashes 20

Per size (LAN timings: probe interval 1 s = one protocol period, gossip every 0.2 s to 3 nodes):

1. formation: n nodes, each joins a random earlier node, spread over max(5 s, n/200 s); run until
   every node lists all n alive. Then run until every broadcast queue is empty (the join news
   is retransmitted 4*ceil(log10(n+1)) times by every node, which takes a while).
2. steady state: a window of --window periods with no failures: UDP packets (and the messages
   inside them, and bytes) sent per node per period, and TCP push/pulls per node per period.
3. --crashes times: crash a random node at a random phase of the period, then measure, in
   periods: crash -> first ping sent to it, -> first suspicion anywhere, -> first node declaring
   it failed, -> every live node has declared it failed. Dissemination = the last minus the first.

SWIM (Das, Gupta, Motivala 2002) expectations printed next to the figures:
* first detection: e/(e-1) = 1.58 periods when each member pings a uniformly random member per
  period and a detection is counted as whole periods. memberlist probes a shuffled round-robin
  list at staggered phases, so in continuous time pings reach a given member at a rate of about
  one per period: crash -> first ping ~ Exp(1), mean 1.0, and the ping is declared failed
  (suspicion) at the end of its probe period, one period later: mean ~2.0.
* failure (not in SWIM's basic protocol; SWIM's suspicion + Lifeguard): first suspicion + the
  suspicion timeout, 4*log10(n) periods once 2 independent confirmations arrived (up to 6x that).
* dissemination: O(log n) periods. For push gossip with fan-out f=3 every 0.2 s, a rough epidemic
  estimate is (log_{f+1} n + ln(n)/f) rounds of 0.2 s.
* message load per member per period: constant in n. With empty broadcast queues a memberlist
  node sends one ping and one ack per period: 2 packets.

Everything is bounded: --max-seconds of wall time per size and --max-rss-gb of memory (checked
while the simulation runs; an address-space limit a little above it backs that up). A size that
hits a bound is reported with how far it got and a projection of what the full run would need.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import random
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from gossip.config import push_pull_scale, suspicion_timeout  # noqa: E402
from gossip.messages import MessageType, NodeState  # noqa: E402
from gossip.packet import PacketError, decode_udp  # noqa: E402
from gossip.serf import Serf  # noqa: E402
from gossip.swim import Address  # noqa: E402
from tests.sim.network import SimNetwork, SimNode  # noqa: E402

SWIM_FIRST_DETECTION = math.e / (math.e - 1)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024 / 1024
    return 0.0


class OutOfBudget(Exception):
    """The size ran out of wall time or memory; the result says how far it got."""


class BenchNet(SimNetwork):
    """SimNetwork that also counts what the steady-state window and the crash trials need."""

    def __init__(self, seed: int, layer: Literal["serf", "memberlist"]) -> None:
        super().__init__(seed, layer=layer)
        self.push_pulls = 0
        self.push_pull_bytes = 0
        self.count_push_pull = False
        self.decode_window = False
        self.msg_types: Counter[str] = Counter()
        self.messages = 0
        self.watch: Address | None = None
        self.first_ping_to_watch: float | None = None

    def _send(self, src: SimNode, dest: Address, data: bytes) -> None:
        if self.decode_window or (dest == self.watch and self.first_ping_to_watch is None):
            try:
                msgs = decode_udp(data, None)
            except PacketError:
                msgs = []
            if self.decode_window:
                self.messages += len(msgs)
                for m in msgs:
                    self.msg_types[_type_name(m[0])] += 1
            if dest == self.watch and any(m[0] == MessageType.PING for m in msgs):
                self.first_ping_to_watch = self.now
        super()._send(src, dest, data)

    def _push_pull(
        self, src: SimNode, dest: Address, join: bool, done: Callable[[bool], None] | None
    ) -> None:
        self.push_pulls += 1
        if self.count_push_pull:  # both directions carry a full member list of about this size
            self.push_pull_bytes += 2 * len(src.serf.memberlist.join_state(join).encode())
        super()._push_pull(src, dest, join, done)


def _type_name(t: int) -> str:
    try:
        return MessageType(t).name.lower()
    except ValueError:
        return f"type{t}"


@dataclass
class Crash:
    victim: str
    first_ping: float | None = None
    first_suspect: float | None = None
    all_suspect: float | None = None
    first_failed: float | None = None
    all_failed: float | None = None  # None: not every live node within the limit

    @property
    def suspicion_spread(self) -> float | None:
        if self.first_suspect is None or self.all_suspect is None:
            return None
        return self.all_suspect - self.first_suspect

    @property
    def dissemination(self) -> float | None:
        if self.first_failed is None or self.all_failed is None:
            return None
        return self.all_failed - self.first_failed


@dataclass
class SizeResult:
    n: int
    seed: int
    warm: bool = False  # bare memberlist with preloaded views, instead of Serf nodes that join
    phase: str = "start"
    stopped: str | None = None  # why the size did not finish
    wall: dict[str, float] = field(default_factory=dict)
    formation: float | None = None
    drain: float | None = None
    drained: bool = False
    pkts: float | None = None  # per node per period, steady state
    msgs: float | None = None
    bytes_: float | None = None
    push_pulls: float | None = None
    push_pull_bytes: float | None = None
    msg_types: dict[str, float] = field(default_factory=dict)
    crashes: list[Crash] = field(default_factory=list)
    false_failures: int | None = None
    peak_rss_gb: float = 0.0
    progress: str = ""
    projection: str = ""


class SizeRun:
    def __init__(
        self, n: int, seed: int, max_seconds: float, max_rss_gb: float, *, warm: bool
    ) -> None:
        self.n = n
        self.warm = warm
        self.res = SizeResult(n, seed, warm)
        self.deadline = time.monotonic() + max_seconds
        self.max_rss = max_rss_gb
        self.net = BenchNet(seed, "memberlist" if warm else "serf")
        self.rng = random.Random(seed ^ 0x5EED)
        self.t_wall = time.monotonic()
        self.t_start = self.t_wall
        self.guard_calls = 0

    # -- bounds ----------------------------------------------------------------------------

    def guard(self) -> None:
        self.guard_calls += 1
        rss = rss_gb()
        self.res.peak_rss_gb = max(self.res.peak_rss_gb, rss)
        if rss > self.max_rss:
            raise OutOfBudget(f"memory: RSS {rss:.1f} GB > --max-rss-gb {self.max_rss:g}")
        if time.monotonic() > self.deadline:
            raise OutOfBudget("time: --max-seconds reached")

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.res.wall[phase] = now - self.t_wall
        self.t_wall = now
        log(
            f"  n={self.n} {phase}: {self.res.wall[phase]:.1f}s wall, sim t={self.net.now:.1f}s, "
            f"rss {rss_gb():.2f} GB"
        )

    # -- phases ----------------------------------------------------------------------------

    def form(self) -> None:
        net, n = self.net, self.n
        self.res.phase = "formation"
        nodes = [net.add_node()]
        window = max(5.0, n / 200)
        for i in range(1, n):
            node = net.add_node()
            seed = nodes[net.rng.randrange(len(nodes))]
            nodes.append(node)
            net.at(window * i / n, functools.partial(net.join, node, seed))
        last_log = [time.monotonic()]

        def formed() -> bool:
            self.guard()
            if time.monotonic() - last_log[0] > 30:
                last_log[0] = time.monotonic()
                log(f"  n={n} forming: sim t={net.now:.1f}s, {self.view_progress()}")
            if any(len(x.serf.memberlist.nodes) < n for x in net.nodes):
                return False
            return net.all_see_all_alive()

        check = 0.25 if n > 2000 else 1.0
        if not net.run_until(window + 300.0, stop=formed, check=check):
            raise OutOfBudget(f"no convergence within {window + 300:.0f} s of simulated time")
        self.res.formation = net.now
        self.lap("formation")

    def build_warm(self) -> None:
        """Bare memberlist nodes with the converged view preloaded (tests/sim/bare.py)."""
        self.res.phase = "preload"
        self.net.add_converged(self.n)
        self.guard()
        self.lap("preload")

    def drain(self) -> None:
        net = self.net
        self.res.phase = "drain"
        t0 = net.now
        for node in net.nodes:  # from here on, any FAILED event about a live node is false
            node.failed_events.clear()

        def empty() -> bool:
            self.guard()
            return self.queued() == 0

        self.res.drained = net.run_until(t0 + 300.0, stop=empty, check=1.0)
        self.res.drain = net.now - t0
        self.lap("drain")

    def steady(self, periods: int) -> None:
        net, n = self.net, self.n
        self.res.phase = "steady"
        pi = net.config.probe_interval
        pp_interval = push_pull_scale(net.config.push_pull_interval, n)
        # A node's first push/pull comes at a random point of its first 30 s, and each later one
        # 30 s scaled by log2 of the members it knew at the previous one. From 60 s plus one
        # scaled interval on, every node is on the regular schedule for the final n.
        # Preloaded nodes start on that schedule already (start() spreads their first push/pull
        # over the scaled interval), and their push/pulls are counted in the UDP window below.
        warm = 0.0 if self.warm else 2 * net.config.push_pull_interval + pp_interval
        while net.now < warm:
            net.run_until(min(warm, net.now + 10.0))
            self.guard()
        # UDP: `periods` periods, every packet decoded to count messages by type
        p0, b0 = net.packets, net.bytes
        net.decode_window = True
        net.messages = 0
        net.msg_types.clear()
        pp0, ppb0 = net.push_pulls, net.push_pull_bytes
        net.count_push_pull = self.warm
        for _ in range(periods):
            net.run_until(net.now + pi)
            self.guard()
        net.decode_window = False
        net.count_push_pull = False
        norm = n * periods
        self.res.pkts = (net.packets - p0) / norm
        self.res.bytes_ = (net.bytes - b0) / norm
        self.res.msgs = net.messages / norm
        self.res.msg_types = {k: v / norm for k, v in net.msg_types.most_common()}
        if self.warm:
            self.res.push_pulls = (net.push_pulls - pp0) / norm
            self.res.push_pull_bytes = (net.push_pull_bytes - ppb0) / norm
            self.lap("steady")
            return
        # TCP push/pull: one whole scaled interval, in which every node starts about one
        pp0, ppb0 = net.push_pulls, net.push_pull_bytes
        net.count_push_pull = True
        t_end = net.now + pp_interval
        while net.now < t_end:
            net.run_until(min(t_end, net.now + 10.0))
            self.guard()
        net.count_push_pull = False
        norm_pp = n * pp_interval / pi
        self.res.push_pulls = (net.push_pulls - pp0) / norm_pp
        self.res.push_pull_bytes = (net.push_pull_bytes - ppb0) / norm_pp
        self.lap("steady")

    def crash_trials(self, count: int) -> None:
        net = self.net
        self.res.phase = "crashes"
        pi = net.config.probe_interval
        limit = 6 * suspicion_timeout(4, self.n, pi) + 60.0
        crashed: set[str] = set()
        for k in range(count):
            net.run_until(net.now + self.rng.random() * pi)  # a random phase of the period
            self.guard()
            victim = self.rng.choice([x for x in net.nodes[1:] if not x.crashed])
            c = Crash(victim.name)
            self.res.crashes.append(c)
            net.watch, net.first_ping_to_watch = victim.addr, None
            net.crash(victim)
            crashed.add(victim.name)
            t0 = net.now
            live = net.live()

            def suspects(x: SimNode, name: str = victim.name) -> bool:
                info = x.serf.memberlist.nodes.get(name)
                return info is not None and info.state != NodeState.ALIVE

            def anyone(live: list[SimNode] = live) -> bool:
                return any(suspects(x) for x in live)

            def all_suspect(live: list[SimNode] = live) -> bool:
                return all(suspects(x) for x in live)

            if net.run_until(t0 + limit, stop=anyone, check=0.02):
                c.first_suspect = (net.now - t0) / pi
            if net.run_until(t0 + limit, stop=all_suspect, check=0.02):
                c.all_suspect = (net.now - t0) / pi
            if net.first_ping_to_watch is not None:
                c.first_ping = (net.first_ping_to_watch - t0) / pi
            net.watch = None

            def failed_at(x: SimNode, name: str = victim.name) -> float | None:
                for t, who in x.failed_events:
                    if who == name:
                        return t
                return None

            def everyone(live: list[SimNode] = live) -> bool:
                self.guard()
                return all(failed_at(x) is not None for x in live)

            done = net.run_until(t0 + limit, stop=everyone, check=0.25)
            times = [t for t in (failed_at(x) for x in live) if t is not None]
            if times:
                c.first_failed = (min(times) - t0) / pi
            if done:
                c.all_failed = (max(times) - t0) / pi
            log(
                f"  n={self.n} crash {k + 1}/{count} {victim.name}: first ping "
                f"{_f(c.first_ping)}, suspect first/all {_f(c.first_suspect)}/"
                f"{_f(c.all_suspect)}, first failed "
                f"{_f(c.first_failed)}, all failed {_f(c.all_failed)} periods"
            )
        self.res.false_failures = sum(
            1 for x in net.live() for _, who in x.failed_events if who not in crashed
        )
        self.lap("crashes")

    # -- observations ----------------------------------------------------------------------

    def queued(self) -> int:
        total = 0
        for x in self.net.nodes:
            if x.crashed:
                continue
            total += len(x.serf.memberlist.broadcasts)
            if isinstance(x.serf, Serf):
                total += (
                    len(x.serf.intent_broadcasts)
                    + len(x.serf.event_broadcasts)
                    + len(x.serf.query_broadcasts)
                )
        return total

    def view_sizes(self) -> list[int]:
        return [len(x.serf.memberlist.nodes) for x in self.net.nodes]

    def view_progress(self) -> str:
        sizes = self.view_sizes()
        entries = sum(sizes)
        full = sum(1 for s in sizes if s >= self.n)
        return (
            f"member entries {entries:,} of {self.n * self.n:,} "
            f"({100 * entries / (self.n * self.n):.1f}%), {full} nodes with a complete view, "
            f"smallest view {min(sizes)}, packets {self.net.packets:,}"
        )

    def project(self) -> str:
        """Memory and time a full formation would need, from what this run did so far."""
        sizes = self.view_sizes()
        entries = sum(sizes)
        if entries <= len(sizes):
            return ""
        per_entry = rss_gb() * 1024**3 / entries
        full = self.n * self.n
        return (
            f"~{per_entry:,.0f} B of RSS per member entry (node x known member) so far; a full "
            f"view everywhere is {full:,} entries -> ~{per_entry * full / 1024**3:,.0f} GB; "
            f"simulated time reached {self.net.now:.1f} s after "
            f"{time.monotonic() - self.t_start:.0f} s of wall time"
        )


def _f(x: float | None, nd: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def run_size(args: argparse.Namespace, n: int, warm: bool) -> SizeResult:
    mode = "bare memberlist, preloaded views" if warm else "Serf nodes joining"
    log(
        f"n={n} ({mode}): seed {args.seed}, max {args.max_seconds:g}s wall, "
        f"max {args.max_rss_gb:g} GB"
    )
    run = SizeRun(n, args.seed, args.max_seconds, args.max_rss_gb, warm=warm)
    try:
        if warm:
            run.build_warm()
        else:
            run.form()
        run.drain()
        run.steady(args.window)
        run.crash_trials(args.crashes_warm if warm else args.crashes)
        run.res.phase = "done"
    except (OutOfBudget, MemoryError) as e:
        run.res.stopped = f"{type(e).__name__}: {e}" if isinstance(e, MemoryError) else str(e)
        run.res.wall[run.res.phase + " (stopped)"] = time.monotonic() - run.t_wall
        run.res.progress = run.view_progress()
        run.res.projection = run.project()
        log(f"  n={n} stopped in {run.res.phase}: {run.res.stopped}; {run.res.progress}")
    run.res.peak_rss_gb = max(run.res.peak_rss_gb, rss_gb())
    res = run.res
    del run
    gc.collect()
    return res


# ----- report ------------------------------------------------------------------------------


def stat(xs: Sequence[float | None], nd: int = 2) -> str:
    v = [x for x in xs if x is not None]
    if not v:
        return "n/a"
    s = f"{statistics.mean(v):.{nd}f} [{min(v):.{nd}f}..{max(v):.{nd}f}]"
    if len(v) < len(xs):
        s += f" ({len(xs) - len(v)} n/a)"
    return s


def epidemic_rounds(n: int, fanout: int = 3) -> float:
    return math.log(n) / math.log(fanout + 1) + math.log(n) / fanout


def report(results: list[SizeResult], args: argparse.Namespace) -> None:
    print()
    print(
        f"# gossip_sim {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: seed {args.seed}, LAN timings "
        "(1 period = probe interval 1 s), steady window "
        f"{args.window} periods, {args.crashes} crashes per size ({args.crashes_warm} for "
        ":warm sizes); mean [min..max]"
    )
    for r in results:
        n = r.n
        smin = suspicion_timeout(4, n, 1.0)
        pp_every = push_pull_scale(30.0, n)
        print()
        status = "complete" if r.stopped is None else f"STOPPED in {r.phase}: {r.stopped}"
        mode = (
            "bare memberlist, converged views preloaded"
            if r.warm
            else "Serf nodes, formed by joins"
        )
        print(f"## n={n:,}, {mode} ({status}; peak RSS {r.peak_rss_gb:.2f} GB)")
        walls = ", ".join(f"{k} {v:.0f}s" for k, v in r.wall.items())
        print(f"wall time: {walls}")
        rows: list[tuple[str, str, str]] = [
            ("formation: joins start -> all see all alive (sim s)", _f(r.formation, 1), ""),
            (
                "broadcast queues drained after (sim s)",
                _f(r.drain, 1) + ("" if r.drained or r.drain is None else " (NOT empty)"),
                "",
            ),
            (
                "steady: UDP packets sent / node / period",
                _f(r.pkts, 3),
                "constant in n; 2 (1 ping + 1 ack)",
            ),
            ("steady: messages sent / node / period", _f(r.msgs, 3), "constant in n"),
            ("steady: UDP bytes sent / node / period", _f(r.bytes_, 0), "constant in n"),
            (
                "steady: TCP push/pulls started / node / period (1 interval)",
                _f(r.push_pulls, 4),
                f"not in SWIM; memberlist: 1 per {pp_every:g} s = {1 / pp_every:.4f}",
            ),
            (
                "steady: TCP push/pull bytes (both ways) / node / period",
                _f(r.push_pull_bytes, 0),
                "O(n/log n): the full member list each time",
            ),
        ]
        if r.msg_types:
            mix = ", ".join(f"{k} {v:.3f}" for k, v in r.msg_types.items())
            rows.append(("steady: message mix / node / period", mix, ""))
        cr = r.crashes
        if cr:
            rows += [
                (
                    "crash -> first ping sent to it (periods)",
                    stat([c.first_ping for c in cr]),
                    f"~1.0 (continuous); SWIM discrete e/(e-1) = {SWIM_FIRST_DETECTION:.2f}",
                ),
                (
                    "crash -> first suspicion (periods)",
                    stat([c.first_suspect for c in cr]),
                    "first ping + 1 (suspect at end of its probe period): ~2.0",
                ),
                (
                    "crash -> first node declares failed (periods)",
                    stat([c.first_failed for c in cr]),
                    f"first suspicion + {smin:g} (4*log10 n; up to {6 * smin:g})",
                ),
                (
                    "crash -> every live node declared failed (periods)",
                    stat([c.all_failed for c in cr]),
                    "",
                ),
                (
                    "suspicion spread: first -> every node suspects (periods)",
                    stat([c.suspicion_spread for c in cr]),
                    f"O(log n); push-epidemic estimate {epidemic_rounds(n) * 0.2:.2f}",
                ),
                (
                    "failure spread: every - first declared failed (periods)",
                    stat([c.dissemination for c in cr]),
                    "O(log n); at most the suspicion spread (own timers)",
                ),
                (
                    "crashes seen failed by every live node",
                    f"{sum(c.all_failed is not None for c in cr)}/{len(cr)}",
                    f"{len(cr)}/{len(cr)}",
                ),
            ]
        if r.false_failures is not None:
            rows.append(("healthy nodes declared failed (events)", str(r.false_failures), "0"))
        w0 = max(len(label) for label, _, _ in rows)
        w1 = max(12, max(len(value) for _, value, _ in rows))
        print(f"{'metric':<{w0}} | {'measured':<{w1}} | expectation (SWIM / memberlist)")
        print("-" * (w0 + w1 + 40))
        for label, value, expect in rows:
            print(f"{label:<{w0}} | {value:<{w1}} | {expect}")
        if r.stopped is not None:
            print(f"how far it got: {r.progress}")
            if r.projection:
                print(f"projection: {r.projection}")
    for warm in (False, True):
        done = [r for r in results if r.pkts is not None and r.warm == warm]
        if len(done) >= 2 and done[0].n != done[-1].n:
            scaling(done[0], done[-1])


def scaling(a: SizeResult, b: SizeResult) -> None:
    print()
    kind = "preloaded bare memberlist" if a.warm else "joined Serf nodes"
    print(f"## scaling {a.n:,} -> {b.n:,} nodes ({kind})")
    if a.pkts and b.pkts:
        print(f"packets / node / period ratio: {b.pkts / a.pkts:.2f} (SWIM: 1.00)")
    ln_ratio = math.log(b.n) / math.log(a.n)
    for what, get in (
        ("suspicion spread", lambda c: c.suspicion_spread),
        ("failure spread", lambda c: c.dissemination),
    ):
        xa = [x for x in map(get, a.crashes) if x is not None]
        xb = [x for x in map(get, b.crashes) if x is not None]
        if xa and xb:
            q = statistics.mean(xb) / statistics.mean(xa)
            print(f"{what} ratio: {q:.2f} (O(log n): ln n ratio {ln_ratio:.2f})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--n",
        default="1000,1000:warm,10000:warm",
        help="comma list of sizes; N: Serf nodes that join, N:warm: bare memberlist nodes with\n"
        "preloaded converged views (default 1000,1000:warm,10000:warm)",
    )
    ap.add_argument("--seed", type=int, default=20261124)
    ap.add_argument("--window", type=int, default=20, help="steady-state periods (20)")
    ap.add_argument("--crashes", type=int, default=20, help="crash trials per joined size (20)")
    ap.add_argument("--crashes-warm", type=int, default=5, help="per :warm size (5)")
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="wall time per size (1800)")
    ap.add_argument("--max-rss-gb", type=float, default=20.0, help="memory bound (20 GB)")
    args = ap.parse_args(argv)
    args.sizes = []
    for tok in (x.strip() for x in str(args.n).split(",")):
        if not tok:
            continue
        num, _, mode = tok.partition(":")
        if not num.isdigit() or mode not in ("", "warm"):
            ap.error(f"--n: {tok!r} is neither N nor N:warm")
        if int(num) < 10:
            ap.error(f"--n: size {num} is below 10")
        args.sizes.append((int(num), mode == "warm"))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # backstop for the RSS checks, which only run between simulation steps
    limit = int((args.max_rss_gb + 2) * 1024**3)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or hard > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    t0 = time.monotonic()
    results: list[SizeResult] = []
    try:
        for n, warm in args.sizes:
            results.append(run_size(args, n, warm))
    except KeyboardInterrupt:
        log("interrupted; partial results follow")
    report(results, args)
    print(f"# {time.monotonic() - t0:.0f}s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())

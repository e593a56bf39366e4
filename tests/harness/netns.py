"""Network-namespace "hosts" on one Linux bridge, for multi-host tests.

Each host is a network namespace with its own address, so several agents can use the
same ports, mDNS works between them, and the network between them can be cut::

    from tests.harness.netns import NetnsCluster, unique_prefix

    with NetnsCluster(3, unique_prefix("mt")) as c:       # builds on __enter__
        srv = c.popen(1, ["python3", "-m", "http.server", "8080", "--bind", c.ip(1)])
        c.partition(1)            # host 1 cut off from hosts 2 and 3 (silent drops)
        c.heal()                  # every partition removed
        c.loss(2, 30)             # 30 % of frames leaving host 2 dropped; loss(2, 0) clears
        c.pause(1); c.resume(1)   # SIGSTOP / SIGCONT of what runs in host 1
    # down(): processes killed, namespaces, bridge, nft table, iptables rule removed

Layout for prefix P and net N (a /24 inside 198.18.0.0/15, e.g. "198.18.7"):

* host i (1..n) is namespace ``P-i``; its ``eth0`` is ``N.i/24``, lo is up, and
  224.0.0.0/4 routes via eth0 so multicast (mDNS) works without pinning an interface;
* the host side of its veth pair is ``Pv<i>``, enslaved to bridge ``Pbr``;
* the root namespace has ``N.254`` on the bridge, so the test process reaches every host
  directly (also a partitioned one: partitions only drop frames *between* hosts);
* chaos rules live in the nft table ``bridge P_chaos`` (forward hook), each tagged with a
  comment (``part i``, ``pair i j``, ``loss i``) so heal removes exactly those rules;
* because ``net.bridge.bridge-nf-call-iptables=1`` sends bridged frames through iptables
  FORWARD (whose policy dockerd may set to DROP), an ACCEPT rule for the bridge is inserted.

Names must fit IFNAMSIZ (15), so prefixes are short: ``unique_prefix(root)`` gives
``<root><pid><letter>``, unique per process and per cluster. ``cleanup_stale(root)`` removes
what crashed runs left behind (objects whose embedded pid is no longer alive).
Clusters also tear down on context exit and, as a last resort, at interpreter exit.

Needs root plus iproute2, nftables and iptables (``make test`` installs them).
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

__all__ = [
    "REQUIRED_TOOLS",
    "HarnessError",
    "NetnsCluster",
    "available",
    "cleanup_stale",
    "missing_tools",
    "pid_alive",
    "unavailable_reason",
    "unique_prefix",
]

#: command -> Debian package that provides it
REQUIRED_TOOLS: dict[str, str] = {"ip": "iproute2", "nft": "nftables", "iptables": "iptables"}

_ALLOWED = ipaddress.IPv4Network("198.18.0.0/15")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]*$")
_NET_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")
_IFNAMSIZ = 15
_IPT_COMMENT = "meshharness"
_CMD_TIMEOUT = 10.0

_counter = itertools.count()
_live: set[NetnsCluster] = set()


class HarnessError(RuntimeError):
    """The test network could not be built or torn down."""


def missing_tools() -> list[str]:
    """Required commands not on PATH, as 'cmd (apt package)'."""
    return [f"{cmd} ({pkg})" for cmd, pkg in REQUIRED_TOOLS.items() if shutil.which(cmd) is None]


def _require_tools() -> None:
    missing = missing_tools()
    if missing:
        pkgs = " ".join(sorted({REQUIRED_TOOLS[m.split()[0]] for m in missing}))
        raise HarnessError(
            f"missing system tools: {', '.join(missing)}; install with: apt-get install -y {pkgs}"
        )


def unavailable_reason() -> str | None:
    """Why netns clusters cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the netns tests as root, as CI does)"
    if shutil.which("ip") is None:
        return "'ip' not found: apt-get install -y iproute2"
    try:
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=_CMD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"'ip netns list' failed: {e}"
    if r.returncode != 0:
        return f"'ip netns list' failed: {r.stderr.decode(errors='replace').strip()}"
    return None


def available() -> bool:
    """True when we are root and ``ip netns`` works."""
    return unavailable_reason() is None


def unique_prefix(root: str = "mt") -> str:
    """A prefix no other process (and no other cluster of this one) uses: root+pid+letter."""
    if not re.fullmatch(r"[a-z]{1,3}", root):
        raise ValueError(f"prefix root must be 1-3 lowercase letters, got {root!r}")
    k = next(_counter)
    letters = ""
    while True:
        k, r = divmod(k, 26)
        letters = chr(ord("a") + r) + letters
        if k == 0:
            break
        k -= 1
    return f"{root}{os.getpid()}{letters}"


def _run(
    argv: Sequence[str], *, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        list(argv), capture_output=True, text=True, input=input, timeout=_CMD_TIMEOUT
    )
    if check and r.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} failed (rc {r.returncode}): {r.stderr.strip()}")
    return r


def _json(argv: Sequence[str]) -> Any:
    r = _run(argv, check=False)
    if r.returncode != 0 or not r.stdout.strip():
        return None
    return json.loads(r.stdout)


def _netns_names() -> list[str]:
    data = _json(["ip", "-j", "netns", "list"]) or []
    return [str(d["name"]) for d in data]


def _link_names() -> list[str]:
    data = _json(["ip", "-j", "link", "show"]) or []
    return [str(d["ifname"]) for d in data]


def _nft_bridge_tables() -> list[str]:
    if shutil.which("nft") is None:
        return []
    data = _json(["nft", "-j", "list", "tables", "bridge"]) or {"nftables": []}
    return [str(o["table"]["name"]) for o in data["nftables"] if "table" in o]


def _ns_pids(ns: str) -> set[int]:
    r = _run(["ip", "netns", "pids", ns], check=False)
    if r.returncode != 0:
        return set()
    return {int(tok) for tok in r.stdout.split() if tok.isdigit()}


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def pid_alive(pid: int) -> bool:
    """True unless the pid is gone or a zombie (a zombie holds no namespace or socket)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _terminate(namespaces: Sequence[str], grace: float = 2.0) -> None:
    """TERM (and CONT, in case they are stopped) every process in namespaces, then KILL."""

    def pids() -> set[int]:
        return set().union(*(_ns_pids(ns) for ns in namespaces)) if namespaces else set()

    for sig in (signal.SIGTERM, signal.SIGKILL):
        found = pids()
        if not found:
            return
        _signal(found, sig)
        _signal(found, signal.SIGCONT)
        deadline = time.monotonic() + grace
        while pids() and time.monotonic() < deadline:
            time.sleep(0.05)


def _iptables_rules(comment_re: re.Pattern[str]) -> list[list[str]]:
    """FORWARD rules (as `-D` argv tails) whose comment matches comment_re."""
    if shutil.which("iptables") is None:
        return []
    r = _run(["iptables", "-w", "-S", "FORWARD"], check=False)
    out = []
    for line in r.stdout.splitlines():
        parts = shlex.split(line)
        if len(parts) < 2 or parts[0] != "-A" or "--comment" not in parts:
            continue
        comment = parts[parts.index("--comment") + 1]
        if comment_re.fullmatch(comment):
            out.append(["-D", *parts[1:]])
    return out


def _owner_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(prefix_root: str) -> list[str]:
    """Remove namespaces, links, nft tables and iptables rules left by dead runs.

    Only objects named ``<prefix_root><pid>...`` whose pid is no longer alive are touched,
    so a concurrent run with the same root is left alone. Returns what was removed.
    """
    if not re.fullmatch(r"[a-z]{1,3}", prefix_root):
        raise ValueError(f"prefix root must be 1-3 lowercase letters, got {prefix_root!r}")
    if unavailable_reason() is not None:
        return []
    owner = re.compile(rf"^{prefix_root}(\d+)[a-z]")

    def stale(name: str) -> bool:
        m = owner.match(name)
        return m is not None and not _owner_alive(int(m.group(1)))

    removed: list[str] = []
    for ns in _netns_names():
        if stale(ns):
            _terminate([ns])
            _run(["ip", "netns", "del", ns], check=False)
            removed.append(f"netns {ns}")
    for link in _link_names():
        name = link.split("@", 1)[0]
        if stale(name):
            _run(["ip", "link", "del", name], check=False)
            removed.append(f"link {name}")
    for table in _nft_bridge_tables():
        if stale(table):
            _run(["nft", "delete", "table", "bridge", table], check=False)
            removed.append(f"nft table bridge {table}")
    for rule in _iptables_rules(re.compile(rf"{_IPT_COMMENT} ({prefix_root}\d+[a-z]+)")):
        comment = rule[rule.index("--comment") + 1]
        if stale(comment.split()[1]):
            _run(["iptables", "-w", *rule], check=False)
            removed.append(f"iptables {shlex.join(rule)}")
    return removed


def _validate_net(net: str) -> str:
    m = _NET_RE.match(net)
    if not m or any(int(g) > 255 for g in m.groups()):
        raise ValueError(f"net must look like '198.18.X' (first three octets), got {net!r}")
    sub = ipaddress.IPv4Network(f"{net}.0/24")
    if not sub.subnet_of(_ALLOWED):
        raise ValueError(f"net {net!r} is outside the benchmarking range {_ALLOWED}")
    return net


def _pick_free_net() -> str:
    """A 198.18.X/24 not already on any root-namespace interface (pid-seeded start)."""
    used: set[str] = set()
    for link in _json(["ip", "-j", "-4", "addr", "show"]) or []:
        for a in link.get("addr_info", []):
            used.add(str(ipaddress.ip_interface(f"{a['local']}/24").network))
    start = (os.getpid() * 7 + next(_counter)) % 250
    for k in range(250):
        x = (start + k) % 250 + 1
        if f"198.18.{x}.0/24" not in used:
            return f"198.18.{x}"
    raise HarnessError("no free /24 left in 198.18.0.0/16")


class NetnsCluster:
    """n hosts as network namespaces on one bridge; see the module docstring."""

    def __init__(self, n: int, prefix: str, net: str | None = None) -> None:
        """Validate only; ``up()`` (or ``with``) builds. net=None picks a free 198.18.X."""
        if not 1 <= n <= 250:
            raise ValueError(f"n must be 1..250, got {n}")
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"prefix must match [a-z][a-z0-9]*, got {prefix!r}")
        if len(prefix) + 1 + len(str(n)) > _IFNAMSIZ:
            raise ValueError(f"prefix {prefix!r} too long for {n} hosts (interface names <= 15)")
        self.n = n
        self.prefix = prefix
        self.net = _validate_net(net) if net is not None else None
        self.bridge = f"{prefix}br"
        self.table = f"{prefix}_chaos"
        self._ipt_comment = f"{_IPT_COMMENT} {prefix}"
        self._procs: dict[int, list[subprocess.Popen[Any]]] = {i: [] for i in range(1, n + 1)}
        self._is_up = False

    # ----- naming -----
    def ns(self, i: int) -> str:
        """Namespace name of host i."""
        self._check_host(i)
        return f"{self.prefix}-{i}"

    def veth(self, i: int) -> str:
        """Root-namespace side of host i's veth pair (the bridge port)."""
        self._check_host(i)
        return f"{self.prefix}v{i}"

    def ip(self, i: int) -> str:
        """Address of host i."""
        self._check_host(i)
        return f"{self._net}.{i}"

    @property
    def host_ip(self) -> str:
        """The root namespace's address on the bridge."""
        return f"{self._net}.254"

    @property
    def hosts(self) -> range:
        return range(1, self.n + 1)

    @property
    def _net(self) -> str:
        if self.net is None:
            raise HarnessError("cluster is not up (no network chosen yet)")
        return self.net

    def _check_host(self, i: int) -> None:
        if not 1 <= i <= self.n:
            raise ValueError(f"host index must be 1..{self.n}, got {i}")

    # ----- lifecycle -----
    def __enter__(self) -> NetnsCluster:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> NetnsCluster:
        """Build the bridge, namespaces and chaos table; on any failure tear down and raise."""
        if self._is_up:
            return self
        reason = unavailable_reason()
        if reason is not None:
            raise HarnessError(reason)
        _require_tools()
        if self.net is None:
            self.net = _pick_free_net()
        self._is_up = True
        _live.add(self)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        br = self.bridge
        _run(["ip", "link", "add", br, "type", "bridge"])
        _run(["ip", "link", "set", br, "up"])
        _run(["ip", "addr", "add", f"{self.host_ip}/24", "dev", br])
        _run(
            ["iptables", "-w", "-I", "FORWARD", "-i", br, "-o", br, "-j", "ACCEPT",
             "-m", "comment", "--comment", self._ipt_comment]
        )  # fmt: skip
        _run(
            ["nft", "-f", "-"],
            input=f"table bridge {self.table} {{\n"
            "  chain forward { type filter hook forward priority 0; policy accept; }\n}\n",
        )
        for i in self.hosts:
            ns, veth = self.ns(i), self.veth(i)
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "link", "set", veth, "master", br, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0"])

    def down(self, grace: float = 2.0) -> None:
        """Kill every process in our namespaces, delete namespaces, bridge, rules. Idempotent.

        Processes get SIGTERM, and SIGKILL if still there after `grace` seconds.
        Raises HarnessError if something could not be removed.
        """
        if not self._is_up:
            return
        prefix_ns = f"{self.prefix}-"
        present = [ns for ns in _netns_names() if ns.startswith(prefix_ns)]
        _terminate(present, grace)
        for procs in self._procs.values():
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=2)
            procs.clear()
        for ns in present:
            _run(["ip", "netns", "del", ns], check=False)
        links = _link_names()
        for link in links:
            name = link.split("@", 1)[0]
            if name.startswith(f"{self.prefix}v") or name == self.bridge:
                _run(["ip", "link", "del", name], check=False)
        if self.table in _nft_bridge_tables():
            _run(["nft", "delete", "table", "bridge", self.table], check=False)
        for rule in _iptables_rules(re.compile(re.escape(self._ipt_comment))):
            _run(["iptables", "-w", *rule], check=False)
        self._is_up = False
        _live.discard(self)
        left = self.leftovers()
        if left:
            raise HarnessError(f"netns cluster {self.prefix} left behind: {', '.join(left)}")

    def leftovers(self) -> list[str]:
        """Namespaces, links, nft tables and iptables rules of this cluster that still exist."""
        out = [f"netns {ns}" for ns in _netns_names() if ns.startswith(f"{self.prefix}-")]
        for link in _link_names():
            name = link.split("@", 1)[0]
            if name == self.bridge or re.fullmatch(rf"{self.prefix}v\d+", name):
                out.append(f"link {name}")
        if self.table in _nft_bridge_tables():
            out.append(f"nft table {self.table}")
        out += [
            f"iptables rule {shlex.join(r)}"
            for r in _iptables_rules(re.compile(re.escape(self._ipt_comment)))
        ]
        return out

    # ----- processes -----
    def popen(self, i: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv inside host i (``ip netns exec`` execs, so .pid is argv's own pid)."""
        self._require_up()
        p: subprocess.Popen[Any] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns(i), *argv], **kw
        )
        self._procs[i].append(p)
        return p

    def run(
        self, i: int, argv: Sequence[str], timeout: float = 10.0, **kw: Any
    ) -> subprocess.CompletedProcess[Any]:
        """Run argv inside host i to completion (output captured as text unless overridden)."""
        self._require_up()
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        return subprocess.run(["ip", "netns", "exec", self.ns(i), *argv], timeout=timeout, **kw)

    def pids(self, i: int) -> set[int]:
        """Every process currently in host i's namespace (``ip netns pids``)."""
        return _ns_pids(self.ns(i))

    def _targets(self, i: int) -> set[int]:
        tracked = {p.pid for p in self._procs[i] if p.poll() is None}
        return tracked | self.pids(i)

    def kill(self, i: int, sig: int = signal.SIGTERM) -> set[int]:
        """Send sig to the processes in host i; returns the pids signalled."""
        targets = self._targets(i)
        _signal(targets, sig)
        return targets

    def pause(self, i: int) -> set[int]:
        """SIGSTOP host i's processes: a hung host whose kernel still answers ARP/TCP SYN."""
        return self.kill(i, signal.SIGSTOP)

    def resume(self, i: int) -> set[int]:
        """SIGCONT host i's processes."""
        return self.kill(i, signal.SIGCONT)

    # ----- chaos -----
    def partition(self, i: int) -> None:
        """Silently drop every frame between host i and the other hosts."""
        v = self.veth(i)
        self._del_rules(rf"part {i}")
        self._add_rules(
            [f'iifname "{v}" drop comment "part {i}"', f'oifname "{v}" drop comment "part {i}"']
        )

    def partition_pair(self, i: int, j: int) -> None:
        """Silently drop frames between hosts i and j only (both directions)."""
        if i == j:
            raise ValueError("partition_pair needs two different hosts")
        a, b = sorted((i, j))
        va, vb = self.veth(a), self.veth(b)
        tag = f"pair {a} {b}"
        self._del_rules(tag)
        self._add_rules(
            [
                f'iifname "{va}" oifname "{vb}" drop comment "{tag}"',
                f'iifname "{vb}" oifname "{va}" drop comment "{tag}"',
            ]
        )

    def heal(self, i: int | None = None, j: int | None = None) -> None:
        """Remove partitions: all (no args), all involving host i, or the pair (i, j).

        Loss rules are left alone; use ``loss(i, 0)``.
        """
        if i is None:
            self._del_rules(r"part \d+|pair \d+ \d+")
        elif j is None:
            self._check_host(i)
            self._del_rules(rf"part {i}|pair {i} \d+|pair \d+ {i}")
        else:
            a, b = sorted((i, j))
            self._del_rules(rf"pair {a} {b}")

    def loss(self, i: int, pct: int) -> None:
        """Drop pct % (0..100) of frames leaving host i toward other hosts; 0 removes it.

        ARP is dropped too, so a host with a cold neighbour cache may need ARP retries (1 s).
        """
        if not 0 <= pct <= 100:
            raise ValueError(f"pct must be 0..100, got {pct}")
        v = self.veth(i)
        self._del_rules(rf"loss {i}")
        if pct:
            self._add_rules(
                [f'iifname "{v}" numgen random mod 100 < {pct} drop comment "loss {i}"']
            )

    def rules(self) -> list[str]:
        """Comments of the chaos rules in place (e.g. ['part 1', 'part 1', 'loss 2'])."""
        return [c for c, _ in self._rule_handles()]

    def _require_up(self) -> None:
        if not self._is_up:
            raise HarnessError(f"netns cluster {self.prefix} is not up")

    def _add_rules(self, rules: list[str]) -> None:
        self._require_up()
        script = "".join(f"add rule bridge {self.table} forward {r}\n" for r in rules)
        _run(["nft", "-f", "-"], input=script)

    def _rule_handles(self) -> list[tuple[str, int]]:
        self._require_up()
        data = _json(["nft", "-j", "-a", "list", "chain", "bridge", self.table, "forward"])
        if data is None:
            raise HarnessError(f"cannot list nft table bridge {self.table}")
        return [
            (str(o["rule"].get("comment", "")), int(o["rule"]["handle"]))
            for o in data["nftables"]
            if "rule" in o
        ]

    def _del_rules(self, comment_re: str) -> None:
        pat = re.compile(comment_re)
        handles = [h for c, h in self._rule_handles() if pat.fullmatch(c)]
        if handles:
            script = "".join(
                f"delete rule bridge {self.table} forward handle {h}\n" for h in handles
            )
            _run(["nft", "-f", "-"], input=script)

    def __repr__(self) -> str:
        return f"NetnsCluster(n={self.n}, prefix={self.prefix!r}, net={self.net!r})"


@atexit.register
def _down_all() -> None:
    for c in list(_live):
        with contextlib.suppress(Exception):
            c.down()

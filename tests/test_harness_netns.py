"""Tests of the test harness itself: netns hosts, partitions, loss, cleanup; agent/serf wrappers.

The netns tests use plain processes (http.server, a UDP counter) so they do not depend on
meshnode; they need root and skip otherwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import netns
from tests.harness.agents import (
    AgentPorts,
    AgentProc,
    LocalCluster,
    NetnsAgentCluster,
    SerfProc,
    serf_bin,
    wait_until,
)
from tests.harness.netns import NetnsCluster

Make = Callable[..., NetnsCluster]

# GET a URL with a short timeout; rc 0 and the body on stdout only if it answered.
FETCH = textwrap.dedent(
    """
    import sys, urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    sys.stdout.write(opener.open(sys.argv[1], timeout=float(sys.argv[2])).read().decode())
    """
)

# recv <ip>: count datagrams on ip:9999 until 0.5 s of silence; send <ip> <n>: send n of them.
UDP = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if sys.argv[1] == "recv":
        s.bind((sys.argv[2], 9999)); print("ready", flush=True)
        s.settimeout(3.0); n = 0
        try:
            while True:
                s.recv(64); n += 1; s.settimeout(0.5)
        except socket.timeout:
            print(n, flush=True)
    else:
        for _ in range(int(sys.argv[3])):
            s.sendto(b"x", (sys.argv[2], 9999)); time.sleep(0.001)
    """
)


def fetch(c: NetnsCluster, frm: int, to: int, timeout: float = 0.5) -> str | None:
    """Body served by host `to`, fetched from inside host `frm`; None if unreachable."""
    url = f"http://{c.ip(to)}:8080/"
    r = c.run(frm, [sys.executable, "-I", "-c", FETCH, url, str(timeout)], timeout=timeout + 5)
    return r.stdout if r.returncode == 0 else None


def fetch_from_root(c: NetnsCluster, to: int, timeout: float = 0.5) -> str | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{c.ip(to)}:8080/", timeout=timeout) as r:
            return str(r.read().decode())
    except OSError:
        return None


def serve(c: NetnsCluster, i: int, tmp_path: Path) -> subprocess.Popen[bytes]:
    """http.server on host i port 8080 serving 'hello from i'; waits until it answers."""
    d = tmp_path / f"www{i}"
    d.mkdir()
    (d / "index.html").write_text(f"hello from {i}")
    p = c.popen(
        i,
        [sys.executable, "-m", "http.server", "8080", "--bind", c.ip(i), "--directory", str(d)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_until(lambda: fetch_from_root(c, i), 10, 0.05, f"http.server on host {i}")
    return p


def netns_names() -> list[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True).stdout
    return [d["name"] for d in json.loads(out or "[]")]


def link_names() -> list[str]:
    out = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True).stdout
    return [d["ifname"] for d in json.loads(out)]


# ----- netns -----


@pytest.mark.netns
def test_hosts_reach_each_other_and_root(netns_cluster: Make, tmp_path: Path) -> None:
    c = netns_cluster(3)
    assert c.ip(2) == f"{c.net}.2" and c.host_ip == f"{c.net}.254"
    serve(c, 1, tmp_path)
    assert fetch(c, 2, 1) == "hello from 1"
    assert fetch(c, 3, 1) == "hello from 1"
    assert fetch_from_root(c, 1) == "hello from 1"
    # each host has its own address and the multicast route mDNS needs
    r = c.run(2, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    assert f"{c.ip(2)}/24" in r.stdout
    r = c.run(2, ["ip", "route", "show", "224.0.0.0/4"])
    assert "dev eth0" in r.stdout


@pytest.mark.netns
def test_partition_and_heal(netns_cluster: Make, tmp_path: Path) -> None:
    c = netns_cluster(3)
    serve(c, 1, tmp_path)

    c.partition(1)
    assert fetch(c, 2, 1) is None
    assert fetch(c, 3, 1) is None
    # partitions cut host-to-host traffic only: the test process still reaches host 1
    assert fetch_from_root(c, 1) == "hello from 1"
    c.heal(1)
    assert c.rules() == []
    wait_until(lambda: fetch(c, 2, 1, 1.0), 5, desc="2 -> 1 after heal")

    c.partition_pair(3, 1)
    assert fetch(c, 3, 1) is None
    assert fetch(c, 2, 1) == "hello from 1"
    c.heal(1, 3)
    wait_until(lambda: fetch(c, 3, 1, 1.0), 5, desc="3 -> 1 after pair heal")

    c.partition(2)
    c.partition_pair(1, 3)
    c.loss(3, 10)
    c.heal()
    assert c.rules() == ["loss 3"], "heal() removes partitions, not loss"
    c.loss(3, 0)
    assert c.rules() == []


@pytest.mark.netns
def test_loss_drops_about_that_share(netns_cluster: Make) -> None:
    c = netns_cluster(2)

    def received(n: int) -> int:
        recv = c.popen(
            1,
            [sys.executable, "-I", "-c", UDP, "recv", c.ip(1)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert recv.stdout is not None
        assert recv.stdout.readline().strip() == "ready"
        c.run(2, [sys.executable, "-I", "-c", UDP, "send", c.ip(1), str(n)])
        out, _ = recv.communicate(timeout=10)
        return int(out.strip())

    # no loss first: this also resolves ARP, which the loss rule would drop too
    got = received(300)
    assert got >= 290, f"no loss but only {got}/300 arrived"
    c.loss(2, 50)
    got = received(300)
    assert 90 <= got <= 210, f"50% loss let {got}/300 through"
    c.loss(2, 0)
    assert c.rules() == []


@pytest.mark.netns
def test_pause_resume_kill(netns_cluster: Make, tmp_path: Path) -> None:
    c = netns_cluster(2)
    srv = serve(c, 1, tmp_path)
    assert srv.pid in c.pids(1)
    c.pause(1)
    assert fetch(c, 2, 1) is None, "a stopped server must not answer"
    c.resume(1)
    assert fetch(c, 2, 1, 2.0) == "hello from 1"
    assert srv.pid in c.kill(1)
    assert srv.wait(timeout=5) is not None
    assert c.pids(1) == set()


@pytest.mark.netns
def test_down_leaves_nothing_behind(netns_cluster: Make) -> None:
    c = netns_cluster(2)
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    p1 = c.popen(1, ["sh", "-c", "sleep 60 & sleep 61; wait"])  # with a grandchild
    p2 = c.popen(2, [sys.executable, "-I", "-c", stubborn], stdout=subprocess.PIPE, text=True)
    assert p2.stdout is not None and p2.stdout.readline().strip() == "ready"
    wait_until(lambda: len(c.pids(1)) == 3, 5, 0.05, "sh and two sleeps in host 1")
    pids = c.pids(1) | c.pids(2)
    c.pause(2)  # a stopped process must not survive down() either
    c.partition(1)
    c.loss(2, 20)

    t0 = time.monotonic()
    c.down(grace=0.5)
    assert time.monotonic() - t0 < 5

    assert [ns for ns in netns_names() if ns.startswith(f"{c.prefix}-")] == []
    assert [ln for ln in link_names() if ln.startswith(c.prefix)] == []
    nft = subprocess.run(["nft", "list", "table", "bridge", c.table], capture_output=True)
    assert nft.returncode != 0, "chaos table still there"
    fwd = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    assert c.bridge not in fwd
    assert [pid for pid in pids if netns.pid_alive(pid)] == []
    assert p1.poll() is not None and p2.poll() is not None
    assert c.leftovers() == []
    c.down()  # idempotent


@pytest.mark.netns
def test_cleanup_stale_removes_only_dead_runs(netns_cluster: Make) -> None:
    live = netns_cluster(1)  # ensures root + tools (skip/fail reasons) and cleanup
    with open("/proc/sys/kernel/pid_max") as f:
        dead_pid = int(f.read()) + 1  # never a live pid
    stale = NetnsCluster(2, f"mq{dead_pid}a").up()
    mine = NetnsCluster(1, netns.unique_prefix("mq")).up()
    try:
        sleeper = stale.popen(1, ["sleep", "60"])
        stale.partition(1)
        removed = netns.cleanup_stale("mq")
        assert f"netns {stale.ns(1)}" in removed and f"netns {stale.ns(2)}" in removed
        assert stale.leftovers() == []
        assert sleeper.wait(timeout=5) is not None
        assert mine.leftovers(), "a live run's objects must be kept"
        assert live.leftovers(), "other prefix roots are not touched"
    finally:
        stale.down()
        mine.down()


def test_netns_cluster_validates_arguments() -> None:
    for net in ("10.0.0", "198.20.1", "198.17.255", "198.18.256", "198.18", "x.y.z"):
        with pytest.raises(ValueError):
            NetnsCluster(2, "mtx", net)
    NetnsCluster(2, "mtx", "198.19.3")  # inside 198.18.0.0/15: accepted (not built)
    for prefix in ("Bad", "1ab", "a-b", ""):
        with pytest.raises(ValueError):
            NetnsCluster(2, prefix)
    with pytest.raises(ValueError):
        NetnsCluster(100, "abcdefghijkl")  # "abcdefghijklv100" > 15 chars
    with pytest.raises(ValueError):
        NetnsCluster(0, "mtx")
    a, b = netns.unique_prefix("mt"), netns.unique_prefix("mt")
    assert a != b and a.startswith("mt") and len(a) <= 11


# ----- agents / serf wrappers (no meshnode process: the agent is tested elsewhere) -----


def test_agent_argv_uses_the_cli_flags(tmp_path: Path) -> None:
    a = AgentProc(
        "n1", "127.0.0.2", tmp_path, ports=AgentPorts(18301, 18300, 18500, 18600),
        join=["127.0.0.3:18301"], retry_join=["127.0.0.4"], encrypt="a2V5", discover="mdns",
        config_files=["c.json"], dev=True, log_json=True,
    )  # fmt: skip
    argv = a.argv()
    assert argv[:4] == [sys.executable, "-m", "node", "agent"]
    assert " ".join(argv[4:]) == (
        f"--node n1 --data-dir {tmp_path}/n1/data --bind 127.0.0.2 --client 127.0.0.2 "
        "--serf-port 18301 --server-port 18300 --http-port 18500 --dns-port 18600 "
        "--join 127.0.0.3:18301 --retry-join 127.0.0.4 --encrypt a2V5 --discover mdns "
        "--config-file c.json --dev --log-json --log-level debug"
    )
    assert a.http_base == "http://127.0.0.2:18500"


# Stand-in for `python -m node agent`: serves /v1/agent/self and /v1/agent/members only.
FAKE_AGENT = textwrap.dedent(
    """
    import argparse, json, signal, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd"); ap.add_argument("--node"); ap.add_argument("--client")
    ap.add_argument("--bind"); ap.add_argument("--serf-port", type=int)
    ap.add_argument("--http-port", type=int)
    args, _ = ap.parse_known_args()
    me = {"Name": args.node, "Addr": args.bind, "Port": args.serf_port, "Tags": {}, "Status": 1}
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            body = {"/v1/agent/self": {"Config": {"NodeName": args.node}},
                    "/v1/agent/members": [me]}.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json"); self.end_headers()
            self.wfile.write(json.dumps(body).encode())
    srv = ThreadingHTTPServer((args.client, args.http_port), H)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("fake agent up", flush=True)
    srv.serve_forever()
    """
)


def fake_agent_env(tmp_path: Path) -> dict[str, str]:
    """Environment whose `python -m node` is FAKE_AGENT."""
    fake = tmp_path / "fake" / "node"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text(FAKE_AGENT)
    return {"PYTHONPATH": str(fake.parent)}


def test_agent_proc_drives_a_process(tmp_path: Path) -> None:
    c = LocalCluster(2, tmp_path / "w", env=fake_agent_env(tmp_path))
    try:
        c.start(ready_timeout=10)
        a = c[1]
        assert a.running and a.members() == [
            {"Name": "node2", "Addr": "127.0.0.3", "Port": a.ports.serf,
             "Tags": {}, "Status": 1}
        ]  # fmt: skip
        assert a.member_status("node2") == 1 and a.member_status("nope") is None
        assert a.http("GET", "/nope") == (404, None)
        a.pause()
        with pytest.raises(OSError):
            a.http("GET", "/v1/agent/self", timeout=0.3)
        a.resume()
        assert a.http("GET", "/v1/agent/self")[0] == 200
        assert a.stop() == 0, "SIGTERM handled"
        assert c[0].kill9() == -9
        assert "fake agent up" in a.log_text()
        a.start().wait_ready(10)  # restart with the same ports and files
        assert a.log_text().count("=== harness: starting") == 2
    finally:
        c.close()
    assert not any(x.running for x in c)


@pytest.mark.netns
def test_netns_agent_cluster_reachable_from_root(
    netns_agent_cluster: Callable[..., NetnsAgentCluster], tmp_path: Path
) -> None:
    c = netns_agent_cluster(2, env=fake_agent_env(tmp_path))
    net = c.netns
    a2 = c.agent_on(2)
    assert (a2.bind, a2.host, a2.ports.http) == (net.ip(2), 2, 8500)
    assert a2.join == [f"{net.ip(1)}:8301"]
    assert a2.pid in net.pids(2), "the agent runs inside its host's namespace"
    assert [m["Addr"] for m in a2.members()] == [net.ip(2)]
    net.partition(2)  # host-to-host cut; the test process still reaches the API
    assert a2.http("GET", "/v1/agent/self", timeout=1.0)[0] == 200


def test_local_cluster_layout(tmp_path: Path) -> None:
    c = LocalCluster(3, tmp_path)
    assert [a.bind for a in c] == ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    assert [a.name for a in c] == ["node1", "node2", "node3"]
    assert c[0].join == [] and c[1].join == c[2].join == [c[0].serf_addr]
    ports = [p for a in c for p in (a.ports.serf, a.ports.server, a.ports.http, a.ports.dns)]
    assert len(set(ports)) == len(ports)
    c.close()  # never started: nothing to stop, must not raise


def test_wait_until_reports_desc_and_last_value() -> None:
    assert wait_until(lambda: 7, 1) == 7
    seen = iter(range(100))
    with pytest.raises(AssertionError, match=r"waiting for the answer; last: 0"):
        wait_until(lambda: next(seen) * 0, 0.2, 0.05, "the answer")
    with pytest.raises(AssertionError, match="ConnectionRefusedError"):
        wait_until(lambda: (_ for _ in ()).throw(ConnectionRefusedError()), 0.1, 0.05)


@pytest.mark.netns
@pytest.mark.interop
def test_serf_proc_in_netns(netns_cluster: Make, tmp_path: Path) -> None:
    assert serf_bin() is not None, "serf is not installed (make test installs it)"
    c = netns_cluster(2)
    s1 = SerfProc(
        "s1", f"{c.ip(1)}:7946", f"{c.ip(1)}:7373", tmp_path, tags={"role": "seed"},
        netns=c, host=1,
    ).start()  # fmt: skip
    s2 = SerfProc(
        "s2", f"{c.ip(2)}:7946", f"{c.ip(2)}:7373", tmp_path, join=[f"{c.ip(1)}:7946"],
        netns=c, host=2,
    )  # fmt: skip
    try:
        s1.wait_ready()
        s2.start().wait_ready()

        def both_alive() -> bool:
            return {(m["name"], m["status"]) for m in s1.members()} == {
                ("s1", "alive"),
                ("s2", "alive"),
            }

        wait_until(both_alive, 10, desc="s1 sees s1 and s2 alive")
        assert {m["name"]: m["tags"] for m in s1.members()}["s1"] == {"role": "seed"}
        s2.event("harness-ping", "payload")
        wait_until(lambda: "harness-ping" in s1.log_text(), 5, desc="s1 logs the user event")
        t0 = time.monotonic()
        s2.kill9()
        assert not s2.running and time.monotonic() - t0 < 5
    finally:
        s1.stop()
        s2.stop()

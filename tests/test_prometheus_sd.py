"""A stock Prometheus-style scraper with `consul_sd_configs` discovers targets from meshnode.

Debian's `prometheus` package is built with Consul SD compiled out (bookworm 2.42.0+ds and
trixie 2.53.3+ds1 alike: "Disable Consul SD until its Debian package is back in shape"; the
config parser rejects consul_sd_configs), and no upstream build is reachable from here.
Debian's `victoria-metrics` package is a Prometheus-compatible scraper that has it: the same
scrape-config format and __meta_consul_* labels, and the same /api/v1/targets API. Its Consul
SD asks the agent for /v1/agent/self (the datacenter), then runs blocking queries on
/v1/catalog/services and /v1/health/service/<name>.

The registered instances point at real /metrics endpoints on loopback, so targets get scraped
"up". A critical check must show in __meta_consul_health (the scraper keeps such targets by
default, as Prometheus does), and a deregistered instance must drop out of the targets.
A second test shows multi-tag selection (`tags: [a, b]`): only instances with every tag.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.harness.agents import AgentProc, GiveUp, free_port, wait_until

SCRAPER = "/usr/bin/victoria-metrics"
JOB = "consul-web"
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class _Metrics(BaseHTTPRequestHandler):
    """A minimal exporter: a target is only "up" after a real scrape."""

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/metrics":
            self.send_error(404)
            return
        body = b"# TYPE meshnode_sd_test gauge\nmeshnode_sd_test 1\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def metrics_server(ip: str) -> Iterator[int]:
    """Serve /metrics on ip:<kernel-chosen port> in a thread; yields the port."""
    srv = ThreadingHTTPServer((ip, 0), _Metrics)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    try:
        yield int(srv.server_address[1])
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


def scrape_config(agent_http: str, **sd: Any) -> dict[str, Any]:
    """Prometheus's format (JSON is YAML); sd: more consul_sd_configs options. Keep only
    service "web"; copy the service id and the health into target labels so that they can be
    asserted on the active targets."""
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {
                "job_name": JOB,
                "consul_sd_configs": [{"server": agent_http, **sd}],
                "relabel_configs": [
                    {"source_labels": ["__meta_consul_service"], "regex": "web", "action": "keep"},
                    {"source_labels": ["__meta_consul_service_id"], "target_label": "service_id"},
                    {"source_labels": ["__meta_consul_health"], "target_label": "consul_health"},
                ],
            }
        ],
    }


def get_json(url: str) -> Any:
    with _no_proxy.open(url, timeout=3) as resp:
        return json.loads(resp.read())


class Scraper:
    """Our own victoria-metrics process: own loopback port, config and storage in tmp_path."""

    def __init__(self, tmp_path: Path, config: dict[str, Any]) -> None:
        self.dir = tmp_path / "scraper"
        self.dir.mkdir()
        cfg = self.dir / "scrape.yml"
        cfg.write_text(json.dumps(config, indent=2))
        self.port = free_port("127.0.0.1", udp=False)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = self.dir / "scraper.log"
        # consulSDCheckInterval: how often the targets are rebuilt from what the blocking
        # queries have seen (default 30s, Prometheus's refresh_interval counterpart)
        self.argv = [
            SCRAPER,
            f"-storageDataPath={self.dir / 'data'}",
            f"-httpListenAddr=127.0.0.1:{self.port}",
            f"-promscrape.config={cfg}",
            "-promscrape.consulSDCheckInterval=1s",
            "-promscrape.config.strictParse=true",
        ]
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        with self.log_path.open("wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                env=env,
            )

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.popen is not None and self.popen.poll() is not None:
                raise GiveUp(f"scraper exited rc={self.popen.returncode}:\n{self.log()}")
            with _no_proxy.open(f"{self.base}/health", timeout=1) as resp:
                return bool(resp.status == 200)

        wait_until(ready, timeout, 0.2, "scraper /health")

    def targets(self) -> dict[str, Any]:
        body = get_json(f"{self.base}/api/v1/targets")
        assert body["status"] == "success", body
        return dict(body["data"])

    def active(self) -> dict[str, dict[str, Any]]:
        """Active targets of our job by __address__."""
        return {
            t["discoveredLabels"]["__address__"]: t
            for t in self.targets()["activeTargets"]
            if t["labels"].get("job") == JOB
        }

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=5)


def register(
    a: AgentProc,
    node: str,
    node_addr: str,
    sid: str,
    service: str,
    port: int,
    tags: list[str],
    status: str = "passing",
    svc_addr: str = "",
) -> None:
    body = {
        "Node": node,
        "Address": node_addr,
        "Service": {"ID": sid, "Service": service, "Port": port, "Tags": tags, "Address": svc_addr},
        "Check": {
            "CheckID": f"{sid}-check",
            "Name": f"{sid} alive",
            "Status": status,
            "ServiceID": sid,
        },
    }
    assert a.http("PUT", "/v1/catalog/register", body) == (200, True)


_REQ = re.compile(r"method=(\w+) ms=([\d.]+) path=(\S+) status=(\d+)")


def agent_requests(a: AgentProc) -> list[tuple[str, str, int, float]]:
    """(method, path?query, status, ms) of every request the agent logged at debug."""
    out = []
    for line in a.log_text().splitlines():
        if "http.request" not in line:
            continue
        m = _REQ.search(line)
        assert m is not None, f"unparsed request log line: {line}"
        path = m.group(3).strip("'\"")
        out.append((m.group(1), path, int(m.group(4)), float(m.group(2))))
    return out


def require_scraper() -> None:
    if not os.access(SCRAPER, os.X_OK):
        pytest.fail(
            f"{SCRAPER} is missing: `make test` installs the Debian package victoria-metrics"
        )


@contextlib.contextmanager
def dev_agent(tmp_path: Path) -> Iterator[tuple[AgentProc, int]]:
    """A ready dev-mode agent on 127.0.0.1 (request log at debug); yields it and its server
    port (the port of the "consul" service it registers)."""
    server_port = free_port("127.0.0.1", udp=False)
    a = AgentProc(
        "sd",
        "127.0.0.1",
        tmp_path,
        dev=True,
        log_level="debug",
        extra_args=["--server-port", str(server_port)],
    )
    a.start()
    try:
        a.wait_ready()
        yield a, server_port
    finally:
        a.stop()


@contextlib.contextmanager
def scraping(sc: Scraper) -> Iterator[Scraper]:
    """Run the scraper; its log tail is printed if the block fails (conftest prints the
    agent's)."""
    sc.start()
    try:
        sc.wait_ready()
        yield sc
    except BaseException:
        print(f"----- scraper log tail ({sc.log_path}) -----")
        print("\n".join(sc.log().splitlines()[-60:]))
        raise
    finally:
        sc.stop()


@pytest.mark.cluster
@pytest.mark.timeout(90)
def test_consul_sd_scraper_follows_the_catalog(tmp_path: Path) -> None:
    require_scraper()
    ip = "127.0.0.1"
    with contextlib.ExitStack() as stack:
        p1 = stack.enter_context(metrics_server("127.0.0.1"))
        p2 = stack.enter_context(metrics_server("127.0.0.2"))
        a, server_port = stack.enter_context(dev_agent(tmp_path))
        dc = a.http("GET", "/v1/agent/self")[1]["Config"]["Datacenter"]
        # web-1 at its node's address; web-2's service address overrides its node's (on which
        # nothing listens, so "up" proves the scraper used the service address)
        register(a, "box1", "127.0.0.1", "web-1", "web", p1, ["prod"])
        register(a, "box2", "127.0.0.3", "web-2", "web", p2, ["canary", "v2"], svc_addr="127.0.0.2")
        register(a, "box1", "127.0.0.1", "db-1", "db", 5432, ["primary"])
        t0 = time.monotonic()
        sc = stack.enter_context(scraping(Scraper(tmp_path, scrape_config(f"{ip}:{a.ports.http}"))))
        want = {f"127.0.0.1:{p1}", f"127.0.0.2:{p2}"}
        wait_until(lambda: set(sc.active()) == want, 25, 0.25, f"active targets {want}")
        # both scraped; "up" only after a real scrape of our /metrics
        wait_until(
            lambda: all(t["health"] == "up" for t in sc.active().values()),
            15,
            0.25,
            "both targets up",
        )
        t1, t2 = (sc.active()[f"127.0.0.{i}:{p}"] for i, p in ((1, p1), (2, p2)))
        d1, d2 = t1["discoveredLabels"], t2["discoveredLabels"]
        assert d1["__meta_consul_service"] == d2["__meta_consul_service"] == "web"
        assert (d1["__meta_consul_service_id"], d2["__meta_consul_service_id"]) == (
            "web-1",
            "web-2",
        )
        assert d1["__meta_consul_tags"] == ",prod,"
        assert d2["__meta_consul_tags"] == ",canary,v2,"
        assert (d1["__meta_consul_node"], d2["__meta_consul_node"]) == ("box1", "box2")
        assert (d1["__meta_consul_address"], d2["__meta_consul_address"]) == (
            "127.0.0.1",
            "127.0.0.3",
        )
        assert d1["__meta_consul_service_address"] == ""
        assert d2["__meta_consul_service_address"] == "127.0.0.2"
        assert (d1["__meta_consul_service_port"], d2["__meta_consul_service_port"]) == (
            str(p1),
            str(p2),
        )
        assert d1["__meta_consul_dc"] == d2["__meta_consul_dc"] == dc
        assert d1["__meta_consul_health"] == d2["__meta_consul_health"] == "passing"
        assert t1["labels"] == {
            "instance": f"127.0.0.1:{p1}",
            "job": JOB,
            "service_id": "web-1",
            "consul_health": "passing",
        }
        assert t2["labels"]["service_id"] == "web-2"
        assert t1["scrapeUrl"] == f"http://127.0.0.1:{p1}/metrics"
        # every service is watched: db and the server's own "consul" service were
        # discovered too, and dropped by the relabel rule
        dropped = [t["discoveredLabels"] for t in sc.targets()["droppedTargets"]]
        assert sorted(
            (d["__meta_consul_service"], d["__address__"]) for d in dropped if d.get("job") == JOB
        ) == [("consul", f"{ip}:{server_port}"), ("db", "127.0.0.1:5432")]
        discovered_after = time.monotonic() - t0
        # a quiet second: the scraper's watch on web now blocks until the change below (the
        # request log must show a health query that really waited)
        time.sleep(1.0)

        # a critical check: the scraper keeps the target and reports the aggregated health
        register(
            a,
            "box2",
            "127.0.0.3",
            "web-2",
            "web",
            p2,
            ["canary", "v2"],
            status="critical",
            svc_addr="127.0.0.2",
        )
        wait_until(
            lambda: (
                sc.active()[f"127.0.0.2:{p2}"]["discoveredLabels"]["__meta_consul_health"]
                == "critical"
            ),
            20,
            0.25,
            "web-2 health critical",
        )
        act = sc.active()
        assert set(act) == want
        assert act[f"127.0.0.2:{p2}"]["labels"]["consul_health"] == "critical"
        assert act[f"127.0.0.1:{p1}"]["labels"]["consul_health"] == "passing"

        # deregistered: gone from the active targets within a bounded time
        t_dereg = time.monotonic()
        body = {"Node": "box1", "ServiceID": "web-1"}
        assert a.http("PUT", "/v1/catalog/deregister", body) == (200, True)
        wait_until(
            lambda: set(sc.active()) == {f"127.0.0.2:{p2}"},
            20,
            0.25,
            "web-1 dropped from the active targets",
        )
        dropped_after = time.monotonic() - t_dereg

    # what the scraper asked the agent (the harness never sends ?stale): every request
    # answered 2xx, and the health watch on "web" was a real blocking query that waited
    reqs = agent_requests(a)
    assert not [r for r in reqs if r[2] >= 300], reqs
    sd = [(path, ms) for method, path, _, ms in reqs if method == "GET" and "stale" in path]
    assert {path.split("?")[0] for path, _ in sd} >= {
        "/v1/catalog/services",
        "/v1/health/service/web",
    }, sd
    assert all(f"dc={dc}" in path for path, _ in sd), sd
    blocked = [
        ms
        for path, ms in sd
        if path.startswith("/v1/health/service/web?")
        and re.search(r"[?&]index=[1-9]", path)
        and "wait=" in path
    ]
    assert blocked and max(blocked) >= 200, sd
    print(f"discovered in {discovered_after:.1f}s, dropped in {dropped_after:.1f}s")


@pytest.mark.cluster
@pytest.mark.timeout(60)
def test_consul_sd_tags_select_instances_with_every_tag(tmp_path: Path) -> None:
    """consul_sd_configs `tags: [a, b]` asks /v1/health/service/web?tag=a&tag=b: Consul
    answers the instances that have every tag (the scraper does not filter again)."""
    require_scraper()
    with contextlib.ExitStack() as stack:
        a, _ = stack.enter_context(dev_agent(tmp_path))
        for i, tags in enumerate((["prod"], ["canary", "v2"], ["prod", "v2"]), start=1):
            register(a, f"box{i}", "127.0.0.1", f"web-{i}", "web", 9000 + i, tags)
        config = scrape_config(f"127.0.0.1:{a.ports.http}", tags=["prod", "v2"])
        sc = stack.enter_context(scraping(Scraper(tmp_path, config)))
        wait_until(lambda: sc.active(), 20, 0.25, "some active target")
        time.sleep(2)  # two SD rounds: a late wrong target would show up too
        ids = sorted(t["labels"]["service_id"] for t in sc.active().values())
    sent = [p for m, p, _, _ in agent_requests(a) if m == "GET" and "/health/service/web" in p]
    assert sent and all("tag=prod&tag=v2" in p for p in sent), sent
    assert ids == ["web-3"], f"{ids}; requests: {sent}"

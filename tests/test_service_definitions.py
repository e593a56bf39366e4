"""Service definitions: --config-dir at start and on SIGHUP, and `meshnode services register`."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from node.agent import Agent
from node.antientropy import AntiEntropy
from node.consensus import Consensus
from node.definitions import DefinitionError, load_dir
from node.local import LocalState
from tests.harness.agents import REPO_ROOT, AgentProc, free_port, wait_until
from tests.test_http_api import FakeRuntime, FakeWorld, make_config


def test_definition_files_in_json_and_toml(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"service": {"name": "web", "port": 80}}))
    (tmp_path / "b.toml").write_text(
        '[[services]]\nname = "api"\nport = 81\n[[services]]\nname = "db"\n'
        '[check]\nname = "disk"\nttl = "30s"\n'
    )
    (tmp_path / "notes.txt").write_text("ignored")
    defs = load_dir(tmp_path)
    assert [s["name"] for s in defs.services] == ["web", "api", "db"]
    assert [c["name"] for c in defs.checks] == ["disk"]
    (tmp_path / "c.json").write_text('{"servce": {}}')
    with pytest.raises(DefinitionError, match=r"c\.json: unknown or malformed key 'servce'"):
        load_dir(tmp_path)
    (tmp_path / "c.json").write_text("{oops")
    with pytest.raises(DefinitionError, match=r"c\.json"):
        load_dir(tmp_path)


def test_definition_files_in_consuls_snake_case_keep_every_field(tmp_path: Path) -> None:
    """Consul's config files spell everything in snake_case, nested objects included: what a
    file defines reaches the agent's services unchanged, sidecar included."""
    (tmp_path / "web.toml").write_text(
        '[service]\nname = "web"\nport = 8080\nenable_tag_override = true\n'
        '[service.tagged_addresses.lan_ipv4]\naddress = "10.0.0.7"\nport = 8080\n'
        '[service.check]\nttl = "30s"\nderegister_critical_service_after = "90s"\n'
        "[service.connect.sidecar_service.proxy]\n"
        "[[service.connect.sidecar_service.proxy.upstreams]]\n"
        'destination_name = "db"\nlocal_bind_port = 9191\n'
    )
    local = LocalState(None)
    for svc in load_dir(tmp_path).services:
        local.add_service(svc)
    web = local.services["web"]
    assert web["TaggedAddresses"] == {"lan_ipv4": {"Address": "10.0.0.7", "Port": 8080}}
    assert web["EnableTagOverride"] is True and web["Connect"] is None
    chk = local.checks["service:web"]
    assert (chk.name, chk.deregister_after) == ("Service 'web' check", 90.0)
    sidecar = local.services["web-sidecar-proxy"]
    assert (sidecar["Kind"], sidecar["Port"]) == ("connect-proxy", 21000)
    assert sidecar["Proxy"]["Upstreams"] == [{"DestinationName": "db", "LocalBindPort": 9191}]
    assert local.remove_service("web") and local.services == {}  # the sidecar goes with it


async def test_each_config_dir_check_runs_once(tmp_path: Path) -> None:
    """Loading --config-dir validates everything in a scratch copy first; that copy must not
    start probes of its own (each script would run twice, forever)."""
    conf = tmp_path / "conf.d"
    conf.mkdir()
    check = {"tcp": "127.0.0.1:1", "interval": "1s"}
    (conf / "web.json").write_text(json.dumps({"service": {"name": "web", "check": check}}))
    a = Agent(make_config(tmp_path, dev=True, server_port=0, config_dir=str(conf)),
              runtime_factory=partial(FakeRuntime, FakeWorld()))  # fmt: skip
    a.add_component(Consensus(a))
    ae = AntiEntropy(a)
    a.add_component(ae)
    await a.start()
    try:

        def runners() -> list[str]:
            return sorted(t.get_name() for t in asyncio.all_tasks()
                          if t.get_name().startswith("check-") and not t.done())  # fmt: skip

        assert runners() == ["check-service:web"]
        await ae.reload()  # SIGHUP
        await asyncio.sleep(0)
        assert runners() == ["check-service:web"]
    finally:
        await a.stop()


async def test_a_config_dir_reload_keeps_the_checks_state(tmp_path: Path) -> None:
    """SIGHUP re-registers every service of --config-dir (replacing its checks): each check
    keeps its status, output, critical-since and TTL deadline, as Consul's reload does,
    standalone checks too, instead of flapping everything to critical."""
    conf = tmp_path / "conf.d"
    conf.mkdir()
    web = {"service": {"name": "web", "checks": [
        {"id": "web-ttl", "ttl": "60s"},
        {"id": "web-down", "ttl": "60s", "deregister_critical_service_after": "1h"}]}}  # fmt: skip
    (conf / "web.json").write_text(json.dumps(web))
    (conf / "disk.json").write_text(json.dumps({"check": {"name": "disk", "ttl": "60s"}}))
    a = Agent(make_config(tmp_path, dev=True, server_port=0, config_dir=str(conf)),
              runtime_factory=partial(FakeRuntime, FakeWorld()))  # fmt: skip
    a.add_component(Consensus(a))
    ae = AntiEntropy(a)
    a.add_component(ae)
    await a.start()
    try:
        local = ae.local
        local.update_check("web-ttl", "passing", "fine")
        local.update_check("web-down", "critical", "broken")
        local.update_check("disk", "warning", "90% full")

        def state() -> dict[str, tuple[str, str, float, float]]:
            return {cid: (c.status, c.output, c.critical_since, c.ttl_deadline)
                    for cid, c in local.checks.items()}  # fmt: skip

        before = state()
        assert before["web-down"][2] > 0
        await ae.reload()  # SIGHUP, the files unchanged
        assert state() == before
        web["service"]["port"] = 8080  # a changed service is re-registered all the same
        (conf / "web.json").write_text(json.dumps(web))
        await ae.reload()
        assert local.services["web"]["Port"] == 8080 and state() == before
    finally:
        await a.stop()


def agent_services(a: AgentProc) -> set[str]:
    status, body = a.http("GET", "/v1/agent/services")
    assert status == 200
    return set(body)


def catalog_services(a: AgentProc) -> set[str]:
    status, body = a.http("GET", "/v1/catalog/services")
    assert status == 200
    return set(body)


def cli(a: AgentProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node", *args, "--http-addr", a.http_base],
        capture_output=True, text=True, timeout=30, cwd=REPO_ROOT, env=a.env,
    )  # fmt: skip


@pytest.mark.cluster
def test_config_dir_at_start_on_sighup_and_the_services_cli(tmp_path: Path) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    (conf / "web.json").write_text(json.dumps(
        {"service": {"name": "web", "port": 8080, "check": {"ttl": "60s"}}}))  # fmt: skip
    ip = "127.0.0.1"
    a = AgentProc("defs", ip, tmp_path, dev=True, extra_args=[
        "--server-port", str(free_port(ip, udp=False)), "--config-dir", str(conf)])  # fmt: skip
    a.start()
    try:
        a.wait_ready()
        assert agent_services(a) == {"web"}
        wait_until(lambda: "web" in catalog_services(a), timeout=10, desc="web in the catalog")
        # SIGHUP: what the directory defines now replaces what it defined before
        (conf / "web.json").unlink()
        (conf / "api.toml").write_text('[service]\nname = "api"\nport = 9000\n')
        assert a.popen is not None
        a.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: agent_services(a) == {"api"}, timeout=10, desc="reloaded")
        wait_until(lambda: catalog_services(a) == {"api", "consul"}, timeout=10,
                   desc="catalog follows the reload")  # fmt: skip
        # a broken file: the reload is refused and nothing changes
        (conf / "broken.json").write_text("{")
        a.popen.send_signal(signal.SIGHUP)
        wait_until(lambda: "antientropy.reload_failed" in a.log_text(), timeout=10,
                   desc="the failed reload is logged")  # fmt: skip
        assert agent_services(a) == {"api"} and a.running
        # the CLI registers and deregisters through the agent API
        f = tmp_path / "cache.json"
        f.write_text(json.dumps({"service": {"name": "cache", "port": 6379}}))
        out = cli(a, "services", "register", str(f))
        assert out.returncode == 0 and "Registered service: cache" in out.stdout, out.stderr
        assert agent_services(a) == {"api", "cache"}
        out = cli(a, "services", "deregister", "cache")
        assert out.returncode == 0, out.stderr
        assert agent_services(a) == {"api"}
        out = cli(a, "services", "deregister", "nope")
        assert out.returncode == 1 and "Unknown service ID" in out.stderr
        bad = tmp_path / "bad.json"
        bad.write_text('{"service": {"port": 1}}')
        out = cli(a, "services", "register", str(bad))
        assert out.returncode == 1 and "Missing service name" in out.stderr
    finally:
        a.stop()


@pytest.mark.cluster
def test_a_broken_config_dir_stops_the_start_with_a_message(tmp_path: Path) -> None:
    conf = tmp_path / "conf.d"
    conf.mkdir()
    (conf / "x.json").write_text('{"service": {"name": "x", "check": {"http": "http://h"}}}')
    ip = "127.0.0.1"
    a = AgentProc("broken", ip, tmp_path, dev=True, extra_args=[
        "--server-port", str(free_port(ip, udp=False)), "--config-dir", str(conf)])  # fmt: skip
    a.start()
    assert a.popen is not None
    assert a.popen.wait(timeout=30) == 1
    assert "--config-dir" in a.log_text() and "Interval" in a.log_text()

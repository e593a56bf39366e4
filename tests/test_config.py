"""Configuration: precedence (flags > env > files > defaults), JSON/TOML files, validation errors.

Every error must be ONE line naming the field (and its source); through the CLI it exits 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gossip.keyring import generate_key
from node.config import AgentConfig, ConfigError, load_config, parse_duration

REPO = Path(__file__).resolve().parents[1]


def load(
    cli: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    *,
    hostname: str = "testhost",
    private_ips: tuple[str, ...] = ("10.1.2.3",),
) -> AgentConfig:
    return load_config(
        cli or {}, env or {}, hostname=lambda: hostname, private_ips=lambda: list(private_ips)
    )


BASE = {"data_dir": "/tmp/x", "bind": "127.0.0.1"}


def error_of(
    cli: dict[str, Any] | None = None, env: dict[str, str] | None = None, **kw: Any
) -> str:
    with pytest.raises(ConfigError) as info:
        load(cli, env, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def write(path: Path, data: Any) -> str:
    if path.suffix == ".json":
        path.write_text(json.dumps(data))
    else:
        path.write_text(data)
    return str(path)


# ----- defaults and precedence -----


def test_defaults() -> None:
    c = load({"data_dir": "/tmp/x"})
    assert c.node == "testhost"
    assert (c.bind, c.client) == ("0.0.0.0", "127.0.0.1")
    assert c.advertise == "10.1.2.3"  # bind 0.0.0.0: the single private address
    assert (c.serf_port, c.server_port, c.http_port, c.dns_port) == (8301, 8300, 8500, 8600)
    assert (c.join, c.retry_join, c.retry_interval) == ((), (), 30.0)
    assert (c.encrypt, c.discover, c.dev, c.datacenter) == (None, None, False, "dc1")
    assert (c.log_level, c.log_json) == ("info", False)
    assert c.check_update_interval == 300.0


def test_cli_beats_env_beats_files_beats_defaults(tmp_path: Path) -> None:
    f1 = write(tmp_path / "a.json", {"node": "from-file1", "serf_port": 7001, "http_port": 7101,
                                     "dns_port": 7201, "datacenter": "file1"})  # fmt: skip
    f2 = write(tmp_path / "b.toml", 'serf_port = 7002\nhttp_port = 7102\nnode = "from-file2"\n')
    env = {"MESHNODE_SERF_PORT": "7003", "MESHNODE_NODE": "from-env"}
    c = load({**BASE, "config_file": [f1, f2], "node": "from-cli"}, env)
    assert c.node == "from-cli"  # cli > env > files
    assert c.serf_port == 7003  # env > files
    assert c.http_port == 7102  # the later file wins
    assert c.dns_port == 7201  # only in the first file
    assert c.datacenter == "file1"
    assert c.server_port == 8300  # default
    assert c.config_file == (f1, f2)


def test_lists_from_each_source_replace_lower_ones(tmp_path: Path) -> None:
    f = write(tmp_path / "c.json", {"join": ["10.0.0.1", "10.0.0.2:8301"], "retry_join": ["x"]})
    c = load({**BASE, "config_file": [f]})
    assert c.join == ("10.0.0.1", "10.0.0.2:8301") and c.retry_join == ("x",)
    c = load({**BASE, "config_file": [f]}, {"MESHNODE_JOIN": "10.0.0.3, 10.0.0.4:9"})
    assert c.join == ("10.0.0.3", "10.0.0.4:9")
    c = load({**BASE, "config_file": [f], "join": ["10.0.0.5"]}, {"MESHNODE_JOIN": "10.0.0.3"})
    assert c.join == ("10.0.0.5",)


def test_toml_file_with_every_kind_of_value(tmp_path: Path) -> None:
    key = generate_key()
    f = write(
        tmp_path / "agent.toml",
        f'node = "tomlnode"\ndata_dir = "/var/lib/mn"\nbind = "127.0.0.3"\n'
        f'advertise = "127.0.0.4"\nclient = "::1"\nserver_port = 9300\n'
        f'join = ["127.0.0.9"]\nretry_join = ["127.0.0.10:9301"]\nretry_interval = "1m30s"\n'
        f'encrypt = "{key}"\ndiscover = "mdns"\ndev = false\ndatacenter = "East-1"\n'
        f'log_level = "debug"\nlog_json = true\n',
    )
    c = load({"config_file": [f]})
    assert c == AgentConfig(
        node="tomlnode", data_dir="/var/lib/mn", bind="127.0.0.3", advertise="127.0.0.4",
        client="::1", server_port=9300, join=("127.0.0.9",), retry_join=("127.0.0.10:9301",),
        retry_interval=90.0, encrypt=key, discover="mdns", dev=False, datacenter="east-1",
        log_level="debug", log_json=True, config_file=(f,),
    )  # fmt: skip


def test_json_keys_may_use_dashes(tmp_path: Path) -> None:
    f = write(tmp_path / "d.json", {"serf-port": 7777, "data-dir": "/d"})
    c = load({"bind": "127.0.0.1", "config_file": [f]})
    assert (c.serf_port, c.data_dir) == (7777, "/d")


def test_config_files_from_env(tmp_path: Path) -> None:
    f1 = write(tmp_path / "e1.json", {"serf_port": 1111})
    f2 = write(tmp_path / "e2.json", {"serf_port": 2222})
    c = load(BASE, {"MESHNODE_CONFIG_FILE": f"{f1},{f2}"})
    assert c.serf_port == 2222


def test_env_values() -> None:
    env = {
        "MESHNODE_NODE": "envnode", "MESHNODE_DATA_DIR": "/e", "MESHNODE_BIND": "127.0.0.2",
        "MESHNODE_RETRY_JOIN": "a,b:1", "MESHNODE_DEV": "true", "MESHNODE_LOG_JSON": "1",
        "MESHNODE_LOG_LEVEL": "WARNING", "MESHNODE_RETRY_INTERVAL": "500ms",
        "MESHNODE_ADVERTISE": "",  # empty means unset
        "MESHNODE_HTTP_ADDR": "http://x:1",  # a client-side variable; the agent ignores it
    }  # fmt: skip
    c = load({}, env)
    assert (c.node, c.data_dir, c.bind, c.advertise) == ("envnode", "/e", "127.0.0.2", "127.0.0.2")
    assert c.retry_join == ("a", "b:1") and c.dev and c.log_json
    assert c.log_level == "warn" and c.retry_interval == 0.5


# ----- dev mode, node name, advertise -----


def test_dev_mode() -> None:
    c = load({"dev": True})
    assert c.dev and c.data_dir is None
    assert (c.bind, c.client, c.advertise) == ("127.0.0.1", "127.0.0.1", "127.0.0.1")
    assert c.node == "testhost"
    c = load({"dev": True, "bind": "127.0.0.7", "data_dir": "/keep"})
    assert (c.bind, c.advertise, c.data_dir) == ("127.0.0.7", "127.0.0.7", "/keep")


def test_node_defaults_to_hostname_or_its_first_label() -> None:
    assert load(BASE, hostname="web-01").node == "web-01"
    assert load(BASE, hostname="web-01.example.com").node == "web-01"
    msg = error_of(BASE, hostname="under_score")
    assert msg.startswith("--node: the host name 'under_score' is not a valid node name")


def test_data_dir_required_unless_dev() -> None:
    assert error_of({"bind": "127.0.0.1"}) == "--data-dir: required (or run with --dev)"


def test_advertise_resolution() -> None:
    assert load({**BASE, "bind": "127.0.0.5"}).advertise == "127.0.0.5"
    assert load({**BASE, "bind": "0.0.0.0", "advertise": "10.9.9.9"}).advertise == "10.9.9.9"
    assert load({**BASE, "bind": "0.0.0.0"}, private_ips=("192.168.1.4",)).advertise == (
        "192.168.1.4"
    )
    msg = error_of({**BASE, "bind": "0.0.0.0"}, private_ips=())
    assert msg.startswith("--advertise: bind address is 0.0.0.0 and no private IPv4 address")
    msg = error_of({**BASE, "bind": "0.0.0.0"}, private_ips=("10.0.0.1", "10.0.0.2"))
    assert msg.startswith("--advertise: bind address is 0.0.0.0 and several private IPv4")
    assert "10.0.0.1, 10.0.0.2" in msg


# ----- validation: one line, names the field and the source -----

BAD_VALUES: list[tuple[str, Any, str]] = [
    ("serf_port", "abc", "must be an integer between 1 and 65535, got 'abc'"),
    ("server_port", "0", "must be an integer between 1 and 65535, got '0'"),
    ("http_port", "65536", "must be an integer between 1 and 65535, got '65536'"),
    ("dns_port", "-1", "must be an integer between 1 and 65535, got '-1'"),
    ("bind", "300.1.1.1", "must be an IPv4 address (gossip is IPv4-only), got '300.1.1.1'"),
    ("bind", "::1", "must be an IPv4 address (gossip is IPv4-only), got '::1'"),
    ("advertise", "0.0.0.0", "must be a routable address other peers can reach, got '0.0.0.0'"),
    ("advertise", "host", "must be an IPv4 address (gossip is IPv4-only), got 'host'"),
    ("client", "localhost", "must be an IP address, got 'localhost'"),
    ("node", "bad_name", "must be 1-63 letters, digits and dashes"),
    ("node", "-lead", "must be 1-63 letters, digits and dashes"),
    ("node", "x" * 64, "must be 1-63 letters, digits and dashes"),
    ("datacenter", "dc 1", "must be 1-63 lowercase letters, digits, underscores and dashes"),
    ("encrypt", "not-base64!", "invalid gossip encryption key: encryption key is not valid base64"),
    ("encrypt", "c2hvcnQ=", "invalid gossip encryption key: encryption key must be 16, 24 or 32"),
    ("discover", "consul", "must be one of mdns, got 'consul'"),
    ("log_level", "loud", "must be one of trace, debug, info, warn, error, got 'loud'"),
    ("log_json", "maybe", "must be true or false, got 'maybe'"),
    ("dev", "2", "must be true or false, got '2'"),
    ("retry_interval", "soon", "must be a duration like '30s' or '500ms', got 'soon'"),
    ("retry_interval", "0s", "must be a positive duration, got '0s'"),
    ("check_update_interval", "-1s", "must be a duration like '30s' or '500ms', got '-1s'"),
    ("join", "1.2.3.4:99999", "invalid address '1.2.3.4:99999': port must be between 1 and 65535"),
    ("join", ":8301", "invalid address ':8301': empty or malformed host"),
    ("retry_join", "1.2.3.4:x", "invalid address '1.2.3.4:x': port must be between 1 and 65535"),
    ("data_dir", " ", "must not be empty"),
]


@pytest.mark.parametrize(("name", "raw", "message"), BAD_VALUES)
def test_bad_flag_values(name: str, raw: str, message: str) -> None:
    cli_raw: Any = [raw] if name in ("join", "retry_join") else raw
    msg = error_of({**BASE, name: cli_raw})
    flag = "--" + name.replace("_", "-")
    assert msg.startswith(f"{flag}: "), msg
    assert message in msg


# An empty env variable means "unset", so blank values are not errors there.
@pytest.mark.parametrize(("name", "raw", "message"), [v for v in BAD_VALUES if v[1].strip()])
def test_bad_env_values(name: str, raw: str, message: str) -> None:
    var = "MESHNODE_" + name.upper()
    msg = error_of(BASE, {var: raw})
    assert msg.startswith(f"{var}: ") and message in msg


@pytest.mark.parametrize(("name", "raw", "message"), BAD_VALUES)
def test_bad_file_values(tmp_path: Path, name: str, raw: str, message: str) -> None:
    value: Any = [raw] if name in ("join", "retry_join") else raw
    f = write(tmp_path / "bad.json", {name: value})
    msg = error_of({**BASE, "config_file": [f]})
    assert msg.startswith(f"config file {f}: {name}: ") and message in msg


NOT_A_DURATION = "must be a duration like '30s' or '500ms', got "


def test_file_type_errors(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"serf_port": 70000}, "serf_port: must be an integer between 1 and 65535, got 70000"),
        ({"serf_port": True}, "serf_port: must be an integer between 1 and 65535, got True"),
        ({"serf_port": 8301.5}, "serf_port: must be an integer between 1 and 65535, got 8301.5"),
        ({"join": [1, 2]}, "join: must be a list of strings, got [1, 2]"),
        ({"join": {"a": 1}}, "join: must be a list of strings, got {'a': 1}"),
        ({"node": 5}, "node: must be a string, got 5"),
        ({"dev": "yes please"}, "dev: must be true or false, got 'yes please'"),
        ({"bogus": 1}, "bogus: unknown setting"),
        ({"retry_interval": float("nan")}, f"retry_interval: {NOT_A_DURATION}nan"),
        ({"check_update_interval": float("inf")}, f"check_update_interval: {NOT_A_DURATION}inf"),
        ({"config_file": "x.json"}, "config_file: config files cannot include other config files"),
    ]
    for data, message in cases:
        f = write(tmp_path / "t.json", data)
        assert error_of({**BASE, "config_file": [f]}) == f"config file {f}: {message}"


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.json")
    assert error_of({**BASE, "config_file": [missing]}) == (
        f"config file {missing}: cannot read: No such file or directory"
    )
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"node": ')
    assert error_of({**BASE, "config_file": [str(bad_json)]}).startswith(
        f"config file {bad_json}: invalid JSON: "
    )
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("node = \n")
    assert error_of({**BASE, "config_file": [str(bad_toml)]}).startswith(
        f"config file {bad_toml}: invalid TOML: "
    )
    hcl = tmp_path / "agent.hcl"
    hcl.write_text('node_name = "x"')
    assert error_of({**BASE, "config_file": [str(hcl)]}) == (
        f"config file {hcl}: unsupported format (use a .json or .toml file)"
    )
    arr = tmp_path / "arr.json"
    arr.write_text("[1]")
    assert error_of({**BASE, "config_file": [str(arr)]}) == (
        f"config file {arr}: must contain an object of settings at the top level"
    )


def test_valid_edge_values() -> None:
    key = generate_key()
    c = load({**BASE, "serf_port": "1", "http_port": "65535", "encrypt": key, "log_level": "TRACE",
              "datacenter": "DC_2", "node": "a", "client": "0.0.0.0"})  # fmt: skip
    assert (c.serf_port, c.http_port, c.encrypt, c.log_level) == (1, 65535, key, "trace")
    assert (c.datacenter, c.node, c.client) == ("dc_2", "a", "0.0.0.0")
    c = load({**BASE, "join": ["node2/10.0.0.2:8301", "[::1]:8301", "seed.example.com"]})
    assert c.join == ("node2/10.0.0.2:8301", "[::1]:8301", "seed.example.com")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("500ms", 0.5), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5),
     ("250us", 0.00025), ("0", 0.0), (12, 12.0), (0.25, 0.25)],
)  # fmt: skip
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10", "5 s", "1x", "ms10", True, None, [1]])
def test_parse_duration_rejects(text: Any) -> None:
    with pytest.raises(ValueError, match="must be a duration"):
        parse_duration(text)


# ----- through the real CLI: one stderr line, exit code 2 -----


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "node", *args],
        capture_output=True, text=True, timeout=30, env=env, cwd=cwd or REPO,
    )  # fmt: skip


def test_cli_bad_port_exits_2_with_one_line() -> None:
    r = run_cli("agent", "--dev", "--serf-port", "abc")
    assert r.returncode == 2
    assert r.stderr == (
        "meshnode: error: --serf-port: must be an integer between 1 and 65535, got 'abc'\n"
    )
    assert r.stdout == ""


def test_cli_bad_config_file_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text("serf_port = 'abc'\n")
    r = run_cli("agent", "--dev", "--config-file", str(f))
    assert r.returncode == 2
    assert r.stderr == (
        f"meshnode: error: config file {f}: serf_port: must be an integer between 1 and 65535, "
        "got 'abc'\n"
    )


def test_cli_usage_errors_are_one_line() -> None:
    for args, needle in (
        (["agent", "--bogus"], "unrecognized arguments: --bogus"),
        (["agent", "--serf-port"], "argument --serf-port: expected one argument"),
        (["agent", "--bind", "127.0.0.1"], "--data-dir: required (or run with --dev)"),
        (["agent", "--dev", "--encrypt", "zzz"], "--encrypt: invalid gossip encryption key"),
        ([], "the following arguments are required: COMMAND"),
    ):
        r = run_cli(*args)
        assert r.returncode == 2, args
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("meshnode: error: "), r.stderr
        assert needle in lines[0], r.stderr

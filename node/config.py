"""Agent configuration: flags, MESHNODE_* env variables and JSON/TOML config files, merged.

Precedence per field: command line > environment > config files (a later file wins) > defaults.
A field set by a higher source replaces the lower one entirely (lists are not concatenated), so
what an operator sees on the command line is what the agent runs with. Every problem is reported
as one ConfigError line that names the field and where it came from.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from gossip.keyring import KeyringError, parse_key
from node.golang import parse_duration as go_parse_duration

__all__ = [
    "CONSUL_COMPAT_VERSION",
    "ENV_PREFIX",
    "FIELDS",
    "LOG_LEVELS",
    "MESHNODE_VERSION",
    "AgentConfig",
    "ConfigError",
    "load_config",
    "parse_duration",
    "private_ipv4_addresses",
]

try:
    MESHNODE_VERSION = metadata.version("meshnode")
except metadata.PackageNotFoundError:  # running from a plain checkout
    MESHNODE_VERSION = "0.0.0"

#: The Consul release whose HTTP API meshnode follows. Clients (py-consul, consul-template)
#: gate features on Config.Version, so it must parse as a plain Consul version.
CONSUL_COMPAT_VERSION = "1.22.0"

ENV_PREFIX = "MESHNODE_"
LOG_LEVELS = ("trace", "debug", "info", "warn", "error")
DISCOVERY_METHODS = ("mdns",)

_NODE_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_DC_RE = re.compile(r"^[a-z0-9_-]{1,63}$")


class ConfigError(Exception):
    """A bad flag, env variable or config file entry; str() is the one-line message."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The validated configuration the agent runs with (addresses already resolved)."""

    node: str
    data_dir: str | None
    bind: str
    advertise: str
    client: str = "127.0.0.1"
    serf_port: int = 8301
    server_port: int = 8300
    http_port: int = 8500
    dns_port: int = 8600
    bootstrap_expect: int = 0
    server_stabilization_time: float = 10.0
    join: tuple[str, ...] = ()
    retry_join: tuple[str, ...] = ()
    retry_interval: float = 30.0
    encrypt: str | None = None
    discover: str | None = None
    config_file: tuple[str, ...] = ()
    config_dir: str | None = None
    dev: bool = False
    datacenter: str = "dc1"
    domain: str = "consul"
    enable_script_checks: bool = False
    check_update_interval: float = 300.0
    recursors: tuple[str, ...] = ()
    dns_node_ttl: int = 0
    dns_service_ttl: int = 0
    log_level: str = "info"
    log_json: bool = False

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with secrets hidden, for /v1/agent/self's DebugConfig."""
        out: dict[str, Any] = {}
        for name in self.__slots__:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        if out["encrypt"]:
            out["encrypt"] = "hidden"
        return out


# ----- value parsers: raw value (str from CLI/env, any JSON/TOML type from files) -> typed -----


def parse_duration(raw: object) -> float:
    """Go-style duration ("30s", "1m30s", "500ms") or a number of seconds, as float seconds."""
    if isinstance(raw, bool):
        raise ValueError(f"must be a duration like '30s' or '500ms', got {raw!r}")
    if isinstance(raw, int | float):
        if not math.isfinite(raw):
            raise ValueError(f"must be a duration like '30s' or '500ms', got {raw!r}")
        return float(raw)
    if not isinstance(raw, str):
        raise ValueError(f"must be a duration like '30s' or '500ms', got {raw!r}")
    try:
        value = go_parse_duration(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ValueError(f"must be a duration like '30s' or '500ms', got {raw!r}")
    return value


def _as_str(raw: object) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"must be a string, got {raw!r}")
    return raw


def _as_int(raw: object, lo: int, hi: int, what: str = "an integer") -> int:
    value: int | None = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
        value = int(raw)
    if value is None or not lo <= value <= hi:
        raise ValueError(f"must be {what} between {lo} and {hi}, got {raw!r}")
    return value


def _port(raw: object) -> int:
    return _as_int(raw, 1, 65535)


def _bootstrap_expect(raw: object) -> int:
    return _as_int(raw, 0, 99)


def _bool(raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    raise ValueError(f"must be true or false, got {raw!r}")


def _str_list(raw: object) -> tuple[str, ...]:
    """A list of strings; a single string is split on commas (how env variables carry lists)."""
    if isinstance(raw, str):
        items = [p.strip() for p in raw.split(",")]
        return tuple(p for p in items if p)
    if isinstance(raw, list | tuple):
        out = []
        for item in raw:
            if not isinstance(item, str):
                raise ValueError(f"must be a list of strings, got {raw!r}")
            out.append(item.strip())
        return tuple(out)
    raise ValueError(f"must be a list of strings, got {raw!r}")


def _node_name(raw: object) -> str:
    name = _as_str(raw)
    if not _NODE_RE.match(name):
        raise ValueError(
            "must be 1-63 letters, digits and dashes, starting and ending with a letter or "
            f"digit, got {name!r}"
        )
    return name


def _datacenter(raw: object) -> str:
    dc = _as_str(raw).lower()
    if not _DC_RE.match(dc):
        raise ValueError(
            f"must be 1-63 lowercase letters, digits, underscores and dashes, got {raw!r}"
        )
    return dc


def _domain(raw: object) -> str:
    text = _as_str(raw).strip().strip(".").lower()
    labels = text.split(".")
    if not text or not all(re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", x) for x in labels):
        raise ValueError(f"must be a DNS domain such as consul or mesh.internal, got {raw!r}")
    return text


def _recursors(raw: object) -> tuple[str, ...]:
    out = _str_list(raw)
    for r in out:
        host, _, port = r.rpartition(":") if r.count(":") == 1 else (r, "", "")
        try:
            ipaddress.ip_address(host or r)
        except ValueError:
            raise ValueError(f"must be IP or IP:port, got {r!r}") from None
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"invalid port in {r!r}")
    return out


def _ttl(raw: object) -> int:
    value = parse_duration(raw)
    if not 0 <= value <= 86400:
        raise ValueError(f"must be a duration between 0s and 24h, got {raw!r}")
    return int(value)


def _ipv4(raw: object) -> str:
    text = _as_str(raw).strip()
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"must be an IPv4 address (gossip is IPv4-only), got {raw!r}") from None


def _advertise(raw: object) -> str:
    addr = _ipv4(raw)
    if ipaddress.IPv4Address(addr).is_unspecified:
        raise ValueError(f"must be a routable address other peers can reach, got {raw!r}")
    return addr


def _ip(raw: object) -> str:
    text = _as_str(raw).strip()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"must be an IP address, got {raw!r}") from None


def _data_dir(raw: object) -> str:
    text = _as_str(raw)
    if not text.strip():
        raise ValueError("must not be empty")
    return text


def _join_list(raw: object) -> tuple[str, ...]:
    addrs = _str_list(raw)
    for addr in addrs:
        _check_join_address(addr)
    return addrs


def _check_join_address(spec: str) -> None:
    """Accept what the gossip runtime's join accepts: host, host:port, [v6]:port, name/host:port."""
    rest = spec.split("/", 1)[1] if "/" in spec else spec
    host, port = rest, ""
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"invalid address {spec!r}: missing ']'")
        host, tail = rest[1:end], rest[end + 1 :]
        if tail and not tail.startswith(":"):
            raise ValueError(f"invalid address {spec!r}")
        port = tail[1:]
    elif rest.count(":") == 1:
        host, port = rest.split(":")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"invalid address {spec!r}: empty or malformed host")
    if (rest.count(":") == 1 or rest.startswith("[")) and (
        not port.isdigit() or not 0 < int(port) < 65536
    ):
        raise ValueError(f"invalid address {spec!r}: port must be between 1 and 65535")


def _encrypt(raw: object) -> str:
    key = _as_str(raw).strip()
    try:
        parse_key(key)
    except (KeyringError, ValueError) as e:
        raise ValueError(f"invalid gossip encryption key: {e}") from None
    return key


def _one_of(choices: tuple[str, ...]) -> Callable[[object], str]:
    def parse(raw: object) -> str:
        value = _as_str(raw).strip().lower()
        if value == "warning" and "warn" in choices:
            value = "warn"
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _positive_duration(raw: object) -> float:
    value = parse_duration(raw)
    if value <= 0:
        raise ValueError(f"must be a positive duration, got {raw!r}")
    return value


def _duration(raw: object) -> float:
    value = parse_duration(raw)
    if value < 0:
        raise ValueError(f"must not be negative, got {raw!r}")
    return value


#: name -> parser. Flag names are these with dashes; env variables MESHNODE_<NAME>.
FIELDS: dict[str, Callable[[object], Any]] = {
    "node": _node_name,
    "data_dir": _data_dir,
    "bind": _ipv4,
    "advertise": _advertise,
    "client": _ip,
    "serf_port": _port,
    "server_port": _port,
    "http_port": _port,
    "dns_port": _port,
    "bootstrap_expect": _bootstrap_expect,
    "server_stabilization_time": _positive_duration,
    "join": _join_list,
    "retry_join": _join_list,
    "retry_interval": _positive_duration,
    "encrypt": _encrypt,
    "discover": _one_of(DISCOVERY_METHODS),
    "dev": _bool,
    "datacenter": _datacenter,
    "domain": _domain,
    "config_dir": _data_dir,
    "enable_script_checks": _bool,
    "check_update_interval": _duration,
    "recursors": _recursors,
    "dns_node_ttl": _ttl,
    "dns_service_ttl": _ttl,
    "log_level": _one_of(LOG_LEVELS),
    "log_json": _bool,
}

_DEFAULTS: dict[str, Any] = {
    "data_dir": None,
    "bind": "0.0.0.0",
    "advertise": None,
    "client": "127.0.0.1",
    "serf_port": 8301,
    "server_port": 8300,
    "http_port": 8500,
    "dns_port": 8600,
    "bootstrap_expect": 0,
    "server_stabilization_time": 10.0,
    "join": (),
    "retry_join": (),
    "retry_interval": 30.0,
    "encrypt": None,
    "discover": None,
    "dev": False,
    "datacenter": "dc1",
    "domain": "consul",
    "config_dir": None,
    "enable_script_checks": False,
    "check_update_interval": 300.0,
    "recursors": (),
    "dns_node_ttl": 0,
    "dns_service_ttl": 0,
    "log_level": "info",
    "log_json": False,
}


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


@dataclass(slots=True)
class _Value:
    value: Any
    where: str


@dataclass(slots=True)
class _Layers:
    """Parsed values per field, lowest precedence first; the last one wins."""

    values: dict[str, list[_Value]] = field(default_factory=dict)

    def add(self, name: str, raw: object, where: str) -> None:
        try:
            parsed = FIELDS[name](raw)
        except ValueError as e:
            raise ConfigError(where, str(e)) from None
        self.values.setdefault(name, []).append(_Value(parsed, where))

    def get(self, name: str) -> _Value | None:
        layers = self.values.get(name)
        return layers[-1] if layers else None


def _read_config_file(path: str) -> dict[str, Any]:
    where = f"config file {path}"
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(where, f"cannot read: {e.strerror or e}") from None
    suffix = Path(path).suffix.lower()
    try:
        if suffix == ".json":
            parsed: object = json.loads(data.decode("utf-8"))
        elif suffix == ".toml":
            parsed = tomllib.loads(data.decode("utf-8"))
        else:
            raise ConfigError(where, "unsupported format (use a .json or .toml file)")
    except UnicodeDecodeError:
        raise ConfigError(where, "not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ConfigError(where, f"invalid JSON: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(where, f"invalid TOML: {e}") from None
    if not isinstance(parsed, dict):
        raise ConfigError(where, "must contain an object of settings at the top level")
    return parsed


def _apply_file(layers: _Layers, path: str) -> None:
    for key, raw in _read_config_file(path).items():
        name = str(key).replace("-", "_")
        where = f"config file {path}: {key}"
        if name == "config_file":
            raise ConfigError(where, "config files cannot include other config files")
        if name not in FIELDS:
            raise ConfigError(where, "unknown setting")
        layers.add(name, raw, where)


def private_ipv4_addresses() -> list[str]:
    """Private (RFC 1918 and friends) IPv4 addresses of this host, loopback excluded."""
    import ifaddr

    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue
            addr = ipaddress.IPv4Address(ip.ip)
            if addr.is_private and not addr.is_loopback and not addr.is_link_local:
                out.append(str(addr))
    return sorted(set(out))


def _default_node_name(hostname: str) -> str:
    """The host name, or its first label if the full name is not a valid node name."""
    if _NODE_RE.match(hostname):
        return hostname
    return hostname.split(".", 1)[0]


def load_config(
    cli: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    *,
    hostname: Callable[[], str] = socket.gethostname,
    private_ips: Callable[[], Iterable[str]] = private_ipv4_addresses,
) -> AgentConfig:
    """Merge and validate. `cli` holds only the flags actually given (dest names as keys)."""
    env = {} if env is None else env
    layers = _Layers()

    if cli.get("config_file"):
        files = _str_list(cli["config_file"])
    else:
        raw_files = env.get(env_name("config_file"), "")
        files = _str_list(raw_files) if raw_files.strip() else ()
    for path in files:
        _apply_file(layers, path)

    for name in FIELDS:
        raw = env.get(env_name(name))
        if raw is not None and raw.strip() != "":
            layers.add(name, raw, env_name(name))

    for name, raw in cli.items():
        if name == "config_file" or raw is None:
            continue
        if name not in FIELDS:
            raise ConfigError(flag_name(name), "unknown option")
        layers.add(name, raw, flag_name(name))

    def value(name: str) -> Any:
        v = layers.get(name)
        return v.value if v is not None else _DEFAULTS.get(name)

    dev = bool(value("dev"))
    if dev:
        for name, default in (("bind", "127.0.0.1"), ("client", "127.0.0.1")):
            if layers.get(name) is None:
                layers.values[name] = [_Value(default, "--dev")]

    node_v = layers.get("node")
    if node_v is None:
        host = hostname()
        try:
            node = _node_name(_default_node_name(host))
        except ValueError:
            raise ConfigError(
                "--node",
                f"the host name {host!r} is not a valid node name; set --node "
                "(letters, digits and dashes)",
            ) from None
    else:
        node = node_v.value

    data_dir = value("data_dir")
    if data_dir is None and not dev:
        raise ConfigError("--data-dir", "required (or run with --dev)")

    bind = value("bind")
    advertise = value("advertise")
    if advertise is None:
        if not ipaddress.IPv4Address(bind).is_unspecified:
            advertise = bind
        else:
            found = list(private_ips())
            if len(found) == 1:
                advertise = found[0]
            elif not found:
                raise ConfigError(
                    "--advertise",
                    f"bind address is {bind} and no private IPv4 address was found; "
                    "set --bind or --advertise",
                )
            else:
                raise ConfigError(
                    "--advertise",
                    f"bind address is {bind} and several private IPv4 addresses were found "
                    f"({', '.join(found)}); set --bind or --advertise",
                )

    return AgentConfig(
        node=node,
        data_dir=data_dir,
        bind=bind,
        advertise=advertise,
        client=value("client"),
        serf_port=value("serf_port"),
        server_port=value("server_port"),
        bootstrap_expect=value("bootstrap_expect"),
        server_stabilization_time=float(value("server_stabilization_time")),
        http_port=value("http_port"),
        dns_port=value("dns_port"),
        join=tuple(value("join")),
        retry_join=tuple(value("retry_join")),
        retry_interval=float(value("retry_interval")),
        encrypt=value("encrypt"),
        discover=value("discover"),
        config_file=tuple(files),
        dev=dev,
        datacenter=value("datacenter"),
        domain=value("domain"),
        config_dir=value("config_dir"),
        enable_script_checks=bool(value("enable_script_checks")),
        check_update_interval=float(value("check_update_interval")),
        recursors=tuple(value("recursors")),
        dns_node_ttl=int(value("dns_node_ttl")),
        dns_service_ttl=int(value("dns_service_ttl")),
        log_level=value("log_level"),
        log_json=bool(value("log_json")),
    )

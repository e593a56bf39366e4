"""The `meshnode` command line: `agent` runs an agent; the rest talk to one over its HTTP API.

Usage errors (bad flags, bad config) print one line, `meshnode: error: <field>: <problem>`, and
exit 2. Runtime failures (agent unreachable, join failed, agent cannot start) exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Sequence
from http import HTTPStatus
from pathlib import Path
from typing import Any, NoReturn

from gossip.keyring import KeyringError, generate_key, parse_key
from node.config import FIELDS, LOG_LEVELS, ConfigError, load_config

__all__ = ["DEFAULT_HTTP_ADDR", "AgentClient", "ClientError", "main"]

PROG = "meshnode"
DEFAULT_HTTP_ADDR = "http://127.0.0.1:8500"
HTTP_ADDR_ENV = "MESHNODE_HTTP_ADDR"
STATUS_LABELS = {0: "none", 1: "alive", 2: "leaving", 3: "left", 4: "failed"}


class UsageError(Exception):
    """Bad command line: one line on stderr, exit 2."""


class ClientError(Exception):
    """A failed conversation with an agent: one line on stderr, exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# ----- HTTP client for the non-agent commands -----


def normalize_http_addr(addr: str) -> str:
    addr = addr.strip()
    if "://" not in addr:
        addr = "http://" + addr
    parsed = urllib.parse.urlsplit(addr)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UsageError(f"--http-addr: must be http://host:port, got {addr!r}")
    try:
        _ = parsed.port
    except ValueError:
        raise UsageError(f"--http-addr: invalid port in {addr!r}") from None
    return f"{parsed.scheme}://{parsed.netloc}"


class AgentClient:
    """Tiny synchronous client: the CLI makes one or two calls, urllib is plenty."""

    def __init__(self, base: str, timeout: float = 15.0) -> None:
        self.base = base
        self.timeout = timeout
        # The agent is local; HTTP(S)_PROXY settings must not reroute these calls.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def fetch(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) for any HTTP answer; ClientError when the agent cannot be reached."""
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                return resp.status, bytes(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except urllib.error.URLError as e:
            raise ClientError(f"cannot reach agent at {self.base}: {_reason(e.reason)}") from None
        except TimeoutError:
            raise ClientError(f"cannot reach agent at {self.base}: timed out") from None
        except OSError as e:
            raise ClientError(f"cannot reach agent at {self.base}: {_reason(e)}") from None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        timeout: float | None = None,
    ) -> bytes:
        status, raw = self.fetch(method, path, body, timeout=timeout)
        if status >= 400:
            text = raw.decode(errors="replace").strip()
            reason = text or HTTPStatus(status).phrase
            raise ClientError(f"agent returned {status}: {reason}")
        return raw

    def get_json(self, path: str) -> Any:
        raw = self.request("GET", path)
        try:
            return json.loads(raw)
        except ValueError:
            raise ClientError(f"agent sent invalid JSON for {path}") from None


def _reason(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve host ({reason.strerror})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return str(reason)


def _client(ns: argparse.Namespace, timeout: float = 15.0) -> AgentClient:
    addr = ns.http_addr or os.environ.get(HTTP_ADDR_ENV) or DEFAULT_HTTP_ADDR
    return AgentClient(normalize_http_addr(addr), timeout)


# ----- commands -----


def cmd_agent(ns: argparse.Namespace) -> int:
    from node.agent import Agent, AgentError
    from node.antientropy import AntiEntropy
    from node.consensus import Consensus
    from node.dns.server import DNSServer
    from node.log import bind_context, setup_logging

    given = {k: v for k, v in vars(ns).items() if k in FIELDS or k == "config_file"}
    try:
        config = load_config(given, os.environ)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    setup_logging(config.log_level, config.log_json)
    bind_context(agent=config.node)
    agent = Agent(config)
    agent.add_component(Consensus(agent))
    scripts, interval = config.enable_script_checks, config.check_update_interval
    agent.add_component(AntiEntropy(agent, scripts=scripts, check_update_interval=interval))
    agent.add_component(DNSServer(agent))
    try:
        return _run_async(agent.run())
    except AgentError as e:
        raise ClientError(str(e)) from None


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop where available (Linux); the stdlib loop otherwise."""
    loop_factory = None
    if sys.platform == "linux":
        try:
            import uvloop

            loop_factory = uvloop.new_event_loop
        except ImportError:
            pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


def format_members(members: list[dict[str, Any]]) -> str:
    """`consul members -detailed` style: Node, Address, Status, Tags in aligned columns."""
    rows = [["Node", "Address", "Status", "Tags"]]
    for m in sorted(members, key=lambda m: str(m.get("Name", ""))):
        tags = m.get("Tags") or {}
        status = m.get("Status")
        rows.append(
            [
                str(m.get("Name", "")),
                f"{m.get('Addr', '')}:{m.get('Port', '')}",
                STATUS_LABELS.get(status, str(status)) if isinstance(status, int) else str(status),
                ",".join(f"{k}={v}" for k, v in sorted(tags.items())),
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]) for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines)


def cmd_members(ns: argparse.Namespace) -> int:
    members = _client(ns).get_json("/v1/agent/members")
    if not isinstance(members, list):
        raise ClientError("agent sent an unexpected members response")
    if ns.format == "json":
        print(json.dumps(members, indent=2, sort_keys=True))
    else:
        print(format_members(members))
    return 0


def cmd_join(ns: argparse.Namespace) -> int:
    client = _client(ns, timeout=30.0)
    joined = 0
    for addr in ns.addresses:
        try:
            client.request("PUT", "/v1/agent/join/" + urllib.parse.quote(addr, safe=":/[]"))
        except ClientError as e:
            if "cannot reach agent" in str(e):
                raise
            print(f"{PROG}: error: joining {addr}: {e}", file=sys.stderr)
            continue
        joined += 1
    if joined == 0:
        return 1
    print(f"Successfully joined cluster by contacting {joined} nodes.")
    return 0


def cmd_leave(ns: argparse.Namespace) -> int:
    _client(ns, timeout=60.0).request("PUT", "/v1/agent/leave")
    print("Graceful leave complete")
    return 0


def cmd_keygen(ns: argparse.Namespace) -> int:
    print(generate_key())
    return 0


def _checked_key(flag: str, key: str) -> str:
    try:
        parse_key(key)
    except (KeyringError, ValueError) as e:
        raise UsageError(f"{flag}: {e}") from None
    return key


_KEYRING_OPS = (
    ("--install", "POST", "Installing new gossip encryption key"),
    ("--use", "PUT", "Changing primary gossip encryption key"),
    ("--remove", "DELETE", "Removing gossip encryption key"),
)


def cmd_keyring(ns: argparse.Namespace) -> int:
    client = _client(ns, timeout=30.0)
    if ns.list:
        print("==> Gathering installed encryption keys...")
        pools = client.get_json("/v1/operator/keyring")
        for pool in pools if isinstance(pools, list) else []:
            n = pool.get("NumNodes", 0)
            name = "WAN" if pool.get("WAN") else f"{pool.get('Datacenter', '')} (LAN)"
            print(f"\n{name}:")
            for key, count in sorted((pool.get("Keys") or {}).items()):
                print(f"  {key} [{count}/{n}]")
            primaries = pool.get("PrimaryKeys") or {}
            if primaries:
                print("Primary key:")
                for key, count in sorted(primaries.items()):
                    print(f"  {key} [{count}/{n}]")
            for node, msg in sorted((pool.get("Messages") or {}).items()):
                print(f"  {node}: {msg}")
        return 0
    flag, method, banner = next(op for op in _KEYRING_OPS if getattr(ns, op[0][2:]) is not None)
    key = getattr(ns, flag[2:])
    body = json.dumps({"Key": _checked_key(flag, key)}).encode()
    print(f"==> {banner}...")
    client.request(method, "/v1/operator/keyring", body)
    return 0


def cmd_event(ns: argparse.Namespace) -> int:
    if not ns.name:
        raise UsageError("event: a name is required")
    query = {k: v for k, v in (("node", ns.node), ("service", ns.service), ("tag", ns.tag)) if v}
    if query.get("tag") and not query.get("service"):
        raise UsageError("--tag: cannot be used without --service")
    path = "/v1/event/fire/" + urllib.parse.quote(ns.name, safe="")
    if query:
        path += "?" + urllib.parse.urlencode(query)
    payload = ns.payload.encode() if ns.payload else b""
    raw = _client(ns).request("PUT", path, payload)
    try:
        event = json.loads(raw)
    except ValueError:
        raise ClientError("agent sent invalid JSON for the fired event") from None
    print(f"Event ID: {event.get('ID', '')}")
    return 0


def _kv_path(key: str, *flags: str, **params: int | str | None) -> str:
    """Flags count by presence in Consul (`?recurse`); parameters with None are left out."""
    parts = [f for f in flags if f] + [
        f"{k}={urllib.parse.quote(str(v), safe='')}" for k, v in params.items() if v is not None
    ]
    path = "/v1/kv/" + urllib.parse.quote(key, safe="/")
    return path + ("?" + "&".join(parts) if parts else "")


def _kv_value(raw: str) -> bytes:
    """Consul's conventions: `-` reads stdin, `@file` reads a file, anything else is literal."""
    if raw == "-":
        return sys.stdin.buffer.read()
    if raw.startswith("@"):
        try:
            with open(raw[1:], "rb") as f:
                return f.read()
        except OSError as e:
            raise UsageError(f"VALUE: cannot read {raw[1:]}: {e.strerror}") from None
    return raw.encode()


def _u64_flag(name: str, value: str | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit() or int(value) >= 2**64:
        raise UsageError(f"{name}: must be an unsigned 64-bit integer, got {value!r}")
    return int(value)


def cmd_kv_put(ns: argparse.Namespace) -> int:
    flags = _u64_flag("--flags", ns.flags)
    index = _u64_flag("--modify-index", ns.modify_index)
    if ns.cas and index is None:
        raise UsageError("--cas: needs --modify-index (0 writes only if the key does not exist)")
    if not ns.key:
        raise UsageError("KEY: must not be empty")
    value = _kv_value(ns.value) if ns.value is not None else b""
    path = _kv_path(ns.key, flags=flags, cas=index if ns.cas else None)
    raw = _client(ns).request("PUT", path, value)
    if raw.strip() != b"true":
        print(f"Error! Did not write to {ns.key}: CAS failed", file=sys.stderr)
        return 1
    print(f"Success! Data written to: {ns.key}")
    return 0


def cmd_kv_get(ns: argparse.Namespace) -> int:
    client = _client(ns)
    mode = "stale" if ns.stale else "consistent" if ns.consistent else ""
    if ns.keys:
        path = _kv_path(ns.key, "keys", mode, separator=ns.separator)
    else:
        path = _kv_path(ns.key, "recurse" if ns.recurse else "", mode)
    status, raw = client.fetch("GET", path)
    if status == 404:
        if ns.recurse or ns.keys:
            return 0
        print(f"Error! No key exists at: {ns.key}", file=sys.stderr)
        return 1
    if status >= 400:
        raise ClientError(f"agent returned {status}: {raw.decode(errors='replace').strip()}")
    try:
        data = json.loads(raw)
    except ValueError:
        raise ClientError("agent sent invalid JSON for the key") from None
    if ns.keys:
        for k in data:
            print(k)
        return 0
    out = sys.stdout.buffer
    for entry in data:
        value = base64.b64decode(entry.get("Value") or "")
        if ns.detailed:
            for field in ("CreateIndex", "Flags", "Key", "LockIndex", "ModifyIndex", "Session"):
                print(f"{field:<12}{entry.get(field, '-')}")
            print(f"{'Value':<12}{value.decode(errors='replace')}")
            print()
        elif ns.recurse:
            out.write(entry["Key"].encode() + b":" + value + b"\n")
        else:
            out.write(value + b"\n")
    out.flush()
    return 0


def cmd_kv_delete(ns: argparse.Namespace) -> int:
    index = _u64_flag("--modify-index", ns.modify_index)
    if ns.cas and index is None:
        raise UsageError("--cas: needs --modify-index")
    if not ns.key and not ns.recurse:
        raise UsageError("KEY: must not be empty (use --recurse to delete everything)")
    path = _kv_path(ns.key, "recurse" if ns.recurse else "", cas=index if ns.cas else None)
    raw = _client(ns).request("DELETE", path)
    if raw.strip() != b"true":
        print(f"Error! Did not delete key {ns.key}: CAS failed", file=sys.stderr)
        return 1
    print(f"Success! Deleted key{'s under' if ns.recurse else ''}: {ns.key}")
    return 0


def cmd_services_register(ns: argparse.Namespace) -> int:
    from node.definitions import DefinitionError, load_file

    try:
        defs = load_file(Path(ns.file))
    except DefinitionError as e:
        raise UsageError(f"FILE: {e}") from None
    if not defs.services and not defs.checks:
        raise UsageError(f"FILE: {ns.file} defines no service or check")
    client = _client(ns)
    for svc in defs.services:
        client.request("PUT", "/v1/agent/service/register", json.dumps(svc).encode())
        name = next((v for k, v in svc.items() if k.lower() in ("name", "id")), "?")
        print(f"Registered service: {name}")
    for chk in defs.checks:
        client.request("PUT", "/v1/agent/check/register", json.dumps(chk).encode())
        name = next((v for k, v in chk.items() if k.lower() in ("name", "id", "checkid")), "?")
        print(f"Registered check: {name}")
    return 0


def cmd_services_deregister(ns: argparse.Namespace) -> int:
    _client(ns).request("PUT", "/v1/agent/service/deregister/" + urllib.parse.quote(ns.id, safe=""))
    print(f"Deregistered service: {ns.id}")
    return 0


def cmd_raft_list_peers(ns: argparse.Namespace) -> int:
    path = "/v1/operator/raft/configuration" + ("?stale" if ns.stale else "")
    config = _client(ns).get_json(path)
    servers = config.get("Servers") if isinstance(config, dict) else None
    if not isinstance(servers, list):
        raise ClientError("agent sent an unexpected raft configuration")
    rows = [["Node", "ID", "Address", "State", "Voter", "RaftProtocol"]]
    for srv in servers:
        state = "leader" if srv.get("Leader") else "follower" if srv.get("Voter") else "learner"
        rows.append([str(srv.get("Node", "")), str(srv.get("ID", "")),
                     str(srv.get("Address", "")), state, str(bool(srv.get("Voter"))).lower(),
                     str(srv.get("ProtocolVersion", ""))])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_raft_remove_peer(ns: argparse.Namespace) -> int:
    if bool(ns.id) == bool(ns.address):
        raise UsageError("remove-peer: give exactly one of --id or --address")
    query = urllib.parse.urlencode({"id": ns.id} if ns.id else {"address": ns.address})
    _client(ns).request("DELETE", f"/v1/operator/raft/peer?{query}")
    print(f"Removed peer with {'id' if ns.id else 'address'} {ns.id or ns.address!r}")
    return 0


def cmd_raft_transfer_leader(ns: argparse.Namespace) -> int:
    query = "?" + urllib.parse.urlencode({"id": ns.id}) if ns.id else ""
    raw = _client(ns, timeout=30.0).request("POST", f"/v1/operator/raft/transfer-leader{query}")
    try:
        new = json.loads(raw).get("NewLeader", "")
    except (ValueError, AttributeError):
        new = ""
    print(f"Success! Leadership transferred{f' to {new}' if new else ''}.")
    return 0


def cmd_snapshot_save(ns: argparse.Namespace) -> int:
    client = _client(ns, timeout=120.0)
    status, raw = client.fetch("GET", "/v1/snapshot" + ("?stale" if ns.stale else ""))
    if status >= 400:
        raise ClientError(f"agent returned {status}: {raw.decode(errors='replace').strip()}")
    from node.api.operator import SnapshotError, unpack_snapshot

    try:
        meta, _ = unpack_snapshot(raw)
    except SnapshotError as e:
        raise ClientError(f"the agent sent a bad snapshot: {e}") from None
    tmp = ns.file + ".part"
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, ns.file)
    except OSError as e:
        raise ClientError(f"cannot write {ns.file}: {e.strerror}") from None
    print(f"Saved and verified snapshot to index {meta.get('Index')}")
    return 0


def cmd_snapshot_restore(ns: argparse.Namespace) -> int:
    try:
        with open(ns.file, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UsageError(f"FILE: cannot read {ns.file}: {e.strerror}") from None
    from node.api.operator import SnapshotError, unpack_snapshot

    try:
        unpack_snapshot(raw)
    except SnapshotError as e:
        raise UsageError(f"FILE: {e}") from None
    _client(ns, timeout=120.0).request("PUT", "/v1/snapshot", raw)
    print("Restored snapshot")
    return 0


# ----- parser -----


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="meshnode: a decentralized, Consul-compatible agent")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    agent = sub.add_parser("agent", help="run an agent")
    s = argparse.SUPPRESS
    agent.add_argument("--node", default=s, help="node name (default: host name)")
    agent.add_argument("--data-dir", default=s, help="state directory (required unless --dev)")
    agent.add_argument("--bind", default=s, help="gossip and server RPC address (0.0.0.0)")
    agent.add_argument("--advertise", default=s, help="address peers use to reach us")
    agent.add_argument("--client", default=s, help="HTTP (and later DNS) address (127.0.0.1)")
    agent.add_argument("--serf-port", default=s, help="gossip port, UDP+TCP (8301)")
    agent.add_argument("--server-port", default=s, help="server RPC port (8300)")
    agent.add_argument("--http-port", default=s, help="HTTP API port (8500)")
    agent.add_argument("--dns-port", default=s, help="DNS port (8600)")
    agent.add_argument(
        "--join",
        action="append",
        default=s,
        metavar="HOST[:PORT]",
        help="join at start; failure aborts the start (repeatable)",
    )
    agent.add_argument(
        "--retry-join",
        action="append",
        default=s,
        metavar="HOST[:PORT]",
        help="join in the background until it works (repeatable)",
    )
    agent.add_argument("--retry-interval", default=s, help="retry-join interval (30s)")
    agent.add_argument(
        "--enable-script-checks",
        action="store_true",
        default=s,
        help="allow checks that run commands (Args); off by default, as in Consul",
    )
    agent.add_argument(
        "--check-update-interval",
        default=s,
        help="how often a check whose output changes but not its status is written to the "
        "catalog (5m, as Consul; 0s writes every change)",
    )
    agent.add_argument("--domain", default=s, help="DNS domain served on --dns-port (consul)")
    agent.add_argument(
        "--recursor",
        dest="recursors",
        action="append",
        default=s,
        metavar="IP[:PORT]",
        help="DNS server for names outside --domain (repeatable)",
    )
    agent.add_argument("--dns-node-ttl", default=s, help="TTL of node records (0s)")
    agent.add_argument("--dns-service-ttl", default=s, help="TTL of service records (0s)")
    agent.add_argument(
        "--bootstrap-expect",
        default=s,
        metavar="N",
        help="wait for N members, then bootstrap one Raft cluster (give the same N to each)",
    )
    agent.add_argument(
        "--server-stabilization-time",
        default=s,
        metavar="DURATION",
        help="how long a member must be healthy before it may vote, and a voter failed before "
        "it is replaced (10s)",
    )
    agent.add_argument(
        "--encrypt",
        default=s,
        metavar="BASE64KEY",
        help="gossip encryption key (seeds the keyring on first start)",
    )
    agent.add_argument("--discover", default=s, metavar="mdns", help="LAN auto-discovery method")
    agent.add_argument(
        "--config-file",
        action="append",
        default=s,
        metavar="FILE",
        help="JSON or TOML config file (repeatable, later wins)",
    )
    agent.add_argument(
        "--config-dir",
        default=s,
        metavar="DIR",
        help="service and check definitions (*.json, *.toml), loaded at start and on SIGHUP",
    )
    agent.add_argument(
        "--dev", action="store_true", default=s, help="development mode: in-memory, loopback only"
    )
    agent.add_argument("--datacenter", default=s, help="datacenter name (dc1)")
    agent.add_argument(
        "--log-level", default=s, metavar="|".join(LOG_LEVELS), help="log level (info)"
    )
    agent.add_argument("--log-json", action="store_true", default=s, help="JSON log lines")
    agent.set_defaults(func=cmd_agent)

    http_parent = _Parser(add_help=False)
    http_parent.add_argument(
        "--http-addr",
        default=None,
        help=f"agent HTTP API (env {HTTP_ADDR_ENV}, default {DEFAULT_HTTP_ADDR})",
    )

    p = sub.add_parser("members", parents=[http_parent], help="list cluster members")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_members)

    p = sub.add_parser("join", parents=[http_parent], help="tell the agent to join a cluster")
    p.add_argument("addresses", nargs="+", metavar="HOST[:PORT]")
    p.set_defaults(func=cmd_join)

    p = sub.add_parser("leave", parents=[http_parent], help="gracefully leave and stop the agent")
    p.set_defaults(func=cmd_leave)

    p = sub.add_parser("keygen", help="print a new gossip encryption key")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("keyring", parents=[http_parent], help="manage gossip encryption keys")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--list", action="store_true", help="list installed keys")
    group.add_argument("--install", metavar="KEY", help="install a key on every node")
    group.add_argument("--use", metavar="KEY", help="make an installed key the primary")
    group.add_argument("--remove", metavar="KEY", help="remove a key from every node")
    p.set_defaults(func=cmd_keyring)

    p = sub.add_parser("event", parents=[http_parent], help="fire a user event")
    p.add_argument("name", metavar="NAME")
    p.add_argument("payload", nargs="?", default="", metavar="PAYLOAD")
    p.add_argument("--node", default="", help="regexp of node names that handle it")
    p.add_argument("--service", default="", help="regexp of services that handle it")
    p.add_argument("--tag", default="", help="regexp of service tags (needs --service)")
    p.set_defaults(func=cmd_event)

    kv = sub.add_parser("kv", help="read and write the replicated key/value store")
    kv_sub = kv.add_subparsers(dest="kv_command", metavar="SUBCOMMAND", parser_class=_Parser)
    kv_sub.required = True
    p = kv_sub.add_parser("put", parents=[http_parent], help="write a key")
    p.add_argument("key", metavar="KEY")
    p.add_argument("value", nargs="?", metavar="VALUE", help="the value, @FILE, or - for stdin")
    p.add_argument("--flags", default=None, help="unsigned 64-bit flags stored with the key")
    p.add_argument("--cas", action="store_true", help="write only if --modify-index matches")
    p.add_argument("--modify-index", default=None, help="index for --cas (0: only if absent)")
    p.set_defaults(func=cmd_kv_put)
    p = kv_sub.add_parser("get", parents=[http_parent], help="read a key or a prefix")
    p.add_argument("key", nargs="?", default="", metavar="KEY")
    p.add_argument("--recurse", action="store_true", help="every key under the prefix")
    p.add_argument("--keys", action="store_true", help="only key names under the prefix")
    p.add_argument("--separator", default="/", help="with --keys: collapse at this (/)")
    p.add_argument("--detailed", action="store_true", help="show the metadata too")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stale", action="store_true", help="read this agent's replica")
    mode.add_argument("--consistent", action="store_true", help="linearizable read")
    p.set_defaults(func=cmd_kv_get)
    p = kv_sub.add_parser("delete", parents=[http_parent], help="delete a key or a prefix")
    p.add_argument("key", nargs="?", default="", metavar="KEY")
    p.add_argument("--recurse", action="store_true", help="delete every key under the prefix")
    p.add_argument("--cas", action="store_true", help="delete only if --modify-index matches")
    p.add_argument("--modify-index", default=None, help="index for --cas")
    p.set_defaults(func=cmd_kv_delete)

    op = sub.add_parser("operator", help="cluster operations")
    op_sub = op.add_subparsers(dest="operator_command", metavar="SUBCOMMAND", parser_class=_Parser)
    op_sub.required = True
    raft = op_sub.add_parser("raft", help="inspect and change the Raft configuration")
    raft_sub = raft.add_subparsers(dest="raft_command", metavar="SUBCOMMAND", parser_class=_Parser)
    raft_sub.required = True
    p = raft_sub.add_parser("list-peers", parents=[http_parent], help="show the Raft servers")
    p.add_argument("--stale", action="store_true", help="answer from this agent (no leader needed)")
    p.set_defaults(func=cmd_raft_list_peers)
    p = raft_sub.add_parser("remove-peer", parents=[http_parent], help="remove a Raft server")
    p.add_argument("--id", default="", help="the server's ID")
    p.add_argument("--address", default="", help="the server's IP:port")
    p.set_defaults(func=cmd_raft_remove_peer)
    p = raft_sub.add_parser("transfer-leader", parents=[http_parent], help="move leadership")
    p.add_argument("--id", default="", help="the voter to hand leadership to (any by default)")
    p.set_defaults(func=cmd_raft_transfer_leader)

    svcs = sub.add_parser("services", help="register services with the local agent")
    svcs_sub = svcs.add_subparsers(dest="services_command", metavar="SUBCOMMAND",
                                   parser_class=_Parser)  # fmt: skip
    svcs_sub.required = True
    p = svcs_sub.add_parser("register", parents=[http_parent],
                            help="register the services and checks defined in FILE")  # fmt: skip
    p.add_argument("file", metavar="FILE", help="a .json or .toml service definition")
    p.set_defaults(func=cmd_services_register)
    p = svcs_sub.add_parser("deregister", parents=[http_parent], help="deregister service ID")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_services_deregister)

    snap = sub.add_parser("snapshot", help="save or restore the replicated state")
    snap_sub = snap.add_subparsers(
        dest="snapshot_command", metavar="SUBCOMMAND", parser_class=_Parser
    )
    snap_sub.required = True
    p = snap_sub.add_parser("save", parents=[http_parent], help="save a snapshot to FILE")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--stale", action="store_true", help="from this agent's replica")
    p.set_defaults(func=cmd_snapshot_save)
    p = snap_sub.add_parser("restore", parents=[http_parent], help="restore the state from FILE")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_snapshot_restore)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        return int(ns.func(ns))
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except ClientError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

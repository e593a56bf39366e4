"""A service registration as Consul takes it (/v1/agent/service/register, --config-dir
files): field rules, keys in any case or snake_case, nested objects (Proxy, Connect, ...) in
Consul's spelling, tagged addresses checked, and the catalog's own validation, so that what the
agent accepts anti-entropy can always write."""

from __future__ import annotations

import ipaddress
from typing import Any

from node.golang import field, fold
from node.state import commands as cmd
from node.state.commands import SERVICE_SPEC

__all__ = ["RegistrationError", "parse_service", "validate_for_catalog"]


class RegistrationError(ValueError):
    """A registration the agent refuses; the message (Consul's where known) is the 400 body."""


# The nested objects Consul decodes into structs, so their keys come back in Consul's spelling
# whatever case or snake_case they were sent in. None: a leaf (or an opaque map such as
# Proxy.Config) kept as given; [shape]: a list of shape. Unknown keys are kept as given.
Shape = dict[str, Any] | list[Any] | None
_MESH_GATEWAY: Shape = {"Mode": None}
_UPSTREAM: Shape = {
    k: None for k in ("DestinationType", "DestinationNamespace", "DestinationPartition",
                      "DestinationPeer", "DestinationName", "Datacenter", "LocalBindAddress",
                      "LocalBindPort", "LocalBindSocketPath", "LocalBindSocketMode", "Config",
                      "CentrallyConfigured")
} | {"MeshGateway": _MESH_GATEWAY}  # fmt: skip
_PROXY: Shape = {
    k: None for k in ("DestinationServiceName", "DestinationServiceID", "LocalServiceAddress",
                      "LocalServicePort", "LocalServiceSocketPath", "Mode", "Config",
                      "AccessLogs")
} | {
    "Upstreams": [_UPSTREAM],
    "MeshGateway": _MESH_GATEWAY,
    "Expose": {"Checks": None,
               "Paths": [{"ListenerPort": None, "Path": None, "LocalPathPort": None,
                          "Protocol": None}]},
    "TransparentProxy": {"OutboundListenerPort": None, "DialedDirectly": None},
}  # fmt: skip
_CONNECT: Shape = {"Native": None, "SidecarService": None}
_LOCALITY: Shape = {"Region": None, "Zone": None}
_TAGGED_ADDRESS: Shape = {"Address": None, "Port": None}


def _canonical(raw: Any, shape: Shape, where: str) -> Any:
    if shape is None or raw is None:
        return raw
    if isinstance(shape, list):
        if not isinstance(raw, list):
            raise RegistrationError(f"Invalid service: {where} must be a list")
        return [_canonical(x, shape[0], f"{where}[{i}]") for i, x in enumerate(raw)]
    if not isinstance(raw, dict):
        raise RegistrationError(f"Invalid service: {where} must be an object")
    names = {fold(k): k for k in shape}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        canon = names.get(fold(key))
        if canon is None:
            out[key] = value
        else:
            out[canon] = _canonical(value, shape[canon], f"{where}.{canon}")
    return out


def _mapping(raw: Any, name: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RegistrationError(f"Invalid service: {name} must be an object")
    return dict(raw)


def _is_any(address: str) -> bool:
    """Consul's ipaddr.IsAny: 0.0.0.0 or :: (also as [::]) cannot be dialed by anyone."""
    try:
        return ipaddress.ip_address(address.strip("[]")).is_unspecified
    except ValueError:
        return False


def _tagged_addresses(raw: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, value in _mapping(raw, "TaggedAddresses").items():
        if not isinstance(value, dict):  # null too (Go would read it as an empty address)
            raise RegistrationError(f"Invalid service: TaggedAddresses.{name} must be an object")
        addr = _canonical(value, _TAGGED_ADDRESS, f"TaggedAddresses.{name}")
        address, port = addr.get("Address", ""), addr.get("Port", 0)
        if not isinstance(address, str) or type(port) is not int or not 0 <= port <= 65535:
            raise RegistrationError(f"Invalid service: TaggedAddresses.{name} needs a string "
                                  "Address and a Port in 0-65535")  # fmt: skip
        if _is_any(address):
            raise RegistrationError("Invalid service address")
        version = {"lan_ipv4": 4, "wan_ipv4": 4, "lan_ipv6": 6, "wan_ipv6": 6}.get(name)
        if version is not None:
            try:
                ok = ipaddress.ip_address(address).version == version
            except ValueError:
                ok = False
            if not ok:
                raise RegistrationError(f"Service tagged address {name!r} must be a valid "
                                      f"ipv{version} address")  # fmt: skip
        out[str(name)] = {**addr, "Address": address, "Port": port}
    return out


def parse_service(obj: Any, *, sidecar: bool = False) -> tuple[dict[str, Any], list[Any], Any]:
    """A service definition -> (the service in SERVICE_SPEC fields, its raw checks, the raw
    Connect.SidecarService or None). A sidecar may leave out what it inherits."""
    if not isinstance(obj, dict):
        raise RegistrationError("Invalid service: the service must be a JSON object")
    name = field(obj, "Name") or field(obj, "Service") or ""
    if not isinstance(name, str) or (not name and not sidecar):
        raise RegistrationError("Missing service name")
    sid = field(obj, "ID") or name
    port = field(obj, "Port", 0)
    if type(port) is not int or not 0 <= port <= 65535:
        raise RegistrationError(f"Invalid service: invalid Port {port!r}")
    tags = field(obj, "Tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise RegistrationError("Invalid service: Tags must be a list of strings")
    address = field(obj, "Address") or ""
    socket_path = field(obj, "SocketPath") or ""
    kind = field(obj, "Kind") or ""
    if not all(isinstance(x, str) for x in (sid, address, socket_path, kind)):
        raise RegistrationError("Invalid service: ID, Address, SocketPath and Kind are strings")
    if _is_any(address):
        raise RegistrationError("Invalid service address")
    connect = _canonical(field(obj, "Connect"), _CONNECT, "Connect")
    sidecar_def = None
    if connect is not None:
        sidecar_def = connect.pop("SidecarService", None)
        if sidecar_def is not None and sidecar:
            raise RegistrationError("Invalid SidecarService: a sidecar service cannot have a "
                                  "nested SidecarService")  # fmt: skip
        connect = connect or None  # the sidecar was sugar: nothing of it stays on the parent
    weights = _mapping(field(obj, "Weights"), "Weights")
    passing, warning = field(weights, "Passing", 1), field(weights, "Warning", 1)
    if not (type(passing) is int and passing >= 1 and type(warning) is int and warning >= 0):
        raise RegistrationError("Invalid Weights: Passing must be >= 1 and Warning >= 0")
    svc: dict[str, Any] = {
        "ID": sid, "Service": name, "Tags": tags, "Port": port, "Address": address,
        "TaggedAddresses": _tagged_addresses(field(obj, "TaggedAddresses")),
        "SocketPath": socket_path,
        "Meta": _mapping(field(obj, "Meta"), "Meta"),
        "Weights": {"Passing": passing, "Warning": warning},
        "EnableTagOverride": bool(field(obj, "EnableTagOverride", False)),
        "Kind": kind,
        "Proxy": _canonical(field(obj, "Proxy"), _PROXY, "Proxy"),
        "Connect": connect,
        "Locality": _canonical(field(obj, "Locality"), _LOCALITY, "Locality"),
    }  # fmt: skip
    unknown = set(svc) - set(SERVICE_SPEC)
    assert not unknown, unknown
    checks = field(obj, "Checks") or []
    if not isinstance(checks, list):
        raise RegistrationError("Invalid check: Checks must be a list of checks")
    checks = list(checks)
    if field(obj, "Check"):
        checks.insert(0, field(obj, "Check"))
    return svc, checks, sidecar_def


def validate_for_catalog(svc: dict[str, Any]) -> None:
    try:  # the catalog's own rules, so anti-entropy can always write what was accepted
        cmd.register("validate", "127.0.0.1", service=svc, now=0.0)
    except cmd.CommandError as e:
        raise RegistrationError("Validation failed: " + str(e).split(": ", 1)[-1]) from None

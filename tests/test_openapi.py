"""docs/openapi.yaml against a live agent: schemathesis fuzzes every operation of the spec.

One ``meshnode agent --dev --encrypt`` process (real gossip, Raft and HTTP on 127.0.0.1) is
seeded with a little of everything (KV, a lock, a session, catalog nodes, agent services with
TTL/HTTP/TCP checks, an event) so that reads return real shapes. Then, per operation,
schemathesis generates valid requests (positive) and invalid ones (negative) and each response
must pass: no 5xx except the few the spec documents as Consul's answer (see
``DOCUMENTED_5XX``), a documented status code, the documented content type, the documented
headers (X-Consul-Index/KnownLeader/LastContact on blocking reads) and the documented body
schema. ``PUT /v1/agent/service/register`` is also read back, because what it accepts must be
something the agent can serve and sync.

What the fuzzer does not send, and why (each is covered by a dedicated test below instead):

* ``PUT /v1/agent/leave`` shuts the agent down (test_leave_conforms, on its own agent).
* ``PUT /v1/agent/join/{address}`` would dial, and resolve, generated host names outside
  loopback (test_join_conforms joins 127.0.0.1 addresses only).
* ``?dc`` (and a body's Datacenter) is always the agent's own datacenter, or most requests
  would stop at ``500 No path to datacenter`` (test_unknown_dc_is_500_...).
* ``?wait`` is 10ms whenever ``?index`` is given: a random index is ahead of the store, so the
  read would otherwise block for the full wait (default 5 minutes).
* Check definitions in bodies probe only this agent: HTTP/TCP targets become the agent's own
  HTTP address and Interval becomes 30s (a generated "1ns" interval would spin a probe loop).

``PUT /v1/snapshot`` is fuzzed: a generated body is never an intact gzip+tar archive with
matching SHA-256 sums, so it can only be refused (400) and never replaces the state.
``DELETE /v1/operator/raft/peer`` is fuzzed too: a generated id/address never names this
server (and removing the leader is refused anyway).

The fuzzer makes up names, so it rarely reads what exists; ``KNOWN_REQUESTS`` adds requests
on the seeded data and for every documented error status, each checked against the spec.

The agent bugs the fuzzer found are fixed; each keeps a one-request regression test
(test_known_bug_is_fixed and the ones after it) next to the fuzzing, which fails on any of them.

Two adaptations to the installed libraries, both explained where they are: a shim lets
hypothesis-jsonschema 0.23 run on this Hypothesis, and the fuzzer's copy of the spec closes
request-body objects (additionalProperties: false) so that generated bodies use the documented
fields instead of random ones.
"""

from __future__ import annotations

import re
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import hypothesis_jsonschema._from_schema as _hjs
import pytest
import requests
import schemathesis
import yaml  # type: ignore[import-untyped]
from hypothesis import HealthCheck, given, settings
from hypothesis.internal.conjecture import utils as _cu
from schemathesis import DataGenerationMethod
from schemathesis.checks import not_a_server_error
from schemathesis.constants import NOT_SET
from schemathesis.exceptions import CheckFailed
from schemathesis.internal.checks import CheckContext
from schemathesis.internal.result import Err
from schemathesis.models import APIOperation, Case
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.transports.responses import GenericResponse

from gossip.keyring import generate_key
from node.api.http import ROUTES
from tests.harness.agents import AgentProc, wait_until

pytestmark = pytest.mark.cluster


class _LegacyMany(_cu.many):
    """hypothesis-jsonschema 0.23 (what schemathesis 3.x generates with) drives
    ``hypothesis...utils.many`` through the ``more()`` protocol, which newer Hypothesis
    replaced by a with/for protocol. This is that ``more()``, on the new internals."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._depth = self.data.depth

    def more(self) -> bool:
        self._finish_element()
        if not self._decide():
            return False
        self.count += 1
        self._in_element = True
        self._rejected = False
        return True


class _ConjectureUtilsForHJS:
    many = _LegacyMany

    def __getattr__(self, name: str) -> Any:
        return getattr(_cu, name)


if not hasattr(_cu.many, "more"):  # only hypothesis-jsonschema's view of it changes
    vars(_hjs)["cu"] = _ConjectureUtilsForHJS()

SPEC = Path(__file__).resolve().parents[1] / "docs" / "openapi.yaml"


def _request_schemas_without_invented_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The spec, except that request-body objects take only their documented fields.

    The API ignores unknown fields (as Go's decoder does) and the spec says so by leaving
    additionalProperties open; but then most generated bodies are random keys, and the few
    examples per operation rarely reach Meta, Weights or Checks. Response schemas are untouched.
    """
    components = raw["components"]["schemas"]
    pending = [op["requestBody"] for item in raw["paths"].values() for op in item.values()
               if isinstance(op, dict) and "requestBody" in op]  # fmt: skip
    pending += list(raw["components"].get("requestBodies", {}).values())
    seen: set[str] = set()
    while pending:
        node = pending.pop()
        if isinstance(node, list):
            pending.extend(node)
        elif isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in seen:
                    seen.add(name)
                    pending.append(components[name])
            if "properties" in node:
                node.setdefault("additionalProperties", False)
            pending.extend(node.values())
    return raw


SCHEMA = schemathesis.from_dict(
    _request_schemas_without_invented_fields(yaml.safe_load(SPEC.read_text())),
    code_sample_style="curl",
)


def _operations() -> dict[str, APIOperation[Any, Case]]:
    out = {}
    for result in SCHEMA.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        out[result.ok().verbose_name] = result.ok()
    return out


OPERATIONS = _operations()
DC = "dc1"
NODE = "openapi"

#: generated requests per operation: (valid ones, invalid ones)
EXAMPLES = (25, 25)
METHODS = (DataGenerationMethod.positive, DataGenerationMethod.negative)

EXCLUDED = {
    "PUT /v1/agent/leave": "shuts the agent down; see test_leave_conforms",
    "PUT /v1/agent/join/{address}": "would dial generated addresses; see test_join_conforms",
}

#: 5xx bodies the spec documents as the Consul-compatible answer of an operation
DOCUMENTED_5XX: dict[str, tuple[str, ...]] = {
    "POST /v1/operator/raft/transfer-leader": (r"^cannot transfer leadership",),
    "DELETE /v1/operator/raft/peer": (r"was not found in the Raft configuration$",),
    "POST /v1/operator/keyring": (r"\(LAN\) error: \d+/\d+ nodes reported",),
    "PUT /v1/operator/keyring": (r"\(LAN\) error: \d+/\d+ nodes reported",),
    "DELETE /v1/operator/keyring": (r"\(LAN\) error: \d+/\d+ nodes reported",),
}

_UNROUTABLE = (
    "BUG-1: a path parameter containing a newline is unroutable (404 page not found): the "
    "route patterns {key:.*}/{name:.*} do not match \\n, so such KV keys (which /v1/txn can "
    "create) cannot be read, written or deleted"
)
_SERVICE_REGISTER = (
    "BUG-2: PUT /v1/agent/service/register does not validate Meta, Weights, Checks, Proxy or "
    "Connect: a non-object Meta/Weights or a non-list Checks is a 500 (TypeError/ValueError "
    "from dict()/list()); a non-string Meta value, Weights.Passing < 1 or a non-object Proxy "
    "is stored (200) though the catalog refuses it, which stops anti-entropy for every "
    "service of the agent; a partial Weights is served without its default Warning"
)
_CORRUPT_SNAPSHOT = (
    "BUG-3: PUT /v1/snapshot with a gzip header but a corrupt deflate stream is a 500 "
    "(zlib.error escapes unpack_snapshot, which turns every other damage into a 400)"
)
_FLOAT_OVERFLOW = (
    "BUG-5: a JSON number that overflows a float (1e999) is a 500 'cannot convert float "
    "infinity to integer' in session create's LockDelay and in /v1/txn's Flags/Index/"
    "ModifyIndex (OverflowError is not caught; Go's decoder answers 400)"
)
_NO_MIN_INTERVAL = (
    "BUG-4: check intervals are not clamped to Consul's 1 s minimum: an HTTP/TCP check with "
    "Interval 1ns/10ms probes in a tight loop (CPU and connection storm)"
)


# ----- the agent -----


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProc]:
    a = AgentProc(NODE, "127.0.0.1", tmp_path_factory.mktemp("openapi"), dev=True,
                  encrypt=generate_key(), log_level="info")  # fmt: skip
    a.start()
    try:
        a.wait_ready()
        wait_until(lambda: a.http("GET", "/v1/status/leader")[1], 20, desc="a raft leader")
        wait_until(lambda: _serf_health_passing(a), 20, desc="the agent's node in the catalog")
        yield a
    finally:
        a.stop()


@pytest.fixture(scope="module")
def seeded(agent: AgentProc) -> dict[str, str]:
    """What _seed wrote that requests refer to: the session ID and this server's Raft ID."""
    return _seed(agent)


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    s = requests.Session()
    s.trust_env = False  # loopback only: never through a proxy from the environment
    try:
        yield s
    finally:
        s.close()


def _serf_health_passing(a: AgentProc) -> bool:
    status, checks = a.http("GET", f"/v1/health/node/{NODE}")
    return status == 200 and any(
        c["CheckID"] == "serfHealth" and c["Status"] == "passing" for c in checks
    )


def _ok(a: AgentProc, method: str, path: str, body: Any = None) -> Any:
    status, out = a.http(method, path, body)
    assert status == 200, f"seeding {method} {path}: {status} {out!r}"
    return out


def _seed(a: AgentProc) -> dict[str, str]:
    """Something of every shape, so that reads are checked against real entries."""
    _ok(a, "PUT", "/v1/kv/seed/a", b"\x00\xffvalue")
    _ok(a, "PUT", "/v1/kv/seed/b?flags=18446744073709551615", b"flagged")
    _ok(a, "PUT", "/v1/kv/seed/empty", b"")
    sid = _ok(a, "PUT", "/v1/session/create", {"Name": "seed", "TTL": "3600s",
                                               "Behavior": "release"})["ID"]  # fmt: skip
    assert _ok(a, "PUT", f"/v1/kv/seed/lock?acquire={sid}", b"held") is True
    _ok(a, "PUT", "/v1/catalog/register", {
        "Node": "seed-node", "Address": "10.1.2.3", "ID": str(uuid.uuid4()),
        "TaggedAddresses": {"lan": "10.1.2.3"}, "NodeMeta": {"rack": "r1"},
        "Service": {"ID": "web-1", "Service": "web", "Tags": ["v1", "primary"], "Port": 8080,
                    "Meta": {"owner": "openapi"}, "TaggedAddresses": {
                        "lan": {"Address": "10.1.2.3", "Port": 8080}}},
        "Checks": [
            {"CheckID": "web-alive", "Name": "web alive", "Status": "passing",
             "ServiceID": "web-1", "Output": "ok"},
            {"CheckID": "disk", "Status": "warning", "Notes": "90% full"},
        ],
    })  # fmt: skip
    self_url = f"http://127.0.0.1:{a.ports.http}/v1/status/leader"
    _ok(a, "PUT", "/v1/agent/service/register", {
        "Name": "api", "ID": "api-1", "Tags": ["x"], "Port": 9000, "Meta": {"k": "v"},
        "Weights": {"Passing": 3, "Warning": 1},
        "Checks": [{"TTL": "3600s", "Notes": "heartbeat"},
                   {"HTTP": self_url, "Interval": "30s"},
                   {"TCP": f"127.0.0.1:{a.ports.http}", "Interval": "30s"}],
    })  # fmt: skip
    _ok(a, "PUT", "/v1/agent/check/register", {"ID": "manual", "Name": "manual check",
                                                  "TTL": "1h"})  # fmt: skip
    _ok(a, "PUT", "/v1/agent/check/pass/service:api-1:1?note=alive")
    _ok(a, "PUT", "/v1/event/fire/deploy?service=api", b"payload")
    wait_until(lambda: "api" in a.http("GET", "/v1/catalog/services")[1], 10,
               desc="anti-entropy syncing the seeded agent service")  # fmt: skip
    return {"session": sid, "node_id": _ok(a, "GET", "/v1/agent/self")["Config"]["NodeID"]}


# ----- keeping generated requests safe and bounded -----


def _fold(key: str) -> str:
    return key.replace("_", "").lower()


def _confine_probes(value: Any, http_port: int) -> Any:
    """Point every check the body defines at this agent, with a sane interval, and every
    Datacenter at this one."""
    if isinstance(value, list):
        return [_confine_probes(v, http_port) for v in value]
    if not isinstance(value, dict):
        return value
    targets = {"http": f"http://127.0.0.1:{http_port}/v1/status/leader",
               "tcp": f"127.0.0.1:{http_port}", "grpc": f"127.0.0.1:{http_port}"}  # fmt: skip
    out: dict[Any, Any] = {}
    for k, v in value.items():
        f = _fold(k) if isinstance(k, str) else ""
        if f in targets and v:
            out[k] = targets[f]
        elif f == "datacenter" and v:
            out[k] = DC
        elif f == "interval" and v:
            out[k] = "30s"
        else:
            out[k] = _confine_probes(v, http_port)
    return out


def _confine(case: Case, http_port: int) -> None:
    if case.query:
        if "dc" in case.query:
            case.query["dc"] = DC
        if "index" in case.query:
            case.query["wait"] = "10ms"
    if isinstance(case.body, dict | list):
        case.body = _confine_probes(case.body, http_port)


# ----- checks -----


def _server_errors() -> Callable[[CheckContext, GenericResponse, Case], None]:
    """not_a_server_error, except for the 5xx the spec documents as Consul's answer."""

    def no_undocumented_server_error(
        ctx: CheckContext, response: GenericResponse, case: Case
    ) -> None:
        if response.status_code < 500:
            return
        op = case.operation.verbose_name
        if any(re.search(p, response.text) for p in DOCUMENTED_5XX.get(op, ())):
            return
        not_a_server_error(ctx, response, case)

    return no_undocumented_server_error


def _stored_service_conforms(
    http: requests.Session, base: str
) -> Callable[[CheckContext, GenericResponse, Case], None]:
    """After a 200 from PUT /v1/agent/service/register, GET /v1/agent/service/{id} must conform
    to the spec (what the agent accepted it must be able to serve, and sync to the catalog).
    A non-conforming service is deregistered again so that later operations see clean state."""
    read = OPERATIONS["GET /v1/agent/service/{id}"]

    def stored_service_conforms(ctx: CheckContext, response: GenericResponse, case: Case) -> None:
        body = case.body
        if response.status_code != 200 or not isinstance(body, dict):
            return
        fields = {_fold(k): v for k, v in reversed(list(body.items()))}  # first match wins
        name = fields.get("name") or fields.get("service")
        sid = str(fields.get("id") or name)
        got = http.get(f"{base}/v1/agent/service/{quote(sid, safe='')}",
                       timeout=10)  # fmt: skip
        try:
            read.validate_response(got)
        except CheckFailed as e:
            http.put(f"{base}/v1/agent/service/deregister/{quote(sid, safe='')}",
                     timeout=10)  # fmt: skip
            raise AssertionError(
                f"PUT /v1/agent/service/register accepted a service that "
                f"GET /v1/agent/service/{sid} then serves against the spec:\n{e}"
            ) from None

    return stored_service_conforms


# ----- the fuzzing -----


def test_spec_describes_every_route() -> None:
    """The spec and node/api's ROUTES list the same (method, path) pairs."""
    routed = set()
    for method, path, _ in ROUTES:
        if "{verb:pass|warn|fail}" in path:
            routed |= {(method, path.replace("{verb:pass|warn|fail}", v))
                       for v in ("pass", "warn", "fail")}  # fmt: skip
            continue
        routed.add((method, re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)))
    documented = {(op.method.upper(), op.path) for op in OPERATIONS.values()}
    assert documented == routed


def _strategy(op: APIOperation[Any, Case], method: DataGenerationMethod) -> Any:
    """Cases of one generation method; invalid cases keep valid path parameters (their
    negations are almost all filtered out by schemathesis, since "" and "/" are not sent),
    so the invalid parts are in the query and body."""
    if method == DataGenerationMethod.positive or not op.path_parameters:
        return op.as_strategy(data_generation_method=method)
    return op.as_strategy(data_generation_method=DataGenerationMethod.positive).flatmap(
        lambda case: op.as_strategy(data_generation_method=method,
                                    path_parameters=case.path_parameters))  # fmt: skip


@pytest.mark.parametrize("name", [n for n in OPERATIONS if n not in EXCLUDED])
def test_operation_conforms(
    agent: AgentProc, seeded: dict[str, str], http: requests.Session, name: str
) -> None:
    op = OPERATIONS[name]
    base = agent.http_base
    checks: list[Callable[[CheckContext, GenericResponse, Case], Any]] = [
        _server_errors(),
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    if name == "PUT /v1/agent/service/register":
        checks.append(_stored_service_conforms(http, base))

    def call(case: Case) -> None:
        _confine(case, agent.ports.http)
        response = case.call(base_url=base, session=http, timeout=30)
        case.validate_response(response, checks=tuple(checks))

    for method, examples in zip(METHODS, EXAMPLES, strict=True):
        if method == DataGenerationMethod.negative and not (op.query or op.body):
            continue  # only a path parameter: nothing schemathesis can make invalid
        if examples:
            settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))(
                given(case=_strategy(op, method))(call))()  # fmt: skip
    assert agent.running, "the agent exited during the fuzzing"


# ----- requests the fuzzer cannot make up: seeded names, and every documented status -----


def _conforms(op_name: str, response: requests.Response) -> None:
    """The documented status, content type, headers and body, for one hand-made request."""
    op = OPERATIONS[op_name]
    case = op.make_case()
    case.validate_response(response, checks=(status_code_conformance, content_type_conformance,
                                             response_headers_conformance,
                                             response_schema_conformance))  # fmt: skip


_TXN_READS = [
    {"KV": {"Verb": "get", "Key": "seed/a"}},
    {"KV": {"Verb": "get-tree", "Key": "seed/"}},
    {"KV": {"Verb": "set", "Key": "seed/txn", "Value": "dHhu", "Flags": 7}},
    {"Node": {"Verb": "get", "Node": {"Node": "seed-node"}}},
    {"Service": {"Verb": "get", "Node": "seed-node", "Service": {"ID": "web-1",
                                                                 "Service": "web"}}},
    {"Check": {"Verb": "get", "Check": {"Node": "seed-node", "CheckID": "disk"}}},
]  # fmt: skip
#: (operation, method, path ({session} and {node_id} are filled in), JSON or raw body, status)
KNOWN_REQUESTS: list[tuple[str, str, str, Any, int]] = [
    ("GET /v1/kv/{key}", "GET", "/v1/kv/seed/a", None, 200),
    ("GET /v1/kv/{key}", "GET", "/v1/kv/seed/a?raw", None, 200),
    ("GET /v1/kv/{key}", "GET", "/v1/kv/seed/?recurse&pretty", None, 200),
    ("GET /v1/kv/{key}", "GET", "/v1/kv/seed/?keys&separator=/", None, 200),
    ("GET /v1/kv/{key}", "GET", "/v1/kv/seed/lock?consistent", None, 200),
    ("GET /v1/kv/{key}", "GET", "/v1/kv/seed/nope?stale&index=1&wait=50ms", None, 404),
    ("GET /v1/kv/{key}", "GET", "/v1/kv/seed/a?stale&consistent", None, 400),
    ("GET /v1/kv/{key}", "GET", "/v1/kv/seed/a?index=-1", None, 400),
    ("GET /v1/kv/{key}", "GET", "/v1/kv/seed/a?wait=soon", None, 400),
    ("PUT /v1/kv/{key}", "PUT", "/v1/kv/known/x?cas=0&flags=42", b"v", 200),
    ("PUT /v1/kv/{key}", "PUT", "/v1/kv/known/x?cas=0", b"v", 200),  # body false
    ("PUT /v1/kv/{key}", "PUT", "/v1/kv/known/x?acquire={session}", b"v", 200),
    ("PUT /v1/kv/{key}", "PUT", "/v1/kv/known/x?release={session}", b"v", 200),
    ("PUT /v1/kv/{key}", "PUT", "/v1/kv/known/x?flags=18446744073709551616", b"v", 400),
    ("PUT /v1/kv/{key}", "PUT", "/v1/kv/known/big", b"x" * (512 * 1024 + 1), 413),
    ("DELETE /v1/kv/{key}", "DELETE", "/v1/kv/known/?recurse", None, 200),
    ("DELETE /v1/kv/{key}", "DELETE", "/v1/kv/known/x?cas=abc", None, 400),
    ("PUT /v1/txn", "PUT", "/v1/txn", _TXN_READS, 200),
    ("PUT /v1/txn", "PUT", "/v1/txn", [{"KV": {"Verb": "check-not-exists", "Key": "seed/a"}}],
     409),
    ("PUT /v1/txn", "PUT", "/v1/txn", [{"KV": {"Verb": "get", "Key": "k"}}] * 129, 413),
    ("PUT /v1/txn", "PUT", "/v1/txn", [{"Bogus": {}}], 400),
    ("GET /v1/catalog/node/{node}", "GET", "/v1/catalog/node/seed-node", None, 200),
    ("GET /v1/catalog/node/{node}", "GET", "/v1/catalog/node/no-such-node", None, 200),
    ("GET /v1/catalog/service/{service}", "GET", "/v1/catalog/service/web?tag=v1", None, 200),
    ("GET /v1/health/service/{service}", "GET", "/v1/health/service/web", None, 200),
    ("GET /v1/health/service/{service}", "GET", "/v1/health/service/api?passing", None, 200),
    ("GET /v1/health/checks/{service}", "GET", "/v1/health/checks/web", None, 200),
    ("GET /v1/health/node/{node}", "GET", "/v1/health/node/seed-node", None, 200),
    ("GET /v1/health/state/{state}", "GET", "/v1/health/state/warning", None, 200),
    ("GET /v1/health/state/{state}", "GET", "/v1/health/state/sleepy", None, 400),
    ("PUT /v1/catalog/register", "PUT", "/v1/catalog/register",
     {"Node": "n2", "Address": "10.0.0.2", "Check": {"Name": "named", "Status": "passing"}}, 200),
    ("PUT /v1/catalog/register", "PUT", "/v1/catalog/register", {"Node": "n2"}, 400),
    ("PUT /v1/catalog/deregister", "PUT", "/v1/catalog/deregister", {"Node": "n2"}, 200),
    ("GET /v1/session/info/{id}", "GET", "/v1/session/info/{session}", None, 200),
    ("GET /v1/session/node/{node}", "GET", f"/v1/session/node/{NODE}", None, 200),
    ("PUT /v1/session/renew/{id}", "PUT", "/v1/session/renew/{session}", None, 200),
    ("PUT /v1/session/renew/{id}", "PUT", f"/v1/session/renew/{uuid.uuid4()}", None, 404),
    ("PUT /v1/session/create", "PUT", "/v1/session/create", {"TTL": "1s"}, 400),
    ("PUT /v1/session/destroy/{id}", "PUT", "/v1/session/destroy/not-a-uuid", None, 400),
    ("GET /v1/agent/service/{id}", "GET", "/v1/agent/service/api-1", None, 200),
    ("GET /v1/agent/service/{id}", "GET", "/v1/agent/service/nope", None, 404),
    ("GET /v1/agent/service/{id}", "GET", "/v1/agent/service/api-1?hash=0&wait=1s", None, 200),
    ("GET /v1/agent/service/{id}", "GET", "/v1/agent/service/api-1?hash=0&wait=soon", None, 400),
    ("PUT /v1/agent/check/update/{id}", "PUT", "/v1/agent/check/update/manual",
     {"Status": "warning", "Output": "slow"}, 200),
    ("PUT /v1/agent/check/update/{id}", "PUT", "/v1/agent/check/update/manual",
     {"Status": "sleepy"}, 400),
    ("PUT /v1/agent/check/fail/{id}", "PUT", "/v1/agent/check/fail/nope", None, 404),
    ("PUT /v1/agent/service/register", "PUT", "/v1/agent/service/register", {"Port": 1}, 400),
    ("PUT /v1/event/fire/{name}", "PUT", "/v1/event/fire/known?node=(", b"", 400),
    ("PUT /v1/event/fire/{name}", "PUT", "/v1/event/fire/known", b"x" * 600, 400),
    ("GET /v1/event/list", "GET", "/v1/event/list?name=deploy", None, 200),
    ("GET /v1/agent/metrics", "GET", "/v1/agent/metrics?format=prometheus", None, 200),
    ("GET /v1/snapshot", "GET", "/v1/snapshot?stale", None, 200),
    ("PUT /v1/snapshot", "PUT", "/v1/snapshot", b"not a snapshot", 400),
    ("GET /v1/operator/raft/configuration", "GET", "/v1/operator/raft/configuration?stale",
     None, 200),
    ("DELETE /v1/operator/raft/peer", "DELETE", "/v1/operator/raft/peer?id={node_id}", None,
     400),
    ("DELETE /v1/operator/raft/peer", "DELETE", "/v1/operator/raft/peer", None, 400),
    ("POST /v1/operator/raft/transfer-leader", "POST", "/v1/operator/raft/transfer-leader",
     None, 500),
    ("PUT /v1/operator/keyring", "PUT", "/v1/operator/keyring", {"Key": "c2hvcnQ="}, 400),
]  # fmt: skip


@pytest.mark.parametrize(("name", "method", "path", "body", "status"), KNOWN_REQUESTS,
                         ids=[f"{r[1]} {r[2][:60]} -> {r[4]}" for r in KNOWN_REQUESTS])  # fmt: skip
def test_known_request_conforms(agent: AgentProc, seeded: dict[str, str],
                                http: requests.Session, name: str, method: str, path: str,
                                body: Any, status: int) -> None:  # fmt: skip
    url = agent.http_base + path.format(**seeded)
    data = body if isinstance(body, bytes) or body is None else None
    response = http.request(method, url, data=data, json=None if data is not None else body,
                            timeout=30)  # fmt: skip
    assert response.status_code == status, response.text
    _conforms(name, response)


# ----- what the fuzzer leaves out -----


def _path_value(param: Any) -> str:
    schema = param.definition.get("schema", {})
    if "enum" in schema:
        return str(schema["enum"][0])
    return str(uuid.uuid4()) if schema.get("format") == "uuid" else "x"


def _dc_case(op: APIOperation[Any, Case]) -> Case:
    path = {p.name: _path_value(p) for p in op.path_parameters}
    body: Any = NOT_SET
    if op.body:
        media = op.body[0].media_type
        body = b"" if "octet-stream" in media else ([] if op.path == "/v1/txn" else {})
    return op.make_case(path_parameters=path, query={"dc": "elsewhere"}, body=body)


@pytest.mark.parametrize("name", [n for n, op in OPERATIONS.items()
                                  if any(p.name == "dc" for p in op.query)])  # fmt: skip
def test_unknown_dc_is_500_on_every_operation_that_takes_dc(
    agent: AgentProc, http: requests.Session, name: str
) -> None:
    case = _dc_case(OPERATIONS[name])
    response = case.call(base_url=agent.http_base, session=http, timeout=10)
    assert (response.status_code, response.text) == (500, "No path to datacenter")
    case.validate_response(response, checks=(status_code_conformance, content_type_conformance))


def test_unrouted_requests_answer_like_consul(agent: AgentProc, http: requests.Session) -> None:
    """What the spec's description promises for requests no operation describes."""
    wrong_method = http.post(f"{agent.http_base}/v1/kv/seed/a", timeout=10)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Content-Type"].startswith("text/plain")
    assert set(wrong_method.headers["Allow"].split(",")) == {"GET", "PUT", "DELETE"}
    unknown = http.get(f"{agent.http_base}/v1/nothing/here", timeout=10)
    assert (unknown.status_code, unknown.text) == (404, "404 page not found")
    assert unknown.headers["Content-Type"].startswith("text/plain")


def test_join_conforms(agent: AgentProc, http: requests.Session) -> None:
    base = agent.http_base
    ok = http.put(f"{base}/v1/agent/join/{agent.serf_addr}", timeout=30)  # itself
    assert ok.status_code == 200, ok.text
    _conforms("PUT /v1/agent/join/{address}", ok)
    closed = http.put(f"{base}/v1/agent/join/127.0.0.1:1", timeout=30)
    assert closed.status_code == 500 and closed.text
    _conforms("PUT /v1/agent/join/{address}", closed)
    wan = http.put(f"{base}/v1/agent/join/{agent.serf_addr}?wan", timeout=30)
    assert (wan.status_code, wan.text) == (500, "Must be a server to join WAN cluster")
    _conforms("PUT /v1/agent/join/{address}", wan)


def test_leave_conforms(tmp_path: Path, http: requests.Session) -> None:
    a = AgentProc("leaver", "127.0.0.1", tmp_path, dev=True, log_level="info")
    a.start()
    try:
        a.wait_ready()
        response = http.put(f"{a.http_base}/v1/agent/leave", timeout=30)
        assert response.status_code == 200, response.text
        _conforms("PUT /v1/agent/leave", response)
        assert a.stop(sig=None, timeout=15) == 0  # it exits by itself after answering
    finally:
        a.stop(signal.SIGKILL)


# ----- agent bugs the fuzzer found, one request each: fixed, kept as regression tests -----

_SERVICE = "/v1/agent/service/register"
#: (id, method, path, raw body, what Consul answers, the service to deregister afterwards)
BUG_REPROS: list[tuple[str, str, str, bytes, int, str, str]] = [
    ("kv-key-with-newline", "PUT", "/v1/kv/bug1%0Akey", b"v", 200, "", _UNROUTABLE),
    ("service-meta-not-an-object", "PUT", _SERVICE, b'{"Name": "b2a", "Meta": "ab"}', 400,
     "b2a", _SERVICE_REGISTER),
    ("service-checks-not-a-list", "PUT", _SERVICE, b'{"Name": "b2b", "Checks": 5}', 400, "b2b",
     _SERVICE_REGISTER),
    ("service-meta-value-not-a-string", "PUT", _SERVICE, b'{"Name": "b2c", "Meta": {"k": 1}}',
     400, "b2c", _SERVICE_REGISTER),
    ("service-weights-passing-0", "PUT", _SERVICE,
     b'{"Name": "b2d", "Weights": {"Passing": 0, "Warning": 1}}', 400, "b2d", _SERVICE_REGISTER),
    ("service-proxy-not-an-object", "PUT", _SERVICE, b'{"Name": "b2e", "Proxy": 5}', 400, "b2e",
     _SERVICE_REGISTER),
    ("snapshot-corrupt-deflate-stream", "PUT", "/v1/snapshot",
     b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03garbage", 400, "", _CORRUPT_SNAPSHOT),
    ("session-lockdelay-overflows", "PUT", "/v1/session/create", b'{"LockDelay": 1e999}', 400,
     "", _FLOAT_OVERFLOW),
    ("txn-flags-overflow", "PUT", "/v1/txn",
     b'[{"KV": {"Verb": "set", "Key": "bug5", "Flags": 1e999}}]', 400, "", _FLOAT_OVERFLOW),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "want", "service"),
    [pytest.param(m, p, b, want, svc, id=i) for i, m, p, b, want, svc, _ in BUG_REPROS],
)  # fmt: skip
def test_known_bug_is_fixed(agent: AgentProc, http: requests.Session, method: str, path: str,
                            body: bytes, want: int, service: str) -> None:  # fmt: skip
    try:
        response = http.request(method, agent.http_base + path, data=body, timeout=10)
    finally:
        if service:  # a wrongly accepted registration would stop anti-entropy for the others
            http.put(f"{agent.http_base}/v1/agent/service/deregister/{service}", timeout=10)
    assert response.status_code == want, f"{response.status_code} {response.text}"


def test_keyring_list_answers_once_every_member_has(
    agent: AgentProc, http: requests.Session
) -> None:
    start = time.monotonic()
    response = http.get(f"{agent.http_base}/v1/operator/keyring", timeout=30)
    elapsed = time.monotonic() - start
    _conforms("GET /v1/operator/keyring", response)
    assert response.json()[0]["NumNodes"] == 1
    assert elapsed < 1.0, f"a one-member keyring list took {elapsed:.2f}s"


def test_check_interval_is_at_least_one_second(agent: AgentProc, http: requests.Session) -> None:
    """A TCP check with Interval 10ms against a listener here: Consul probes once a second."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    listener.settimeout(0.05)
    port = listener.getsockname()[1]
    check = {"ID": "fast-probe", "Name": "fast probe", "TCP": f"127.0.0.1:{port}",
             "Interval": "10ms"}  # fmt: skip
    accepted = 0
    try:
        assert http.put(f"{agent.http_base}/v1/agent/check/register", json=check,
                        timeout=10).status_code == 200  # fmt: skip
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.close()
            accepted += 1
    finally:
        http.put(f"{agent.http_base}/v1/agent/check/deregister/fast-probe", timeout=10)
        listener.close()
    assert accepted <= 3, f"{accepted} probes in 1.5 s"

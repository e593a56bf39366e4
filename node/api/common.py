"""What every HTTP handler shares: the agent accessor, Consul-style responses and errors,
query parameters (datacenter, consistency, blocking) and the query-meta headers."""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from node.config import parse_duration
from node.raft.runtime import NoLeader, WriteTimeout
from node.raft.transport import RPCError
from node.state import ApplyResult

if TYPE_CHECKING:
    from node.agent import Agent
    from node.consensus import Consensus

__all__ = [
    "AGENT_KEY",
    "DEFAULT_QUERY_TIME",
    "JITTER_FRACTION",
    "MAX_QUERY_TIME",
    "Handler",
    "agent_of",
    "blocking_deadline",
    "blocking_params",
    "blocking_read",
    "check_dc",
    "consensus_of",
    "consistency_mode",
    "decode_json",
    "flag",
    "json_response",
    "propose",
    "set_query_meta",
    "text_error",
    "write_command",
]

AGENT_KEY: web.AppKey[Agent] = web.AppKey("agent")
#: Consul caps blocking queries at 10 minutes and defaults to 5 when only ?index is given.
MAX_QUERY_TIME = 600.0
DEFAULT_QUERY_TIME = 300.0
#: Consul's JitterFraction: a blocking wait gets a random extra of up to wait/16
JITTER_FRACTION = 16
WRITE_TIMEOUT = 10.0
MAX_U64 = 2**64 - 1
_DECIMAL = re.compile(r"[0-9]+")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def agent_of(request: web.Request) -> Agent:
    return request.app[AGENT_KEY]


def consensus_of(request: web.Request) -> Consensus:
    consensus = agent_of(request).consensus
    if consensus is None:
        raise web.HTTPInternalServerError(text="this agent runs without the replicated state")
    return consensus


def json_response(request: web.Request, data: Any, status: int = 200) -> web.Response:
    """JSON like Consul: compact, indented with ?pretty."""
    indent = 4 if "pretty" in request.query else None
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, indent=indent))


def text_error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain")


def _no_constant(token: str) -> Any:
    """Go's decoder has no NaN or Infinity: the tokens Python's json takes are refused, as
    Consul does, in its words."""
    where = "in numeric literal" if token.startswith("-") else "looking for beginning of value"
    raise ValueError(f"invalid character {token.lstrip('-')[0]!r} {where}")


def _finite_float(text: str) -> float:
    """A number past float64 (1e999) is an error in Go, not an infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"cannot unmarshal number {text} into a float64")
    return value


def decode_json(raw: bytes) -> Any:
    """A request body as Go's encoding/json reads it (None when empty); ValueError otherwise."""
    if not raw.strip():
        return None
    return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)


def flag(request: web.Request, name: str) -> bool:
    """Consul's flag parameters count by presence: ?recurse, ?recurse=, ?recurse=true."""
    return name in request.query


def check_dc(request: web.Request) -> web.Response | None:
    dc = request.query.get("dc")
    if dc and dc != agent_of(request).config.datacenter:
        return text_error(500, "No path to datacenter")
    return None


def consistency_mode(request: web.Request) -> str | web.Response:
    stale, consistent = flag(request, "stale"), flag(request, "consistent")
    if stale and consistent:
        return text_error(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
    return "stale" if stale else "consistent" if consistent else "default"


def blocking_params(request: web.Request) -> tuple[int, float] | web.Response:
    """(?index=, ?wait= in seconds) as Consul's parseWait reads them: an empty value is no
    value, the index is a decimal uint64, the wait a Go duration (a sign is allowed, and zero
    or less means the default). A blocking query (an index, or a ?hash=) waits 5 minutes by
    default and at most 10; `wait` without either does not block (the caller checks index)."""
    q = request.query
    index = 0
    raw_index = q.get("index", "")
    if raw_index:
        if not _DECIMAL.fullmatch(raw_index) or int(raw_index) > MAX_U64:
            return text_error(400, "Invalid index")
        index = int(raw_index)
    wait = 0.0
    raw_wait = q.get("wait", "")
    if raw_wait:
        sign = raw_wait[0] if raw_wait[0] in "+-" else ""
        try:
            wait = parse_duration(raw_wait[len(sign) :])
        except ValueError:
            return text_error(400, "Invalid wait time")
        if sign == "-":
            wait = 0.0
    if (index or q.get("hash")) and wait <= 0:  # ?hash=: a hash-based blocking query
        wait = DEFAULT_QUERY_TIME
    return index, min(wait, MAX_QUERY_TIME)


def set_query_meta(resp: web.StreamResponse, consensus: Consensus, index: int) -> None:
    """X-Consul-Index (never 0, as Consul forces), KnownLeader and LastContact."""
    resp.headers["X-Consul-Index"] = str(max(1, index))
    resp.headers["X-Consul-KnownLeader"] = "true" if consensus.known_leader() else "false"
    resp.headers["X-Consul-LastContact"] = str(consensus.last_contact_ms())


def blocking_deadline(wait: float) -> float:
    """When a blocking query of `wait` seconds answers (event-loop time): Consul adds up to
    wait/16 of jitter so that watchers of the same change do not all come back at once."""
    jitter = random.uniform(0, wait / JITTER_FRACTION) if wait else 0.0
    return asyncio.get_running_loop().time() + wait + jitter


async def blocking_read(
    request: web.Request,
    tables: Iterable[str],
    run: Callable[[], tuple[int, web.StreamResponse]],
) -> web.StreamResponse:
    """A read in the request's consistency mode, blocking while ?index= is current.

    `run` reads the local store and returns (index, response). Like Consul, the wait gets up to
    wait/16 of jitter so that many watchers do not return at once.
    """
    if (err := check_dc(request)) is not None:
        return err
    mode = consistency_mode(request)
    if isinstance(mode, web.Response):
        return mode
    params = blocking_params(request)
    if isinstance(params, web.Response):
        return params
    min_index, wait = params
    consensus = consensus_of(request)
    loop = asyncio.get_running_loop()
    deadline = blocking_deadline(wait)
    names = list(tables)
    restores = consensus.store.watch.restores
    while True:
        try:
            await consensus.read_barrier(mode)
        except NoLeader:
            return text_error(500, "No cluster leader")
        index, resp = run()
        remaining = deadline - loop.time()
        restored = consensus.store.watch.restores != restores  # the index may even go back
        if not min_index or index > min_index or remaining <= 0 or restored:
            set_query_meta(resp, consensus, index)
            return resp
        # wait for a write after what this read saw (a write elsewhere in the tables wakes
        # us without moving this result's index: then we wait again)
        store = consensus.store
        await store.watch.wait(names, max(min_index, store.table_index(names)), remaining)


async def propose(request: web.Request, command: bytes) -> ApplyResult | web.Response:
    """Replicate a command: the state machine's result, or the error response Consul gives
    when there is none (no leader, outcome unknown)."""
    try:
        return await consensus_of(request).write(command, WRITE_TIMEOUT)
    except NoLeader:
        return text_error(500, "No cluster leader")
    except WriteTimeout as e:
        return text_error(500, f"timed out waiting for the write to be applied ({e}); "
                               "it may still be applied")  # fmt: skip
    except RPCError as e:
        return text_error(500, str(e))


async def write_command(request: web.Request, command: bytes) -> Any:
    """Propose a command: its result's value, or the error response Consul would give (a
    web.Response, which the caller returns as is)."""
    result = await propose(request, command)
    if isinstance(result, web.Response):
        return result
    if result.ok:
        return result.value
    status = {"too_large": 413, "invalid": 400}.get(result.kind or "", 500)
    return text_error(status, result.error or "write rejected")

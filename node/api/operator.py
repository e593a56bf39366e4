"""Raft status and operator endpoints in Consul's shapes: /v1/status/leader|peers,
/v1/operator/raft/configuration|peer|transfer-leader, and /v1/snapshot (save and restore)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import time
import zlib
from typing import Any

from aiohttp import web

from node.api.common import (
    Handler,
    check_dc,
    consensus_of,
    consistency_mode,
    json_response,
    set_query_meta,
    text_error,
    write_command,
)
from node.raft.runtime import NoLeader
from node.raft.transport import RPCError
from node.state import commands as cmd

__all__ = ["ROUTES", "SnapshotError", "pack_snapshot", "unpack_snapshot"]

RAFT_PROTOCOL = "3"
#: a restore body can be much larger than a KV value
MAX_SNAPSHOT_SIZE = 256 * 1024 * 1024


async def status_leader(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    return json_response(request, consensus_of(request).leader_address())


async def status_peers(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    config = consensus_of(request).configuration()
    return json_response(request, sorted(s.address for s in config.servers.values() if s.voter))


async def _barrier(request: web.Request) -> web.Response | None:
    if (err := check_dc(request)) is not None:
        return err
    mode = consistency_mode(request)
    if isinstance(mode, web.Response):
        return mode
    try:
        await consensus_of(request).read_barrier(mode)
    except NoLeader:
        return text_error(500, "No cluster leader")
    return None


async def raft_configuration(request: web.Request) -> web.StreamResponse:
    if (err := await _barrier(request)) is not None:
        return err
    consensus = consensus_of(request)
    raft = consensus.raft
    assert raft is not None and raft.node is not None
    config = consensus.configuration()
    match = raft.node.match_indexes()
    servers = [
        {
            "ID": s.id,
            "Node": s.node,
            "Address": s.address,
            "Leader": s.id == raft.leader_id,
            "ProtocolVersion": RAFT_PROTOCOL,
            "Voter": s.voter,
            "LastIndex": consensus.last_index() if s.id == raft.node_id else match.get(s.id, 0),
        }
        for s in sorted(config.servers.values(), key=lambda s: s.node)
    ]
    # Consul's body Index is always 0 (hashicorp/raft's GetConfiguration never sets it, and
    # py-consul's suite asserts it); the header carries the configuration's log index.
    resp = json_response(request, {"Servers": servers, "Index": 0})
    set_query_meta(resp, consensus, consensus.configuration_index())
    return resp


async def raft_remove_peer(request: web.Request) -> web.StreamResponse:
    consensus = consensus_of(request)
    q = request.query
    if ("id" in q) == ("address" in q):
        return text_error(400, "Must specify either ?id with the server's ID or ?address with "
                               "IP:port of peer to remove")  # fmt: skip
    config = consensus.configuration()
    if "id" in q:
        target = q["id"]
        found = target in config.servers
    else:
        by_address = {s.address: s.id for s in config.servers.values()}
        found = q["address"] in by_address
        target = by_address.get(q["address"], q["address"])
    if not found:
        what = f"id {target!r}" if "id" in q else f"address {target!r}"
        return text_error(500, f"{what} was not found in the Raft configuration")
    try:
        await consensus.remove_peer(target)
    except ValueError as e:
        return text_error(400, str(e))
    except (NoLeader, RPCError) as e:
        return text_error(500, str(e))
    return web.Response(status=200)


async def raft_transfer_leader(request: web.Request) -> web.StreamResponse:
    consensus = consensus_of(request)
    try:
        new = await consensus.transfer_leader(request.query.get("id", ""))
    except (NoLeader, RPCError) as e:
        return text_error(500, str(e))
    return json_response(request, {"Success": True, "NewLeader": new})


# ----- snapshots -----


class SnapshotError(ValueError):
    pass


def pack_snapshot(state: bytes, index: int, term: int) -> bytes:
    """Consul's archive layout: meta.json, state.bin, SHA256SUMS in a gzipped tar."""
    meta = json.dumps(
        {"ID": f"{term}-{index}-{int(time.time() * 1000)}", "Size": len(state), "Index": index,
         "Term": term, "Version": 1, "Format": "meshnode-state-msgpack"}
    ).encode()  # fmt: skip
    files = {"meta.json": meta, "state.bin": state}
    sums = "".join(f"{hashlib.sha256(b).hexdigest()}  {n}\n" for n, b in files.items())
    files["SHA256SUMS"] = sums.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = int(time.time())
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack_snapshot(archive: bytes) -> tuple[dict[str, Any], bytes]:
    """(meta, state bytes); SnapshotError when the archive is damaged or not a snapshot."""
    try:
        files: dict[str, bytes] = {}
        tar_bytes = gzip.decompress(archive)  # checks the gzip CRC and length: no truncation
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tar:
            for member in tar.getmembers():
                f = tar.extractfile(member) if member.isfile() else None
                if f is not None:
                    files[member.name] = f.read()
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, OSError, zlib.error) as e:
        raise SnapshotError(f"not a snapshot archive: {e}") from None
    for name in ("meta.json", "state.bin", "SHA256SUMS"):
        if name not in files:
            raise SnapshotError(f"snapshot archive has no {name}")
    sums: dict[str, str] = {}
    for line in files["SHA256SUMS"].decode(errors="replace").splitlines():
        digest, _, name = line.partition("  ")
        sums[name] = digest
    for name in ("meta.json", "state.bin"):
        if sums.get(name) != hashlib.sha256(files[name]).hexdigest():
            raise SnapshotError(f"snapshot archive is corrupt: checksum mismatch for {name}")
    try:
        meta = json.loads(files["meta.json"])
    except ValueError as e:
        raise SnapshotError(f"bad meta.json: {e}") from None
    return meta, files["state.bin"]


async def snapshot_save(request: web.Request) -> web.StreamResponse:
    if (err := await _barrier(request)) is not None:
        return err
    consensus = consensus_of(request)
    raft = consensus.raft
    assert raft is not None and raft.node is not None
    store = consensus.store
    index = store.index
    term = raft.node.term_at(index) or raft.node.term
    body = pack_snapshot(store.snapshot(), index, term)
    resp = web.Response(body=body, content_type="application/x-gzip")
    set_query_meta(resp, consensus, index)
    return resp


async def snapshot_restore(request: web.Request) -> web.StreamResponse:
    if (err := check_dc(request)) is not None:
        return err
    size = request.content_length
    if size is not None and size > MAX_SNAPSHOT_SIZE:
        return text_error(413, f"snapshot of {size} bytes exceeds {MAX_SNAPSHOT_SIZE} bytes")
    try:
        _, state = unpack_snapshot(await request.read())
    except SnapshotError as e:
        return text_error(400, str(e))
    result = await write_command(request, cmd.state_restore(state))
    if isinstance(result, web.Response):
        return result
    return web.Response(status=200)


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/v1/status/leader", status_leader),
    ("GET", "/v1/status/peers", status_peers),
    ("GET", "/v1/operator/raft/configuration", raft_configuration),
    ("DELETE", "/v1/operator/raft/peer", raft_remove_peer),
    ("POST", "/v1/operator/raft/transfer-leader", raft_transfer_leader),
    ("GET", "/v1/snapshot", snapshot_save),
    ("PUT", "/v1/snapshot", snapshot_restore),
]

"""Manual recovery of a cluster that lost quorum: `peers.json`, as in Consul.

When most voters are gone for good, no leader can be elected and the configuration cannot be
changed through the log. The operator stops the surviving agents, writes the same
`<data-dir>/raft/peers.json` on each of them, listing the servers that should form the cluster:

    [{"id": "<node id>", "address": "10.0.0.1:8300", "non_voter": false}, ...]

and starts them again. At start a node that finds the file applies its whole log to the state
machine, stores the result as a snapshot at its last index that carries the new configuration,
and renames the file to `peers.info` so that it is used once. As with Consul, entries that were
not yet committed are applied too: recovery can resurrect a write that was never acknowledged,
so keep it for when the alternative is losing the cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from node.raft.storage import RaftStorage
from node.raft.types import Configuration, EntryType, HardState, Server, SnapshotMeta

__all__ = ["PEERS_FILE", "RecoveryError", "parse_peers", "recover"]

PEERS_FILE = "peers.json"


class RecoveryError(Exception):
    """peers.json is unusable; the message says what to fix."""


class _FSM(Protocol):
    def apply(self, index: int, data: bytes) -> Any: ...
    def apply_noop(self, index: int) -> None: ...
    def snapshot(self) -> bytes: ...
    def restore(self, data: bytes) -> None: ...


def parse_peers(text: str) -> Configuration:
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise RecoveryError(f"{PEERS_FILE} is not valid JSON: {e}") from None
    if not isinstance(raw, list) or not raw:
        raise RecoveryError(f"{PEERS_FILE} must be a non-empty JSON list of servers")
    servers: dict[str, Server] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RecoveryError(f"{PEERS_FILE}[{i}] must be an object with id and address")
        sid, address = item.get("id"), item.get("address")
        if not isinstance(sid, str) or not sid:
            raise RecoveryError(f"{PEERS_FILE}[{i}]: missing id")
        if not isinstance(address, str) or address.rpartition(":")[2].isdigit() is False:
            raise RecoveryError(f"{PEERS_FILE}[{i}]: address must be ip:port, got {address!r}")
        if sid in servers:
            raise RecoveryError(f"{PEERS_FILE}[{i}]: duplicate id {sid!r}")
        node = item.get("node") if isinstance(item.get("node"), str) else address
        servers[sid] = Server(sid, str(node), address, not bool(item.get("non_voter", False)))
    config = Configuration(servers)
    if not config.voters:
        raise RecoveryError(f"{PEERS_FILE} names no voter")
    return config


def recover(data_dir: Path, storage: RaftStorage, fsm: _FSM) -> Configuration | None:
    """Apply peers.json if present (see the module docstring); None when there is none."""
    path = data_dir / PEERS_FILE
    if not path.exists():
        return None
    config = parse_peers(path.read_text())
    last = storage.last_index
    if last == 0:
        raise RecoveryError(f"{PEERS_FILE}: this node holds no Raft data to recover")
    snap = storage.load_snapshot()
    if snap is not None:
        fsm.restore(snap[1])
    for e in storage.entries:
        if e.type == EntryType.NORMAL:
            fsm.apply(e.index, e.data)
        else:
            fsm.apply_noop(e.index)
    term = storage.term(last)
    storage.compact(SnapshotMeta(last, term, config), fsm.snapshot())
    hs = storage.hard_state
    storage.save(HardState(hs.term, hs.vote, last), [])
    path.rename(path.with_name("peers.info"))
    return config

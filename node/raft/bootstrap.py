"""`--bootstrap-expect N`: form exactly one Raft cluster out of the first N members.

Every pristine node started with the same N watches gossip. Once it sees N alive members
carrying `expect=N`, the one with the lowest node ID among the N lowest IDs coordinates, in two
phases over server RPC:

1. *promise*: each of the N members promises the proposed configuration, refusing when it already
   has Raft state or promised a different configuration (a promise is on disk and lapses after
   PROMISE_TTL, so a coordinator that died does not block forever);
2. *commit*: only when all N promised, each writes the bootstrap entry (index 1, term 1).

Two nodes that saw different member sets propose different configurations. Because a promise is
exclusive and on disk, at most one of any two overlapping proposals can gather all its promises,
so no two nodes ever write different entries at index 1 of the same log.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from node.raft.types import Configuration, Server

__all__ = ["Candidate", "PromiseStore", "bootstrap_set", "coordinator"]

PROMISE_TTL = 30.0


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str
    node: str
    address: str  # ip:server-port
    expect: int
    has_state: bool = False  # the member says (in its tags) it already holds Raft state


def bootstrap_set(candidates: Iterable[Candidate], expect: int) -> Configuration | None:
    """The configuration to bootstrap, or None while fewer than `expect` pristine members with
    the same expectation are visible (or any visible member already belongs to a cluster)."""
    same = [c for c in candidates if c.expect == expect]
    if expect <= 0 or any(c.has_state for c in same) or len(same) < expect:
        return None
    chosen = sorted(same, key=lambda c: c.id)[:expect]
    return Configuration({c.id: Server(c.id, c.node, c.address, True) for c in chosen})


def coordinator(config: Configuration) -> str:
    return min(config.servers)


def config_key(config: Configuration) -> str:
    return json.dumps(config.to_wire())


class PromiseStore:
    """At most one promised bootstrap configuration, kept in a file so a restart keeps it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _load(self) -> tuple[str, float] | None:
        try:
            data = json.loads(self.path.read_text())
            return str(data["config"]), float(data["until"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def promise(self, config: Configuration, now: float) -> bool:
        key = config_key(config)
        held = self._load()
        if held is not None and held[0] != key and now < held[1]:
            return False
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"config": key, "until": now + PROMISE_TTL}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return True

    def holds(self, config: Configuration, now: float) -> bool:
        held = self._load()
        return held is not None and held[0] == config_key(config) and now < held[1]

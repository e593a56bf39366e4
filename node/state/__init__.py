"""The replicated state machine (KV, catalog, sessions, generic tables) that Raft applies."""

from node.golang import parse_duration
from node.state.commands import Command, CommandError
from node.state.kv import KVEntry
from node.state.sessions import SessionJSON
from node.state.store import ApplyResult, StateStore
from node.state.watch import Watch

__all__ = [
    "ApplyResult",
    "Command",
    "CommandError",
    "KVEntry",
    "SessionJSON",
    "StateStore",
    "Watch",
    "parse_duration",
]

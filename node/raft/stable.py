"""Raft's HardState (term, vote, commit) in one small file, replaced atomically.

Term and vote must be on disk before any message that depends on them leaves the node (a
forgotten vote lets a node vote twice in a term), so a change to either is written durably:
tmp file + fsync + rename + fsync of the directory.

The commit index is different: Raft treats it as volatile (a restarted node re-learns it from
the leader), and it changes on nearly every Ready. Paying two extra fsyncs per batch for it
would halve throughput, so a commit-only change is written durably at most once per
``commit_sync_interval`` seconds (and on close); after a crash the recovered commit may lag,
never lead.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import msgpack

from node.raft.log import RaftStorageError, fsync_dir
from node.raft.types import HardState

__all__ = ["StableStore"]

_MAGIC = b"MNHS"
_HDR = struct.Struct("<4sI")
_VERSION = 1


class StableStore:
    """The ``stable`` file of a Raft data directory."""

    FILENAME = "stable"

    def __init__(
        self,
        directory: Path,
        hard_state: HardState,
        commit_sync_interval: float,
        clock: Callable[[], float],
    ) -> None:
        self._dir = directory
        self._path = directory / self.FILENAME
        self._tmp = directory / (self.FILENAME + ".tmp")
        self._state = hard_state
        self._durable = hard_state
        self._interval = commit_sync_interval
        self._clock = clock
        self._last_write = clock()
        self.writes = 0  # durable file replacements, for tests and metrics

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        commit_sync_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> StableStore:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / cls.FILENAME
        (directory / (cls.FILENAME + ".tmp")).unlink(missing_ok=True)
        hs = HardState()
        if path.exists():
            hs = _decode(path, path.read_bytes())
        return cls(directory, hs, commit_sync_interval, clock)

    @property
    def hard_state(self) -> HardState:
        """The newest state handed to save() (its commit may not be on disk yet)."""
        return self._state

    def save(self, hs: HardState) -> None:
        """Record ``hs``; durable on return if term or vote changed."""
        self._state = hs
        if hs == self._durable:
            return
        vote_changed = hs.term != self._durable.term or hs.vote != self._durable.vote
        if vote_changed or self._clock() - self._last_write >= self._interval:
            self._write(hs)

    def flush(self) -> None:
        """Make the newest commit index durable too."""
        if self._state != self._durable:
            self._write(self._state)

    def _write(self, hs: HardState) -> None:
        payload = msgpack.packb([_VERSION, *hs.to_wire()])
        data = _HDR.pack(_MAGIC, zlib.crc32(payload)) + payload
        fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self._tmp, self._path)
        fsync_dir(self._dir)
        self._durable = hs
        self._last_write = self._clock()
        self.writes += 1


def _decode(path: Path, data: bytes) -> HardState:
    """Parse the file; any damage is fatal because the file is only ever replaced whole."""
    try:
        magic, crc = _HDR.unpack_from(data, 0)
        payload = data[_HDR.size :]
        if magic != _MAGIC or zlib.crc32(payload) != crc:
            raise ValueError("bad magic or CRC")
        obj = msgpack.unpackb(payload)
        if not isinstance(obj, list) or len(obj) != 4 or obj[0] != _VERSION:
            raise ValueError("unknown format")
        return HardState.from_wire(obj[1:])
    except Exception as exc:
        raise RaftStorageError(f"raft hard state {path}: corrupt: {exc}") from None

"""RaftStorage: the durable state of one Raft node under its data directory.

Layout: ``<dir>/stable`` (HardState), ``<dir>/log/<first-index>.seg`` (entries) and
``<dir>/snapshots/<term>-<index>.snap``. The runtime persists each Ready with one save() call;
it returns only once everything in it is on disk.

Compaction keeps the entries after the *older* of the two retained snapshots, so that falling
back to it (when the newest is damaged) still finds every entry after it in the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from node.raft.log import DEFAULT_SEGMENT_SIZE, RaftStorageError, SegmentedLog
from node.raft.snapshots import SnapshotStore
from node.raft.stable import StableStore
from node.raft.types import Entry, HardState, SnapshotMeta

__all__ = ["RaftStorage", "RaftStorageError"]


class RaftStorage:
    """Blocking facade over the log, the hard state and the snapshots (one thread at a time)."""

    def __init__(
        self,
        directory: Path,
        log: SegmentedLog,
        stable: StableStore,
        snapshots: SnapshotStore,
        snapshot_meta: SnapshotMeta,
    ) -> None:
        self.directory = directory
        self._log = log
        self._stable = stable
        self._snapshots = snapshots
        self._snapshot_meta = snapshot_meta

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        commit_sync_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> RaftStorage:
        """Create or recover; RaftStorageError if what is on disk cannot be trusted."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        stable = StableStore.open(directory, commit_sync_interval=commit_sync_interval, clock=clock)
        snapshots = SnapshotStore.open(directory / "snapshots")
        meta = snapshots.latest or SnapshotMeta()
        log = SegmentedLog.open(
            directory / "log", snapshot_index=meta.index, segment_size=segment_size
        )
        self = cls(directory, log, stable, snapshots, meta)
        if meta.index > 0 and not self._log_matches(meta):
            # An install that died between writing the snapshot and resetting the log.
            log.reset(meta.index + 1)
        return self

    # ---- views -------------------------------------------------------------------------

    @property
    def hard_state(self) -> HardState:
        return self._stable.hard_state

    @property
    def snapshot_meta(self) -> SnapshotMeta:
        return self._snapshot_meta

    @property
    def entries(self) -> list[Entry]:
        """Every entry after the snapshot, read from disk (meant for startup)."""
        return self._log.read(self.first_index, self.last_index + 1)

    @property
    def first_index(self) -> int:
        """The first entry after the snapshot (may be last_index + 1: nothing there)."""
        return self._snapshot_meta.index + 1

    @property
    def last_index(self) -> int:
        return max(self._log.last_index, self._snapshot_meta.index)

    def term(self, index: int) -> int:
        """Term of the entry at ``index`` (the snapshot's own index included)."""
        if index == self._snapshot_meta.index:
            return self._snapshot_meta.term
        if index < self.first_index:
            raise IndexError(f"index {index} is compacted (snapshot {self._snapshot_meta.index})")
        return self._log.term(index)

    def read(self, lo: int, hi: int) -> list[Entry]:
        """Entries lo..hi-1 after the snapshot."""
        return self._log.read(max(lo, self.first_index), hi)

    # ---- writing -----------------------------------------------------------------------

    def save(
        self,
        hard_state: HardState | None,
        entries: Sequence[Entry],
        snapshot: tuple[SnapshotMeta, bytes] | None = None,
    ) -> None:
        """Persist one Ready: snapshot, then entries (truncating a conflict), then hard state."""
        if snapshot is not None:
            self._install(*snapshot)
        if entries:
            first = entries[0].index
            if first <= self._snapshot_meta.index:
                raise ValueError(
                    f"entries from {first} overlap the snapshot at {self._snapshot_meta.index}"
                )
            if first > self.last_index + 1:
                raise ValueError(f"entries from {first} leave a gap after {self.last_index}")
            self._log.append(entries)
        if hard_state is not None:
            self._stable.save(hard_state)

    def load_snapshot(self) -> tuple[SnapshotMeta, bytes] | None:
        return self._snapshots.load()

    def compact(self, meta: SnapshotMeta, data: bytes) -> None:
        """The FSM snapshotted at meta.index: store it and drop log segments it covers."""
        self._install(meta, data)

    def close(self) -> None:
        self._stable.flush()
        self._log.close()

    # ---- internals ---------------------------------------------------------------------

    def _log_matches(self, meta: SnapshotMeta) -> bool:
        log = self._log
        if log.first_index == meta.index + 1:
            return True  # the log starts right after the snapshot
        return log.first_index <= meta.index <= log.last_index and log.term(meta.index) == (
            meta.term
        )

    def _install(self, meta: SnapshotMeta, data: bytes) -> None:
        if meta.index < self._snapshot_meta.index:
            raise ValueError(
                f"snapshot at {meta.index} is older than the current {self._snapshot_meta.index}"
            )
        self._snapshots.save(meta, data)
        if self._log_matches(meta):
            # Raft 7: the log agrees with the snapshot; keep the entries after it.
            retained = self._snapshots.retained
            self._log.compact(retained[0].index + 1)
        else:
            self._log.reset(meta.index + 1)
        self._snapshot_meta = meta

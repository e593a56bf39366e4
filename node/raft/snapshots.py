"""Snapshot files: ``<term>-<index>.snap`` holding SnapshotMeta, the FSM bytes and a CRC.

The last two are kept so a damaged newest snapshot can fall back to the previous one (the log
keeps the entries after the older one for exactly that reason, see storage.py). A damaged file
is renamed to ``*.corrupt`` rather than deleted: it is evidence, and it must not count towards
the two that are kept.

File = magic + u32 meta length + u64 data length + msgpack(meta) + data + u32 CRC32 of all
that precedes it.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

import msgpack
import structlog

from node.raft.log import RaftStorageError, fsync_dir
from node.raft.types import SnapshotMeta

__all__ = ["KEEP", "SnapshotStore"]

log = structlog.get_logger("node.raft.snapshots")

KEEP = 2
_MAGIC = b"MNSNAP01"
_HDR = struct.Struct("<8sIQ")
_CRC = struct.Struct("<I")
_NAME_RE = re.compile(r"^(\d+)-(\d+)\.snap$")


def _name(meta: SnapshotMeta) -> str:
    return f"{meta.term:020d}-{meta.index:020d}.snap"


def _read(path: Path) -> tuple[SnapshotMeta, bytes]:
    """Parse and verify one snapshot file; ValueError on any damage."""
    buf = path.read_bytes()
    if len(buf) < _HDR.size + _CRC.size:
        raise ValueError("truncated")
    magic, meta_len, data_len = _HDR.unpack_from(buf, 0)
    if magic != _MAGIC:
        raise ValueError("bad magic")
    body_end = _HDR.size + meta_len + data_len
    if body_end + _CRC.size != len(buf):
        raise ValueError("length mismatch")
    (crc,) = _CRC.unpack_from(buf, body_end)
    if zlib.crc32(memoryview(buf)[:body_end]) != crc:
        raise ValueError("crc mismatch")
    meta = SnapshotMeta.from_wire(msgpack.unpackb(buf[_HDR.size : _HDR.size + meta_len]))
    m = _NAME_RE.match(path.name)
    if m is None or (int(m.group(1)), int(m.group(2))) != (meta.term, meta.index):
        raise ValueError("meta does not match the file name")
    return meta, buf[_HDR.size + meta_len : body_end]


class SnapshotStore:
    """The ``snapshots/`` directory of a Raft data directory."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._files: list[tuple[SnapshotMeta, Path]] = []  # oldest first, all verified

    @classmethod
    def open(cls, directory: Path) -> SnapshotStore:
        """Find the newest intact snapshot, setting aside damaged newer ones."""
        directory.mkdir(parents=True, exist_ok=True)
        self = cls(directory)
        found: list[tuple[int, int, Path]] = []
        for p in directory.iterdir():
            if p.name.endswith(".tmp"):
                p.unlink()
            elif (m := _NAME_RE.match(p.name)) is not None:
                found.append((int(m.group(2)), int(m.group(1)), p))
        found.sort()
        verified: list[tuple[SnapshotMeta, Path]] = []
        set_aside = False
        for _, _, path in reversed(found):
            try:
                meta, _data = _read(path)
            except Exception as exc:
                # Damage only matters while we still need this file; older extras are pruned.
                if len(verified) < KEEP:
                    path.rename(path.with_name(path.name + ".corrupt"))
                    set_aside = True
                    log.warning("raft.snapshot_corrupt", file=str(path), error=str(exc))
                continue
            verified.append((meta, path))
            if len(verified) == KEEP:
                break
        keep = {p for _, p in verified}
        kept_from = min((m.index for m, _ in verified), default=None)
        for index, _, path in found:  # leftovers of an interrupted prune
            if kept_from is not None and index < kept_from and path not in keep and path.exists():
                path.unlink()
                set_aside = True
        if set_aside:
            fsync_dir(directory)
        self._files = list(reversed(verified))
        return self

    @property
    def latest(self) -> SnapshotMeta | None:
        return self._files[-1][0] if self._files else None

    @property
    def retained(self) -> list[SnapshotMeta]:
        """The kept snapshots, oldest first."""
        return [m for m, _ in self._files]

    def load(self) -> tuple[SnapshotMeta, bytes] | None:
        """The newest snapshot; RaftStorageError if it was damaged after open."""
        if not self._files:
            return None
        path = self._files[-1][1]
        try:
            return _read(path)
        except Exception as exc:
            raise RaftStorageError(f"raft snapshot {path}: corrupt: {exc}") from None

    def save(self, meta: SnapshotMeta, data: bytes) -> None:
        """Write durably, then prune to the newest KEEP."""
        meta_bytes = msgpack.packb(meta.to_wire())
        head = _HDR.pack(_MAGIC, len(meta_bytes), len(data)) + meta_bytes
        crc = zlib.crc32(data, zlib.crc32(head))
        path = self._dir / _name(meta)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(data)
            f.write(_CRC.pack(crc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        files = [(m, p) for m, p in self._files if p != path]
        files.append((meta, path))
        files.sort(key=lambda mp: (mp[0].index, mp[0].term))
        for _, old in files[:-KEEP]:
            old.unlink(missing_ok=True)
        fsync_dir(self._dir)
        self._files = files[-KEEP:]

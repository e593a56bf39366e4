"""Raft's durable log: append-only segment files of CRC-framed records.

Record = u32 payload length + u32 CRC32(payload) + msgpack(Entry.to_wire()), little endian.
Segments are named by the index of their first entry (``<first:020d>.seg``) so recovery can
check index continuity across files without a manifest. A batch is written with one pwrite and
made durable with one fdatasync; a batch never spans segments (rollover happens between
batches), so only the newest segment can ever hold a torn write.

Recovery truncates a torn tail (short or bad record with nothing valid after it: the write that
was in flight when the process or machine died, never acknowledged) but refuses to open when a
bad record is followed by a valid one -- that is corruption of acknowledged data, and silently
dropping it could lose committed entries.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import zlib
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import structlog

from node.raft.types import Entry

__all__ = [
    "DEFAULT_SEGMENT_SIZE",
    "RaftStorageError",
    "SegmentedLog",
    "fsync_dir",
]

log = structlog.get_logger("node.raft.log")

DEFAULT_SEGMENT_SIZE = 64 * 1024 * 1024
_HDR = struct.Struct("<II")
_MAX_RECORD = 1 << 30  # a length above this can only be garbage
_SEG_RE = re.compile(r"^(\d{20})\.seg$")
_ARRAY_MARK = 0x94  # msgpack fixarray of 4: the first byte of every payload


class RaftStorageError(Exception):
    """The on-disk Raft state is unusable; the node must not start on it."""


def fsync_dir(path: Path) -> None:
    """Make creations, renames and unlinks in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(entries: Sequence[Entry], start: int) -> tuple[bytes, list[int]]:
    """Frame ``entries``; returns the bytes and each record's offset (``start`` based)."""
    packb = msgpack.packb
    crc32 = zlib.crc32
    pack_hdr = _HDR.pack
    parts: list[bytes] = []
    offsets: list[int] = []
    pos = start
    for e in entries:
        payload = packb([e.index, e.term, int(e.type), e.data])
        offsets.append(pos)
        parts.append(pack_hdr(len(payload), crc32(payload)))
        parts.append(payload)
        pos += 8 + len(payload)
    return b"".join(parts), offsets


def _decode(payload: bytes | memoryview) -> list[Any]:
    obj = msgpack.unpackb(payload)
    if not isinstance(obj, list) or len(obj) != 4:
        raise ValueError("not an entry")
    if not isinstance(obj[0], int) or not isinstance(obj[1], int):
        raise ValueError("bad index or term")
    return obj


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _Segment:
    """One segment file and the in-memory index of its records."""

    __slots__ = ("first", "offsets", "path", "size", "terms")

    def __init__(self, path: Path, first: int) -> None:
        self.path = path
        self.first = first
        self.offsets = array("q")  # offset of the record of entry first + k
        self.terms = array("q")
        self.size = 0  # end of the last valid record

    @property
    def last(self) -> int:
        return self.first + len(self.offsets) - 1

    def end_of(self, k: int) -> int:
        """Offset just past record k."""
        return self.offsets[k + 1] if k + 1 < len(self.offsets) else self.size


class SegmentedLog:
    """The physical log: entries first_index..last_index in consecutive segment files.

    Blocking; not thread-safe (the runtime drives it from one worker thread).
    """

    def __init__(self, directory: Path, segment_size: int) -> None:
        self._dir = directory
        self._segment_size = segment_size
        self._segments: list[_Segment] = []
        self._fd = -1  # the newest segment, open for writing

    # ---- opening and recovery ----------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        snapshot_index: int = 0,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
    ) -> SegmentedLog:
        """Recover the log in ``directory`` (created if missing).

        ``snapshot_index`` says which entries may legitimately be gone: segments holding only
        entries at or below it that are cut off from the rest (an interrupted compaction or
        reset) are deleted; any other gap is an error.
        """
        directory.mkdir(parents=True, exist_ok=True)
        self = cls(directory, segment_size)
        names = sorted(
            (int(m.group(1)), p)
            for p in directory.iterdir()
            if (m := _SEG_RE.match(p.name)) is not None
        )
        segs: list[_Segment] = []
        for i, (first, path) in enumerate(names):
            segs.append(self._scan(path, first, last_segment=i == len(names) - 1))
        # The live log is the longest run of contiguous segments ending with the newest.
        start = len(segs) - 1
        while start > 0 and segs[start - 1].last + 1 == segs[start].first:
            start -= 1
        stale, live = segs[: max(start, 0)], segs[max(start, 0) :]
        for seg in stale:
            if seg.last > snapshot_index:
                raise RaftStorageError(
                    f"raft log gap: {seg.path} ends at index {seg.last} but the next segment "
                    f"starts at {live[0].first} (snapshot index {snapshot_index})"
                )
        if live and live[0].first > snapshot_index + 1:
            raise RaftStorageError(
                f"raft log gap: {live[0].path} starts at index {live[0].first} but the "
                f"snapshot ends at {snapshot_index}"
            )
        if stale:
            for seg in stale:
                seg.path.unlink()
            fsync_dir(directory)
            log.warning(
                "raft.log_stale_segments_removed",
                segments=[s.path.name for s in stale],
                snapshot_index=snapshot_index,
            )
        self._segments = live
        if not live:
            self._new_segment(snapshot_index + 1)
            fsync_dir(directory)
        else:
            self._open_active()
        return self

    def _scan(self, path: Path, first: int, *, last_segment: bool) -> _Segment:
        seg = _Segment(path, first)
        buf = path.read_bytes()
        view = memoryview(buf)
        n = len(buf)
        pos = 0
        expected = first
        offsets: list[int] = []
        terms: list[int] = []
        reason = ""
        while pos < n:
            if n - pos < 8:
                reason = "short header"
                break
            length, crc = _HDR.unpack_from(buf, pos)
            end = pos + 8 + length
            if length == 0 or length > _MAX_RECORD or end > n:
                reason = f"bad length {length}"
                break
            payload = view[pos + 8 : end]
            if zlib.crc32(payload) != crc:
                reason = "crc mismatch"
                break
            try:
                obj = _decode(payload)
            except Exception as exc:
                raise RaftStorageError(
                    f"raft log {path}: offset {pos}: undecodable record with a valid CRC: {exc}"
                ) from None
            if obj[0] != expected:
                raise RaftStorageError(
                    f"raft log {path}: offset {pos}: index {obj[0]}, expected {expected}"
                )
            offsets.append(pos)
            terms.append(obj[1])
            expected += 1
            pos = end
        if pos < n:
            later = _find_valid_record(buf, pos + 1, expected)
            if not last_segment or later is not None:
                where = f"valid record at offset {later}" if later is not None else "more segments"
                raise RaftStorageError(
                    f"raft log {path}: corrupt record at offset {pos} ({reason}) followed by "
                    f"{where}; refusing to start"
                )
            with open(path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
            log.warning(
                "raft.log_torn_tail",
                file=str(path),
                offset=pos,
                dropped_bytes=n - pos,
                reason=reason,
                last_index=expected - 1,
            )
        seg.offsets.extend(offsets)
        seg.terms.extend(terms)
        seg.size = pos
        return seg

    # ---- views -------------------------------------------------------------------------

    @property
    def first_index(self) -> int:
        return self._segments[0].first

    @property
    def last_index(self) -> int:
        return self._segments[-1].last

    @property
    def segment_files(self) -> list[Path]:
        return [s.path for s in self._segments]

    def term(self, index: int) -> int:
        """The term of the entry at ``index``; IndexError outside first..last."""
        seg, k = self._locate(index)
        return seg.terms[k]

    def _locate(self, index: int) -> tuple[_Segment, int]:
        if not self.first_index <= index <= self.last_index:
            raise IndexError(f"index {index} outside {self.first_index}..{self.last_index}")
        lo, hi = 0, len(self._segments) - 1
        while lo < hi:  # the last segment whose first <= index
            mid = (lo + hi + 1) // 2
            if self._segments[mid].first <= index:
                lo = mid
            else:
                hi = mid - 1
        seg = self._segments[lo]
        return seg, index - seg.first

    def read(self, lo: int, hi: int) -> list[Entry]:
        """Entries lo..hi-1 (clamped to the log), CRC-checked again: disks rot after open."""
        lo = max(lo, self.first_index)
        hi = min(hi, self.last_index + 1)
        out: list[Entry] = []
        for seg in self._segments:
            a, b = max(lo, seg.first), min(hi, seg.last + 1)
            if a >= b:
                continue
            start = seg.offsets[a - seg.first]
            end = seg.end_of(b - 1 - seg.first)
            with open(seg.path, "rb") as f:
                f.seek(start)
                buf = f.read(end - start)
            pos = 0
            while pos < len(buf):
                length, crc = _HDR.unpack_from(buf, pos)
                payload = buf[pos + 8 : pos + 8 + length]
                if len(payload) != length or zlib.crc32(payload) != crc:
                    raise RaftStorageError(
                        f"raft log {seg.path}: corrupt record at offset {start + pos}"
                    )
                out.append(Entry.from_wire(_decode(payload)))
                pos += 8 + length
        return out

    # ---- writing -----------------------------------------------------------------------

    def append(self, entries: Sequence[Entry], *, sync: bool = True) -> None:
        """Write ``entries`` (consecutive), truncating a conflicting suffix first.

        Durable when it returns (one fdatasync, plus a directory fsync when files were created
        or removed).
        """
        if not entries:
            return
        first = entries[0].index
        for i, e in enumerate(entries):
            if e.index != first + i:
                raise ValueError(f"entries not consecutive at {e.index}")
        if first < self.first_index:
            raise ValueError(f"append at {first} below the log start {self.first_index}")
        if first > self.last_index + 1:
            raise ValueError(f"append at {first} leaves a gap after {self.last_index}")
        dir_dirty = False
        if first <= self.last_index:
            dir_dirty = self._truncate(first)
        seg = self._segments[-1]
        if seg.size >= self._segment_size and seg.offsets:
            self._new_segment(seg.last + 1)
            seg = self._segments[-1]
            dir_dirty = True
        data, offsets = _encode(entries, seg.size)
        try:
            _pwrite_all(self._fd, data, seg.size)
            if sync:
                os.fdatasync(self._fd)
        except OSError as exc:
            # After a failed fsync the page cache state is unknown (fsyncgate): stop here, but
            # leave no half-written records past the end for a later append to sit in front of.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, seg.size)
            raise RaftStorageError(f"raft log {seg.path}: write failed: {exc}") from exc
        seg.offsets.extend(offsets)
        seg.terms.extend(e.term for e in entries)
        seg.size += len(data)
        if dir_dirty and sync:
            fsync_dir(self._dir)

    def truncate_from(self, index: int) -> None:
        """Drop entries index..last, durably."""
        if index > self.last_index:
            return
        if index < self.first_index:
            raise ValueError(f"truncate at {index} below the log start {self.first_index}")
        dir_dirty = self._truncate(index)
        os.fdatasync(self._fd)
        if dir_dirty:
            fsync_dir(self._dir)

    def _truncate(self, index: int) -> bool:
        """Drop entries >= index without syncing; True if segment files were removed."""
        removed = False
        # Newest first: a crash part way leaves a contiguous prefix, never a hole.
        while len(self._segments) > 1 and self._segments[-1].first > index:
            seg = self._segments.pop()
            self._close_active()
            seg.path.unlink()
            removed = True
            self._open_active()
        seg, k = self._locate(index)
        new_size = seg.offsets[k]
        os.ftruncate(self._fd, new_size)
        del seg.offsets[k:]
        del seg.terms[k:]
        seg.size = new_size
        return removed

    def compact(self, keep_from: int) -> None:
        """Delete segments holding only entries below ``keep_from`` (never the newest)."""
        doomed: list[_Segment] = []
        while len(self._segments) > 1 and self._segments[1].first <= keep_from:
            doomed.append(self._segments.pop(0))
        # Oldest first: a crash part way leaves the log contiguous.
        for seg in doomed:
            seg.path.unlink()
        if doomed:
            fsync_dir(self._dir)

    def reset(self, next_index: int) -> None:
        """Discard everything; the next entry will be ``next_index`` (a snapshot install)."""
        self._close_active()
        for seg in reversed(self._segments):
            seg.path.unlink()
        self._segments = []
        # Removals durable before the new file exists, so recovery never sees them overlap.
        fsync_dir(self._dir)
        self._new_segment(next_index)
        fsync_dir(self._dir)

    def close(self) -> None:
        self._close_active()

    # ---- files -------------------------------------------------------------------------

    def _new_segment(self, first: int) -> None:
        self._close_active()
        path = self._dir / f"{first:020d}.seg"
        seg = _Segment(path, first)
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        self._fd = os.open(path, flags, 0o600)
        self._segments.append(seg)

    def _open_active(self) -> None:
        self._close_active()
        self._fd = os.open(self._segments[-1].path, os.O_RDWR | os.O_CLOEXEC)

    def _close_active(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def _find_valid_record(buf: bytes, start: int, min_index: int) -> int | None:
    """Offset of a plausible intact record at or after ``start``, or None.

    Used only after a bad record, to tell a torn tail (nothing valid follows) from corruption
    in the middle. Candidates are found by the msgpack array marker every payload starts with,
    so the scan is cheap; a CRC match on random bytes is a 2**-32 event.
    """
    n = len(buf)
    q = buf.find(bytes([_ARRAY_MARK]), start + 8)
    while q != -1:
        p = q - 8
        length, crc = _HDR.unpack_from(buf, p)
        if 0 < length <= n - q and zlib.crc32(buf[q : q + length]) == crc:
            try:
                obj = _decode(buf[q : q + length])
            except Exception:
                obj = None
            if obj is not None and obj[0] >= min_index:
                return p
        q = buf.find(bytes([_ARRAY_MARK]), q + 1)
    return None

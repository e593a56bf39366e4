"""RaftStorage: round trips, recovery from torn tails, refusal on corruption, snapshots,
compaction, a SIGKILL crash loop and a model-based property test."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.raft.log import SegmentedLog
from node.raft.storage import RaftStorage, RaftStorageError
from node.raft.types import Configuration, Entry, EntryType, HardState, Server, SnapshotMeta


def ents(first: int, last: int, term: int = 1) -> list[Entry]:
    return [
        Entry(i, term, EntryType.NORMAL, f"{i}:{term}".encode()) for i in range(first, last + 1)
    ]


def last_segment(d: Path) -> Path:
    return sorted((d / "log").glob("*.seg"))[-1]


def test_fresh_dir_is_empty(tmp_path: Path) -> None:
    st_ = RaftStorage.open(tmp_path / "raft")
    assert st_.hard_state == HardState()
    assert st_.snapshot_meta == SnapshotMeta()
    assert st_.entries == []
    assert st_.load_snapshot() is None
    assert (tmp_path / "raft" / "log").is_dir()
    st_.close()


def test_round_trip_and_restart(tmp_path: Path) -> None:
    s = RaftStorage.open(tmp_path, segment_size=300)
    batch = [Entry(1, 1, EntryType.CONFIG, b"cfg"), *ents(2, 40)]
    s.save(HardState(1, "a", 0), batch)
    s.save(HardState(1, "a", 30), ents(41, 50))
    assert s.entries == batch + ents(41, 50)
    assert len(list((tmp_path / "log").glob("*.seg"))) == 2  # rollover between batches
    s.close()
    r = RaftStorage.open(tmp_path, segment_size=300)
    assert r.hard_state == HardState(1, "a", 30)
    assert r.entries == batch + ents(41, 50)
    assert r.term(1) == 1 and r.last_index == 50
    assert r.read(10, 13) == ents(10, 12)
    r.close()


def test_vote_is_durable_without_close(tmp_path: Path) -> None:
    s = RaftStorage.open(tmp_path, commit_sync_interval=3600)
    s.save(HardState(3, "b", 0), ents(1, 3))
    s.save(HardState(3, "b", 2), [])  # commit only: deferred
    # no close(): a crash
    r = RaftStorage.open(tmp_path)
    assert (r.hard_state.term, r.hard_state.vote) == (3, "b")
    assert r.hard_state.commit == 0
    s.close()
    r2 = RaftStorage.open(tmp_path)
    assert r2.hard_state == HardState(3, "b", 2)


def test_commit_written_after_interval(tmp_path: Path) -> None:
    now = [0.0]
    s = RaftStorage.open(tmp_path, commit_sync_interval=1.0, clock=lambda: now[0])
    s.save(HardState(1, "", 0), ents(1, 5))
    s.save(HardState(1, "", 1), [])
    assert RaftStorage.open(tmp_path).hard_state.commit == 0
    now[0] = 1.5
    s.save(HardState(1, "", 4), [])
    assert RaftStorage.open(tmp_path).hard_state.commit == 4


@pytest.mark.parametrize("cut", [5, 13, 27, 33])
def test_truncate_conflicting_suffix_across_segments(tmp_path: Path, cut: int) -> None:
    s = RaftStorage.open(tmp_path, segment_size=200)
    for lo in range(1, 41, 4):
        s.save(None, ents(lo, lo + 3, term=1))
    nseg = len(list((tmp_path / "log").glob("*.seg")))
    assert nseg > 3
    s.save(HardState(2, "x", 0), ents(cut, cut + 2, term=2))
    want = ents(1, cut - 1, 1) + ents(cut, cut + 2, 2)
    assert s.entries == want
    s.save(None, ents(cut + 3, cut + 5, term=2))
    want += ents(cut + 3, cut + 5, 2)
    s.close()
    r = RaftStorage.open(tmp_path, segment_size=200)
    assert r.entries == want
    assert r.hard_state.term == 2


def test_gap_and_overlap_rejected(tmp_path: Path) -> None:
    s = RaftStorage.open(tmp_path)
    s.save(None, ents(1, 3))
    with pytest.raises(ValueError):
        s.save(None, ents(5, 6))
    with pytest.raises(ValueError):
        s.save(None, [Entry(4, 1), Entry(6, 1)])
    assert s.entries == ents(1, 3)


def _write_log(d: Path) -> list[int]:
    """Three batches; returns the byte size of the last segment after each."""
    s = RaftStorage.open(d)
    s.save(HardState(1, "a", 0), ents(1, 5))
    s.save(None, ents(6, 8))
    s.close()
    return [last_segment(d).stat().st_size]


def test_torn_tail_every_cut_point(tmp_path: Path) -> None:
    base = tmp_path / "base"
    _write_log(base)
    seg = last_segment(base)
    full = seg.read_bytes()
    # offset of the last record: rebuild via the log's index
    lg = SegmentedLog.open(base / "log")
    last_off = lg._segments[-1].offsets[-1]
    lg.close()
    for cut in range(last_off, len(full)):
        d = tmp_path / f"c{cut}"
        (d / "log").mkdir(parents=True)
        (d / "log" / seg.name).write_bytes(full[:cut])
        with structlog.testing.capture_logs() as logs:
            r = RaftStorage.open(d)
        assert r.entries == ents(1, 7), cut
        torn = [e for e in logs if e["event"] == "raft.log_torn_tail"]
        if cut > last_off:
            assert torn and torn[0]["dropped_bytes"] == cut - last_off
        else:
            assert not torn
        assert (d / "log" / seg.name).stat().st_size == last_off
        r.save(None, ents(8, 9, term=2))  # writable after recovery
        r.close()
        assert RaftStorage.open(d).entries == ents(1, 7) + ents(8, 9, 2)


def test_bit_flip_in_last_record_is_dropped(tmp_path: Path) -> None:
    _write_log(tmp_path)
    seg = last_segment(tmp_path)
    buf = bytearray(seg.read_bytes())
    buf[-2] ^= 0x10
    seg.write_bytes(bytes(buf))
    with structlog.testing.capture_logs() as logs:
        r = RaftStorage.open(tmp_path)
    assert r.entries == ents(1, 7)
    assert any(e["event"] == "raft.log_torn_tail" for e in logs)


@pytest.mark.parametrize("where", ["payload", "length", "crc"])
def test_bit_flip_in_middle_refuses(tmp_path: Path, where: str) -> None:
    _write_log(tmp_path)
    seg = last_segment(tmp_path)
    lg = SegmentedLog.open(tmp_path / "log")
    off = lg._segments[-1].offsets[3]  # entry 4 of 8
    lg.close()
    buf = bytearray(seg.read_bytes())
    pos = {"payload": off + 10, "length": off + 1, "crc": off + 5}[where]
    buf[pos] ^= 0x04
    seg.write_bytes(bytes(buf))
    with pytest.raises(RaftStorageError) as ei:
        RaftStorage.open(tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and seg.name in msg and f"offset {off}" in msg
    assert seg.read_bytes() == bytes(buf)  # nothing was truncated


def test_corruption_in_older_segment_refuses(tmp_path: Path) -> None:
    s = RaftStorage.open(tmp_path, segment_size=100)
    for lo in range(1, 30, 3):
        s.save(None, ents(lo, lo + 2))
    s.close()
    first = sorted((tmp_path / "log").glob("*.seg"))[0]
    buf = bytearray(first.read_bytes())
    buf[-1] ^= 1  # the last record of a non-final segment
    first.write_bytes(bytes(buf))
    with pytest.raises(RaftStorageError, match=first.name):
        RaftStorage.open(tmp_path, segment_size=100)


def test_missing_middle_segment_refuses(tmp_path: Path) -> None:
    s = RaftStorage.open(tmp_path, segment_size=100)
    for lo in range(1, 30, 3):
        s.save(None, ents(lo, lo + 2))
    s.close()
    segs = sorted((tmp_path / "log").glob("*.seg"))
    segs[1].unlink()
    with pytest.raises(RaftStorageError, match="gap"):
        RaftStorage.open(tmp_path, segment_size=100)


def test_misnamed_segment_refuses(tmp_path: Path) -> None:
    s = RaftStorage.open(tmp_path, segment_size=100)
    for lo in range(1, 30, 3):
        s.save(None, ents(lo, lo + 2))
    s.close()
    seg = sorted((tmp_path / "log").glob("*.seg"))[1]
    seg.rename(seg.with_name(f"{int(seg.stem) + 1:020d}.seg"))
    with pytest.raises(RaftStorageError, match="expected"):
        RaftStorage.open(tmp_path, segment_size=100)


def test_one_fsync_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = RaftStorage.open(tmp_path, commit_sync_interval=3600)
    s.save(HardState(1, "a", 0), ents(1, 1))
    calls: list[str] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync

    def fdatasync(fd: int) -> None:
        calls.append("fdatasync")
        real_fdatasync(fd)

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "fdatasync", fdatasync)
    monkeypatch.setattr(os, "fsync", fsync)
    s.save(HardState(1, "a", 1), ents(2, 65))  # 64 entries + a commit-only change
    assert calls == ["fdatasync"]
    calls.clear()
    s.save(HardState(2, "b", 1), ents(66, 66))  # a new term: the stable file too
    assert calls == ["fdatasync", "fsync", "fsync"]


def test_snapshot_compaction_restart(tmp_path: Path) -> None:
    cfg = Configuration({"a": Server("a", "n1", "127.0.0.1:1")})
    s = RaftStorage.open(tmp_path, segment_size=150)
    for lo in range(1, 101, 5):
        s.save(HardState(1, "a", lo), ents(lo, lo + 4))
    before = len(list((tmp_path / "log").glob("*.seg")))
    s.compact(SnapshotMeta(60, 1, cfg), b"state@60")
    assert s.first_index == 61 and s.entries == ents(61, 100)
    s.compact(SnapshotMeta(90, 1, cfg), b"state@90")
    after = sorted((tmp_path / "log").glob("*.seg"))
    assert len(after) < before
    assert int(after[0].stem) <= 61  # entries after the older snapshot are kept
    assert int(after[1].stem) > 61
    s.save(None, ents(101, 103))
    s.close()
    r = RaftStorage.open(tmp_path, segment_size=150)
    assert r.snapshot_meta == SnapshotMeta(90, 1, cfg)
    assert r.load_snapshot() == (SnapshotMeta(90, 1, cfg), b"state@90")
    assert r.entries == ents(91, 103)
    assert r.term(90) == 1
    # a third snapshot prunes the first file
    r.compact(SnapshotMeta(100, 1, cfg), b"state@100")
    names = sorted(p.name for p in (tmp_path / "snapshots").iterdir())
    assert len(names) == 2 and names[0].endswith(f"{90:020d}.snap")


def test_corrupt_newest_snapshot_falls_back(tmp_path: Path) -> None:
    s = RaftStorage.open(tmp_path, segment_size=150)
    for lo in range(1, 101, 5):
        s.save(None, ents(lo, lo + 4))
    s.compact(SnapshotMeta(40, 1), b"s40")
    s.compact(SnapshotMeta(80, 1), b"s80")
    s.close()
    newest = sorted((tmp_path / "snapshots").glob("*.snap"))[-1]
    buf = bytearray(newest.read_bytes())
    buf[-6] ^= 0xFF
    newest.write_bytes(bytes(buf))
    with structlog.testing.capture_logs() as logs:
        r = RaftStorage.open(tmp_path, segment_size=150)
    assert any(e["event"] == "raft.snapshot_corrupt" for e in logs)
    assert r.snapshot_meta.index == 40
    assert r.load_snapshot() == (SnapshotMeta(40, 1), b"s40")
    assert r.entries == ents(41, 100)
    assert newest.with_name(newest.name + ".corrupt").exists()


def test_install_snapshot_resets_conflicting_log(tmp_path: Path) -> None:
    s = RaftStorage.open(tmp_path)
    s.save(HardState(1, "", 0), ents(1, 10, term=1))
    # leader's snapshot at 20 (beyond our log): discard the log entirely
    s.save(HardState(3, "", 20), ents(21, 22, term=3), snapshot=(SnapshotMeta(20, 3), b"s20"))
    assert s.entries == ents(21, 22, 3)
    s.close()
    r = RaftStorage.open(tmp_path)
    assert r.snapshot_meta.index == 20 and r.entries == ents(21, 22, 3)
    # a snapshot whose index we have with a different term also discards everything
    r.save(None, [], snapshot=(SnapshotMeta(22, 4), b"s22"))
    assert r.entries == [] and r.last_index == 22
    r.save(None, ents(23, 23, 4))
    r.close()
    assert RaftStorage.open(tmp_path).entries == ents(23, 23, 4)


def test_crashed_install_recovers(tmp_path: Path) -> None:
    """Snapshot written but the log never reset: the stale conflicting log is discarded."""
    s = RaftStorage.open(tmp_path)
    s.save(None, ents(1, 10, term=1))
    s._snapshots.save(SnapshotMeta(5, 2), b"x")  # as if the process died right after this
    s.close()
    r = RaftStorage.open(tmp_path)
    assert r.snapshot_meta == SnapshotMeta(5, 2) and r.entries == []
    assert r.last_index == 5


# ---- crash loop: SIGKILL during a write load --------------------------------------------


def _crash_child(directory: str, seed: int, conn: Connection) -> None:
    rng = random.Random(seed)
    s = RaftStorage.open(Path(directory), segment_size=4096, commit_sync_interval=0.0)
    term = s.hard_state.term + 1
    while True:
        last = s.last_index
        first = last + 1
        if last > 5 and rng.random() < 0.2:
            first = rng.randint(max(1, last - 5), last)  # overwrite a suffix
        n = rng.randint(1, 40)
        batch = [
            Entry(i, term, EntryType.NORMAL, os.urandom(rng.randint(0, 200)))
            for i in range(first, first + n)
        ]
        conn.send(("begin", first, first + n - 1, term))
        s.save(HardState(term, "me", max(0, first - 1)), batch)
        conn.send(("ack", first, first + n - 1, term, [e.data for e in batch]))
        if rng.random() < 0.1:
            term += 1


def test_sigkill_crash_loop(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(1234)
    model: dict[int, tuple[int, bytes]] = {}
    deadline = time.monotonic() + 60
    total_acked = 0
    for kill in range(20):
        assert time.monotonic() < deadline
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_crash_child, args=(str(tmp_path), kill, child), daemon=True)
        p.start()
        child.close()
        time.sleep(rng.uniform(0.01, 0.1))
        assert p.pid is not None
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
        inflight: tuple[int, int, int] | None = None
        acked = 0
        try:  # everything the child said before it died (a torn last message ends it)
            while True:
                msg = parent.recv()
                if msg[0] == "begin":
                    inflight = (msg[1], msg[2], msg[3])
                else:
                    _, first, last, term, datas = msg
                    for i in [i for i in model if i >= first]:
                        del model[i]
                    for i, d in zip(range(first, last + 1), datas, strict=True):
                        model[i] = (term, d)
                    inflight = None
                    acked += 1
        except (EOFError, OSError):
            pass
        finally:
            parent.close()
        total_acked += acked
        r = RaftStorage.open(tmp_path, segment_size=4096)
        got = {e.index: (e.term, e.data) for e in r.entries}
        assert r.hard_state.vote in ("", "me")
        keep_below = inflight[0] if inflight else max(model, default=0) + 1
        for i, v in model.items():
            if i < keep_below:
                assert got.get(i) == v, (kill, i)
        if inflight is not None:
            # the in-flight batch may or may not have landed, but the log is one history
            for i in range(inflight[0], r.last_index + 1):
                assert got[i][0] == inflight[2] or got[i] == model.get(i), (kill, i)
        model = got
        r.close()
    assert total_acked > 100  # the kills did land during a real write load


# ---- property test against an in-memory model --------------------------------------------

ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 6), st.integers(1, 8)),
        st.tuples(st.just("compact"), st.integers(0, 100), st.just(0)),
        st.tuples(st.just("install"), st.integers(0, 10), st.just(0)),
        st.tuples(st.just("reopen"), st.just(0), st.just(0)),
        st.tuples(st.just("vote"), st.integers(0, 3), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_storage_matches_model(program: list[tuple[str, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        s = RaftStorage.open(d, segment_size=120)
        log: dict[int, int] = {}  # index -> term, after the snapshot
        snap = SnapshotMeta()
        hs = HardState()
        term = 1
        for op, a, b in program:
            last = max([snap.index, *log])
            if op == "append":
                first = max(snap.index + 1, last + 1 - a)
                term += 1 if a else 0
                s.save(None, ents(first, first + b - 1, term))
                log = {i: t for i, t in log.items() if i < first}
                log.update({i: term for i in range(first, first + b)})
            elif op == "compact" and log:
                idx = sorted(log)[a % len(log)]
                snap = SnapshotMeta(idx, log[idx])
                s.compact(snap, f"snap{idx}".encode())
                log = {i: t for i, t in log.items() if i > idx}
            elif op == "install":
                idx = last + a
                term += 1
                snap = SnapshotMeta(idx, term)
                s.save(None, [], snapshot=(snap, b"inst"))
                log = {}
            elif op == "reopen":
                s.close()
                s = RaftStorage.open(d, segment_size=120)
            elif op == "vote":
                hs = HardState(hs.term + 1, f"n{a}", hs.commit)
                s.save(hs, [])
            assert s.snapshot_meta.index == snap.index
            assert [(e.index, e.term) for e in s.entries] == sorted(log.items())
        s.close()
        r = RaftStorage.open(d, segment_size=120)
        assert r.hard_state == hs
        assert r.snapshot_meta == snap
        assert [(e.index, e.term) for e in r.entries] == sorted(log.items())
        for e in r.entries:
            assert e.data == f"{e.index}:{e.term}".encode()
        r.close()

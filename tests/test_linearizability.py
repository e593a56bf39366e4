"""Tests for the linearizability checker used by the Jepsen-style KV tests.

The checker is only worth something if it both accepts valid histories and rejects invalid
ones, so every family of cases comes in both polarities, and small random histories are
cross-checked against a brute-force oracle (all orders x all subsets of indeterminate ops).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Hashable, Sequence
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness.linearizability import (
    INF,
    CheckResult,
    HistoryRecorder,
    Kind,
    Operation,
    Outcome,
    Status,
    check,
    load,
)


def op(
    p: Hashable,
    kind: Kind,
    call: float,
    ret: float | None,
    value: object = None,
    out: object = None,
    status: Status | None = "ok",
    key: Hashable = "k",
) -> Operation:
    return Operation(p, key, kind, value, call, ret, status, out)


def w(p: Hashable, v: object, call: float, ret: float | None, status: Status | None = "ok",
      key: Hashable = "k") -> Operation:
    return op(p, "write", call, ret, value=v, status=status, key=key)


def r(p: Hashable, out: object, call: float, ret: float | None, status: Status = "ok",
      key: Hashable = "k") -> Operation:
    return op(p, "read", call, ret, out=out, status=status, key=key)


def cas(p: Hashable, exp: object, new: object, ok: bool | None, call: float,
        ret: float | None, status: Status = "ok", key: Hashable = "k") -> Operation:
    return op(p, "cas", call, ret, value=(exp, new), out=ok, status=status, key=key)


def assert_ok(history: list[Operation]) -> CheckResult:
    res = check(history, time_budget=10)
    assert res.outcome is Outcome.OK, str(res)
    assert res.ok and bool(res)
    return res


def assert_fail(history: list[Operation]) -> CheckResult:
    res = check(history, time_budget=10)
    assert res.outcome is Outcome.FAIL, str(res)
    assert not res.ok and not bool(res)
    return res


# --- known linearizable histories ------------------------------------------------------------

def test_empty_and_initial_absent() -> None:
    assert_ok([])
    assert_ok([r(1, None, 0, 1)])


def test_sequential() -> None:
    assert_ok([
        w(1, "a", 0, 1), r(2, "a", 2, 3), w(2, "b", 4, 5), r(1, "b", 6, 7),
        cas(1, "b", "c", True, 8, 9), r(2, "c", 10, 11),
    ])


def test_concurrent_writes_both_orders() -> None:
    # Two overlapping writes; later reads may see either winner.
    for final in ("a", "b"):
        assert_ok([w(1, "a", 0, 10), w(2, "b", 1, 9), r(3, final, 11, 12)])


def test_concurrent_read_sees_old_or_new() -> None:
    for seen in (None, "a"):
        assert_ok([w(1, "a", 0, 10), r(2, seen, 2, 3)])
    # Reads can flip only once: old then new, in real-time order.
    assert_ok([w(1, "a", 0, 10), r(2, None, 1, 2), r(3, "a", 3, 4), r(2, "a", 5, 6)])


def test_touching_intervals_count_as_concurrent() -> None:
    # ret == call: the checker orders calls before returns on ties (conservative).
    assert_ok([w(1, "a", 0, 1), r(2, None, 1, 2)])


def test_cas_success_and_failure() -> None:
    assert_ok([
        w(1, "a", 0, 1),
        cas(2, "a", "b", True, 2, 3),
        cas(3, "a", "c", False, 4, 5),   # ok-with-false: value was "b"
        r(1, "b", 6, 7),
        cas(1, None, "x", False, 8, 9),  # key present, create-if-absent fails
    ])
    # Concurrent cas pair: exactly one may win.
    assert_ok([w(1, 0, 0, 1), cas(2, 0, 1, True, 2, 5), cas(3, 0, 2, False, 2, 5),
               r(1, 1, 6, 7)])


def test_fail_status_ops_are_ignored() -> None:
    assert_ok([w(1, "a", 0, 1), w(2, "zzz", 2, 3, status="fail"), r(1, "a", 4, 5),
               cas(2, "a", "q", None, 6, 7, status="fail"), r(1, "a", 8, 9)])


def test_indeterminate_write_taken_effect_or_not() -> None:
    assert_ok([w(1, "a", 0, 1), w(2, "b", 2, 3, status="info"), r(1, "a", 4, 5)])
    assert_ok([w(1, "a", 0, 1), w(2, "b", 2, 3, status="info"), r(1, "b", 4, 5)])
    # May take effect long after the client gave up, even after other reads saw the old value.
    assert_ok([w(1, "a", 0, 1), w(2, "b", 2, 3, status="info"), r(1, "a", 4, 5),
               r(1, "a", 6, 7), r(3, "b", 100, 101)])
    # Pending (never completed) ops count as info too.
    assert_ok([w(2, "b", 2, None, status=None), r(1, "b", 4, 5)])


def test_indeterminate_read_is_ignored() -> None:
    assert_ok([w(1, "a", 0, 1), r(2, "garbage", 2, 3, status="info"), r(1, "a", 4, 5)])


def test_indeterminate_cas() -> None:
    base = [w(1, "a", 0, 1), cas(2, "a", "b", None, 2, 3, status="info")]
    assert_ok([*base, r(1, "a", 4, 5)])
    assert_ok([*base, r(1, "b", 4, 5)])
    # Applied only once, and only if the value matched at some point.
    assert_fail([*base, r(1, "b", 4, 5), w(1, "a", 6, 7), r(1, "b", 8, 9)])
    assert_fail([w(1, "x", 0, 1), cas(2, "a", "b", None, 2, 3, status="info"),
                 r(1, "b", 4, 5)])


def test_indeterminate_write_applies_at_most_once() -> None:
    assert_fail([w(2, "b", 0, 1, status="info"), r(1, "b", 2, 3), w(1, "a", 4, 5),
                 r(1, "b", 6, 7)])


def test_keys_are_independent() -> None:
    h = [w(1, "a", 0, 1, key="x"), w(1, "b", 2, 3, key="y"),
         r(2, "a", 4, 5, key="x"), r(2, "b", 4, 5, key="y")]
    res = assert_ok(h)
    assert set(res.keys) == {"x", "y"}
    res = assert_fail([*h, r(3, None, 6, 7, key="y")])
    assert res.failed_key is not None and res.failed_key.key == "y"
    assert res.keys["x"].outcome is Outcome.OK


# --- known NON-linearizable histories ------------------------------------------------------

def test_stale_read_after_completed_write() -> None:
    res = assert_fail([w(1, "a", 0, 1), w(1, "b", 2, 3), r(2, "a", 4, 5)])
    bad = res.failed_key
    assert bad is not None and bad.blocked is not None
    assert bad.blocked.kind == "read" and bad.blocked.output == "a"
    msg = str(res)
    assert "longest linearizable prefix has 2 ops" in msg
    assert "cannot linearize" in msg and "read -> 'a'" in msg
    assert "state after prefix: 'b'" in msg


def test_read_of_value_never_written() -> None:
    res = assert_fail([w(1, "a", 0, 1), r(2, "zz", 0.5, 3)])
    assert res.failed_key is not None and res.failed_key.blocked is not None
    assert res.failed_key.blocked.output == "zz"


def test_read_of_failed_write_value() -> None:
    assert_fail([w(1, "a", 0, 1, status="fail"), r(2, "a", 2, 3)])


def test_reads_in_impossible_order() -> None:
    # Both writes concurrent with both reads, but p3 sees a then b while p4 sees b then a.
    assert_fail([
        w(1, "a", 0, 10), w(2, "b", 0, 10),
        r(3, "a", 1, 2), r(3, "b", 3, 4),
        r(4, "b", 1, 2), r(4, "a", 3, 4),
    ])
    # New value seen, then old value seen again by a later read (flip-flop).
    assert_fail([w(1, "a", 0, 10), r(2, "a", 1, 2), r(3, None, 3, 4)])


def test_cas_against_value_that_cannot_be_current() -> None:
    assert_fail([w(1, "a", 0, 1), w(1, "b", 2, 3), cas(2, "a", "c", True, 4, 5)])
    # cas reported false although the value certainly matched.
    assert_fail([w(1, "a", 0, 1), cas(2, "a", "c", False, 2, 3)])
    # Two successful cas from the same expected value with no write in between.
    assert_fail([w(1, 0, 0, 1), cas(2, 0, 1, True, 2, 5), cas(3, 0, 2, True, 2, 5)])


def test_lost_acknowledged_write() -> None:
    assert_fail([w(1, "a", 0, 1), w(2, "b", 2, 3), r(1, "a", 4, 5), r(2, "a", 6, 7)])
    assert_fail([w(1, "a", 0, 1), r(2, None, 2, 3)])


def test_failure_explanation_is_readable() -> None:
    h = [w(1, "a", 0, 1), w(2, "b", 2, 3), r(3, "b", 4, 5), r(4, "a", 6, 7)]
    res = assert_fail(h)
    msg = str(res)
    assert msg.startswith("linearizability: fail")
    assert "key 'k'" in msg and "p4 read -> 'a'" in msg
    assert "register state after prefix: 'b'" in msg
    assert len(msg.splitlines()) < 30


# --- brute-force oracle on small random histories -------------------------------------------

def brute_force(history: Sequence[Operation]) -> bool:
    """All subsets of indeterminate ops x all orders that respect real time."""
    ops = [o for o in history
           if o.status != "fail" and not (o.kind == "read" and o.status != "ok")]
    must = [o for o in ops if o.status == "ok"]
    opt = [o for o in ops if o.status != "ok"]

    def ret(o: Operation) -> float:
        return o.ret if o.status == "ok" and o.ret is not None else INF

    for mask in range(1 << len(opt)):
        chosen = must + [o for i, o in enumerate(opt) if mask >> i & 1]
        for perm in itertools.permutations(chosen):
            if any(ret(b) < a.call for i, a in enumerate(perm) for b in perm[i + 1:]):
                continue
            state: object = None
            good = True
            for o in perm:
                if o.kind == "read":
                    good = state == o.output
                elif o.kind == "write":
                    state = o.value
                else:
                    exp, new = cast(tuple[object, object], o.value)
                    if o.status != "ok" or o.output:
                        good = state == exp
                        state = new
                    else:
                        good = state != exp
                if not good:
                    break
            if good:
                return True
    return False


@st.composite
def small_histories(draw: st.DrawFn) -> list[Operation]:
    n = draw(st.integers(1, 6))
    vals = st.sampled_from([None, 1, 2])
    hist: list[Operation] = []
    for i in range(n):
        call = draw(st.integers(0, 8))
        ret = call + draw(st.integers(0, 4))
        status: Status = draw(st.sampled_from(["ok", "ok", "ok", "info", "fail"]))
        kind: Kind = draw(st.sampled_from(["read", "write", "cas"]))
        if kind == "read":
            o = r(i, draw(vals), call, ret, status)
        elif kind == "write":
            o = w(i, draw(st.sampled_from([1, 2])), call, ret, status)
        else:
            o = cas(i, draw(vals), draw(st.sampled_from([1, 2])), draw(st.booleans()),
                    call, ret, status)
        hist.append(o)
    return hist


@settings(max_examples=600, derandomize=True, deadline=None)
@given(small_histories())
def test_agrees_with_brute_force(history: list[Operation]) -> None:
    res = check(history, time_budget=10)
    assert res.outcome is not Outcome.UNKNOWN
    expected = brute_force(history)
    assert res.ok == expected, (
        f"checker={res.outcome}, oracle={expected}\n"
        + "\n".join(o.describe() for o in history) + "\n" + str(res)
    )


# --- randomized histories from a simulated linearizable register ----------------------------

def simulate(
    rng: random.Random,
    n_ops: int,
    n_procs: int,
    *,
    unique: bool,
    p_info: float = 0.05,
    p_fail: float = 0.03,
    key: Hashable = "k",
) -> list[Operation]:
    """A linearizable history: each op takes effect at a random instant inside its interval.

    With ``unique`` every write/cas installs a fresh value, so mutations can be proven wrong.
    Indeterminate ops take effect (at their instant) or not, at random; failed ops never do.
    """
    clock = [rng.uniform(0, 1) for _ in range(n_procs)]
    planned: list[tuple[float, Operation]] = []
    written: list[object] = [None]
    for n in range(n_ops):
        p = min(range(n_procs), key=clock.__getitem__)
        call = clock[p] + rng.expovariate(4.0)
        dur = rng.uniform(0.05, 2.5)
        ret = call + dur
        clock[p] = ret
        kind: Kind = rng.choice(["read", "read", "write", "cas"])
        status: Status = "ok"
        if kind != "read" or rng.random() < 0.5:
            x = rng.random()
            status = "info" if x < p_info else "fail" if x < p_info + p_fail else "ok"
        new: object = f"v{n}" if unique else rng.randrange(4)
        value: object = new if kind == "write" else None
        o = Operation(p, key, kind, value, call, ret, status)
        if kind == "cas":
            o.value = (rng.choice(written[-3:]), new)  # filled for real at apply time
        planned.append((call + rng.random() * dur, o))
    state: object = None
    for _, o in sorted(planned, key=lambda t: t[0]):
        takes_effect = o.status == "ok" or (o.status == "info" and rng.random() < 0.5)
        if o.kind == "read":
            o.output = state
        elif o.kind == "write":
            if takes_effect:
                state = o.value
                written.append(state)
        else:
            _, new = o.value  # type: ignore[misc]
            exp = state if rng.random() < 0.6 else rng.choice(written[-4:])
            o.value = (exp, new)
            o.output = exp == state
            if takes_effect and exp == state:
                state = new
                written.append(state)
        if o.status != "ok":
            o.output = None
    return [o for _, o in sorted(planned, key=lambda t: t[1].call)]


def installs(o: Operation) -> object:
    """The value a completed op definitely installed, or a sentinel."""
    if o.status == "ok" and o.kind == "write":
        return o.value
    if o.status == "ok" and o.kind == "cas" and o.output:
        return o.value[1]  # type: ignore[index]
    return _NONE


_NONE = object()


def writers(o: Operation) -> object:
    """The value an op may have installed (any status but fail)."""
    if o.status == "fail" or o.kind == "read":
        return _NONE
    return o.value if o.kind == "write" else o.value[1]  # type: ignore[index]


def mutate(rng: random.Random, hist: list[Operation]) -> str | None:
    """Change one ok read to a value that provably cannot be read there; None if no spot."""
    reads = [o for o in hist if o.kind == "read" and o.status == "ok"]
    rng.shuffle(reads)
    kinds = ["never", "future", "stale"]
    rng.shuffle(kinds)
    for how in kinds:
        for rd in reads:
            if how == "never":
                rd.output = "never-written"
                return how
            assert rd.ret is not None
            if how == "future":
                later = [writers(o) for o in hist if o.call > rd.ret and writers(o) is not _NONE]
                if later:
                    rd.output = rng.choice(later)
                    return how
            else:
                # a installed v, then b installed something else strictly later, then rd ran:
                # with unique values nothing else writes v, so rd cannot see it.
                done = [o for o in hist if installs(o) is not _NONE
                        and o.ret is not None and o.ret < rd.call]
                for b in done:
                    older = [a for a in done if a.ret is not None and a.ret < b.call
                             and installs(a) is not None]
                    if older:
                        rd.output = installs(rng.choice(older))
                        return how
    return None


@pytest.mark.parametrize("seed", range(30))
def test_random_linearizable_histories_pass(seed: int) -> None:
    rng = random.Random(seed)
    n_procs = rng.randint(2, 10)
    p_info = (0.0, 0.05, 0.2)[seed % 3]
    hist = simulate(rng, rng.randint(20, 300), n_procs, unique=seed % 2 == 0, p_info=p_info)
    res = check(hist, time_budget=20)
    assert res.ok, str(res)


@pytest.mark.parametrize("seed", range(30))
def test_random_mutated_histories_fail(seed: int) -> None:
    rng = random.Random(1000 + seed)
    p_info = (0.0, 0.05, 0.2)[seed % 3]
    hist = simulate(rng, rng.randint(20, 300), rng.randint(2, 10), unique=True, p_info=p_info)
    assert check(hist, time_budget=20).ok
    how = mutate(rng, hist)
    assert how is not None
    res = check(hist, time_budget=20)
    assert res.outcome is Outcome.FAIL, f"mutation {how}: {res}"
    assert res.failed_key is not None and res.failed_key.blocked is not None


@settings(max_examples=40, derandomize=True, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 8))
def test_hypothesis_multi_key_mutation(seed: int, n_keys: int) -> None:
    rng = random.Random(seed)
    hist: list[Operation] = []
    for k in range(n_keys):
        hist += simulate(rng, rng.randint(5, 60), rng.randint(1, 6), unique=True, key=k)
    assert check(hist, time_budget=20).ok
    victim = rng.randrange(n_keys)
    sub = [o for o in hist if o.key == victim]
    if mutate(rng, sub) is None:
        return  # no ok read on that key
    res = check(hist, time_budget=20)
    assert res.outcome is Outcome.FAIL and res.failed_key is not None
    assert res.failed_key.key == victim


# --- budget, performance, recorder ----------------------------------------------------------

def test_give_up_is_unknown_never_ok() -> None:
    rng = random.Random(7)
    hist = simulate(rng, 400, 8, unique=False)
    mutate(rng, hist)
    res = check(hist, time_budget=0.0)
    assert res.outcome in (Outcome.UNKNOWN, Outcome.FAIL)
    assert not res.ok
    # A hard, unsatisfiable history: many concurrent writes of one small domain, then a read
    # of a value nobody wrote, blocked only after every interleaving is tried.
    hard = [w(i, i % 3, 0, 100) for i in range(22)] + [r(99, 5, 101, 102)]
    res = check(hard, time_budget=0.05)
    assert res.outcome is Outcome.UNKNOWN and not res.ok
    assert "NOT a pass" in str(res)


def test_performance_2000_ops_8_procs(capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(42)
    hist = simulate(rng, 2000, 8, unique=False)
    t = time.monotonic()
    res = check(hist, time_budget=60)
    elapsed = time.monotonic() - t
    assert res.ok, str(res)
    hist2 = simulate(random.Random(43), 2000, 8, unique=True)
    mutate(random.Random(44), hist2)
    t = time.monotonic()
    res2 = check(hist2, time_budget=60)
    elapsed2 = time.monotonic() - t
    assert res2.outcome is Outcome.FAIL, str(res2)
    with capsys.disabled():
        print(f"\n2000 ops/8 procs: ok in {elapsed:.3f}s ({res.keys['k'].configurations} "
              f"configs); mutated: fail in {elapsed2:.3f}s")
    assert elapsed < 30 and elapsed2 < 30  # generous: typical is well under a second


async def test_recorder_with_asyncio(tmp_path: object) -> None:
    rec = HistoryRecorder()
    store: dict[str, object] = {}

    async def client(p: int) -> None:
        for i in range(20):
            key = f"k{i % 3}"
            if i % 2:
                o = rec.invoke(p, key, "write", f"{p}-{i}")
                await asyncio.sleep(0)
                store[key] = f"{p}-{i}"
                await asyncio.sleep(0)
                rec.ok(o)
            else:
                o = rec.invoke(p, key, "read")
                await asyncio.sleep(0)
                rec.ok(o, store.get(key))
        o = rec.invoke(p, "k0", "cas", (store.get("k0"), f"cas-{p}"))
        await asyncio.sleep(0)
        rec.info(o)  # pretend it timed out; it never took effect

    await asyncio.gather(*(client(p) for p in range(5)))
    res = rec.check(time_budget=10)
    assert res.ok, str(res)
    assert len(rec.history) == 5 * 21
    assert all(o.ret is not None and o.ret >= o.call for o in rec.history)

    # Round-trip through the dump format, then corrupt one read.
    import pathlib
    path = pathlib.Path(str(tmp_path)) / "h.jsonl"
    rec.dump(str(path))
    loaded = load(str(path))
    assert check(loaded).ok
    rd = next(o for o in loaded if o.kind == "read" and o.output is not None)
    rd.output = "bogus"
    assert check(loaded).outcome is Outcome.FAIL


def test_recorder_validation() -> None:
    rec = HistoryRecorder(clock=iter(range(100)).__next__)
    o = rec.invoke(1, "k", "write", "a")
    with pytest.raises(ValueError):
        rec.invoke(1, "k", "read")  # process 1 already has an open op
    with pytest.raises(ValueError):
        rec.invoke(2, "k", "cas", "not-a-pair")
    rec.ok(o)
    with pytest.raises(ValueError):
        rec.ok(o)
    c = rec.invoke(1, "k", "cas", ("a", "b"))
    with pytest.raises(ValueError):
        rec.ok(c, "yes")
    rec.ok(c, True)
    f = rec.invoke(2, "k", "write", "zzz")
    rec.fail(f)
    rd = rec.invoke(2, "k", "read")
    rec.ok(rd, "b")
    assert [(x.call, x.ret) for x in rec.history] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert rec.check().ok
    with pytest.raises(ValueError):
        check([Operation(1, "k", "write", "a", 5.0, 4.0, "ok")])

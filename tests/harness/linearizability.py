"""Linearizability checker for register histories recorded by the Jepsen-style KV tests.

A history is a list of :class:`Operation` (read / write / cas on a key) with call and return
times and a status: ``ok`` (took effect, output known), ``fail`` (definitely took no effect) or
``info`` (indeterminate: a timeout or connection error; it may take effect at any time after
its call, or never, and its output is unknown -- Jepsen/Knossos semantics). Registers start
at ``None`` (key absent).

Checking is per key (linearizability is compositional: a history is linearizable iff every
key's sub-history is). Each key is checked with Wing & Gong's backtracking search over the
call/return entry list, with Lowe's cache of visited configurations (set of linearized ops,
register state), as in Porcupine and Knossos' ``wgl``. Indeterminate ops are not put in the
entry list: they are candidates that may be applied at any point after their call and are
simply left out if never needed, which is equivalent to a return time of +inf without
forcing the search to place them; they are applied only right before an op that needs them
(see ``_check_key``), and a configuration is skipped when an explored one with the same
finite ops and state had a subset of the info ops applied. The search gives up after a time
budget with the outcome ``unknown``; a give-up is never reported as ok.

Usage from asyncio client code::

    rec = HistoryRecorder()
    op = rec.invoke(process=3, key="k", kind="cas", value=("a", "b"))
    try:
        swapped = await client.cas("k", "a", "b")
    except TimeoutError:
        rec.info(op)
    else:
        rec.ok(op, swapped)
    ...
    result = rec.check(time_budget=30)
    assert result.ok, str(result)
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

Kind = Literal["read", "write", "cas"]
Status = Literal["ok", "fail", "info"]
KINDS: tuple[Kind, ...] = ("read", "write", "cas")
INF = float("inf")
_TIME_CHECK_EVERY = 2048


@dataclass(slots=True)
class Operation:
    """One client operation; mutable so the recorder can complete it in place.

    ``value`` is the input (value to write, or ``(expected, new)`` for cas); ``output`` is what
    the op returned (value read, or the cas success bool). ``ret``/``status`` stay ``None``
    until the op completes; ops never completed are checked as ``info``.
    """

    process: Hashable
    key: Hashable
    kind: Kind
    value: object
    call: float
    ret: float | None = None
    status: Status | None = None
    output: object = None
    index: int = -1

    def describe(self, t0: float = 0.0) -> str:
        """Human-readable one-liner for failure messages (times relative to ``t0``)."""
        if self.kind == "read":
            what = "read"
            res = repr(self.output) if self.status == "ok" else "?"
        elif self.kind == "write":
            what = f"write {self.value!r}"
            res = "ok" if self.status == "ok" else "?"
        else:
            exp, new = cast(tuple[object, object], self.value)
            what = f"cas {exp!r}->{new!r}"
            res = repr(self.output) if self.status == "ok" else "?"
        status = self.status or "pending"
        ret = "inf" if self.ret is None or status == "info" else f"{self.ret - t0:.6f}"
        return (
            f"#{self.index} p{self.process} {what} -> {res} [{status}] "
            f"[{self.call - t0:.6f}, {ret}]"
        )

    def to_json(self) -> dict[str, object]:
        """Plain dict so a failing history can be saved as a test artifact."""
        return {
            "process": self.process,
            "key": self.key,
            "kind": self.kind,
            "value": list(self.value) if isinstance(self.value, tuple) else self.value,
            "call": self.call,
            "ret": self.ret,
            "status": self.status,
            "output": self.output,
            "index": self.index,
        }

    @staticmethod
    def from_json(d: dict[str, object]) -> Operation:
        """Inverse of :meth:`to_json` (cas inputs come back as tuples, keys must be JSON-able)."""
        kind = cast(Kind, d["kind"])
        value = d["value"]
        if kind == "cas" and isinstance(value, list):
            value = tuple(value)
        ret = d["ret"]
        return Operation(
            process=d["process"],
            key=d["key"],
            kind=kind,
            value=value,
            call=float(cast(float, d["call"])),
            ret=None if ret is None else float(cast(float, ret)),
            status=cast("Status | None", d["status"]),
            output=d["output"],
            index=int(cast(int, d.get("index", -1))),
        )


class Outcome(enum.Enum):
    OK = "ok"
    FAIL = "fail"
    UNKNOWN = "unknown"


@dataclass(slots=True)
class KeyResult:
    """Verdict for one key; for FAIL, the deepest partial linearization and where it stuck."""

    key: Hashable
    outcome: Outcome
    n_ops: int
    elapsed: float
    configurations: int
    prefix: list[tuple[Operation, object]] = field(default_factory=list)
    blocked: Operation | None = None
    pending: list[Operation] = field(default_factory=list)
    t0: float = 0.0

    def explain(self, max_prefix: int = 12, max_pending: int = 12) -> str:
        """Readable explanation, short enough for a pytest assertion message."""
        head = (
            f"key {self.key!r}: {self.outcome.value} ({self.n_ops} ops, "
            f"{self.configurations} configurations, {self.elapsed:.3f}s)"
        )
        if self.outcome is Outcome.UNKNOWN:
            return head + ": search gave up (time budget); NOT a pass"
        if self.outcome is Outcome.OK:
            return head
        lines = [head, "times are seconds since the first call; info ops have return=inf"]
        n = len(self.prefix)
        lines.append(f"longest linearizable prefix has {n} ops" + (
            f" (last {max_prefix} shown):" if n > max_prefix else ":"))
        for op, state in self.prefix[-max_prefix:]:
            lines.append(f"  {op.describe(self.t0)}   => state {state!r}")
        state = self.prefix[-1][1] if self.prefix else None
        lines.append(f"register state after prefix: {state!r}")
        if self.blocked is not None:
            lines.append(
                "cannot linearize (it returned, but no order of the ops that could still "
                "precede it makes its result valid):"
            )
            lines.append(f"  {self.blocked.describe(self.t0)}")
        others = [op for op in self.pending if op is not self.blocked]
        if others:
            lines.append(
                f"other ops that could have gone next ({len(others)}"
                + (f", first {max_pending} shown):" if len(others) > max_pending else "):")
            )
            lines.extend(f"  {op.describe(self.t0)}" for op in others[:max_pending])
        return "\n".join(lines)


@dataclass(slots=True)
class CheckResult:
    """Whole-history verdict: FAIL if any key fails, else UNKNOWN if any gave up, else OK."""

    outcome: Outcome
    keys: dict[Hashable, KeyResult]
    elapsed: float

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK

    @property
    def failed_key(self) -> KeyResult | None:
        for r in self.keys.values():
            if r.outcome is Outcome.FAIL:
                return r
        return None

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        n_ops = sum(r.n_ops for r in self.keys.values())
        head = (
            f"linearizability: {self.outcome.value} "
            f"({len(self.keys)} keys, {n_ops} ops, {self.elapsed:.3f}s)"
        )
        bad = self.failed_key
        if bad is not None:
            return head + "\n" + bad.explain()
        unknown = [r for r in self.keys.values() if r.outcome is Outcome.UNKNOWN]
        if unknown:
            return head + "\n" + "\n".join(r.explain() for r in unknown[:5])
        return head


def _validate(op: Operation) -> None:
    """Reject malformed ops early: a silently misread history would make the verdict vacuous."""
    if op.kind not in KINDS:
        raise ValueError(f"unknown kind {op.kind!r} in {op!r}")
    if op.status not in (None, "ok", "fail", "info"):
        raise ValueError(f"unknown status {op.status!r} in {op!r}")
    if op.kind == "cas" and not (isinstance(op.value, tuple) and len(op.value) == 2):
        raise ValueError(f"cas input must be (expected, new), got {op.value!r}")
    if op.kind == "cas" and op.status == "ok" and not isinstance(op.output, bool):
        raise ValueError(f"ok cas output must be a bool, got {op.output!r}")
    if op.status == "ok" and (op.ret is None or op.ret < op.call):
        raise ValueError(f"ok op must have ret >= call: {op!r}")


def _effect(op: Operation, state: object) -> tuple[bool, object]:
    """Register model: (op valid in ``state``, next state). Info ops use their effect if any."""
    kind = op.kind
    if kind == "read":
        return (state == op.output, state)
    if kind == "write":
        return (True, op.value)
    expected, new = cast(tuple[object, object], op.value)
    if op.status != "ok":
        # An indeterminate cas that would not match is the same as one that never happened.
        return (state == expected, new)
    if op.output:
        return (state == expected, new)
    return (state != expected, state)


_NOJUST = object()  # marker: the last linearized op was not an indeterminate one


def _check_key(key: Hashable, ops: Sequence[Operation], deadline: float) -> KeyResult:
    """Wing & Gong search with Lowe's cache for one key's ops (already filtered).

    Indeterminate ops are applied lazily. Any valid linearization can be rewritten so that
    each applied info op changes the state and is immediately followed by an op that is
    invalid in the state before it (otherwise drop the info op, or swap it with the next op,
    which is legal since an info op never returns). The search only builds such
    linearizations, and among pending info ops with the same kind and input tries one: from
    the moment both are callable they are interchangeable. Without this the search is
    exponential in the number of pending info ops, which partitions produce by the hundred.
    """
    started = time.monotonic()
    finite = [op for op in ops if op.status == "ok"]
    info = sorted((op for op in ops if op.status != "ok"), key=lambda o: o.call)
    t0 = min((op.call for op in ops), default=0.0)
    n_f = len(finite)
    all_ops = finite + info  # op id = position here; bit i of `linearized` marks op i
    info_calls = [op.call for op in info]
    info_class = [(op.kind, op.value) for op in info]

    # Entry list of finite ops: node 0 is the head sentinel, nodes 1..2n the call/return
    # entries by time (calls before returns on ties, so touching ops count as concurrent).
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(finite):
        events.append((op.call, 0, i))
        events.append((cast(float, op.ret), 1, i))
    events.sort()
    size = len(events) + 1
    nxt = list(range(1, size + 1))
    nxt[-1] = 0  # 0 doubles as the end marker: the head is never a real entry
    prv = [i - 1 for i in range(size)]
    node_op = [-1] * size
    node_is_call = [False] * size
    node_time = [0.0] * size
    call_node = [0] * n_f
    ret_node = [0] * n_f
    for pos, (t, is_ret, i) in enumerate(events, start=1):
        node_op[pos] = i
        node_is_call[pos] = not is_ret
        node_time[pos] = t
        if is_ret:
            ret_node[i] = pos
        else:
            call_node[i] = pos

    def lift(i: int) -> None:
        for n in (call_node[i], ret_node[i]):
            nxt[prv[n]] = nxt[n]
            prv[nxt[n]] = prv[n]

    def unlift(i: int) -> None:
        for n in (ret_node[i], call_node[i]):
            nxt[prv[n]] = n
            prv[nxt[n]] = n

    # Lowe's cache, generalised: configurations with the same linearized finite ops, state
    # and justification are grouped, and one is dominated by an explored one whose set of
    # applied info ops is a subset (it had every option the new one has, and more).
    cache: dict[tuple[int, object, object], list[int]] = {}
    n_cached = 0
    finite_mask = (1 << n_f) - 1
    # (op id, state before, justification before, state after)
    stack: list[tuple[int, object, object, object]] = []
    linearized = 0
    state: object = None
    just: object = _NOJUST  # state before the last op, if that op was an info op
    remaining = n_f
    applied_info = [False] * len(info)
    best_len = -1
    best: KeyResult | None = None
    steps = 0
    node = nxt[0]

    def try_op(i: int) -> bool:
        nonlocal linearized, state, just, n_cached
        op = all_ops[i]
        valid, new_state = _effect(op, state)
        if not valid:
            return False
        if just is not _NOJUST and _effect(op, just)[0]:
            return False  # would not need the preceding info op: not canonical
        new_just: object = _NOJUST
        if i >= n_f:
            if new_state == state:
                return False  # no visible effect: same as never happening
            new_just = state
        bits = linearized | (1 << i)
        ckey = (bits & finite_mask, new_state, new_just)
        ibits = bits >> n_f
        seen_sets = cache.get(ckey)
        if seen_sets is None:
            cache[ckey] = [ibits]
        else:
            for old in seen_sets:
                if old & ~ibits == 0:
                    return False
            seen_sets.append(ibits)
        n_cached += 1
        stack.append((i, state, just, new_state))
        linearized = bits
        state = new_state
        just = new_just
        return True

    while True:
        if remaining == 0:
            return KeyResult(key, Outcome.OK, len(ops), time.monotonic() - started, n_cached)
        steps += 1
        if steps % _TIME_CHECK_EVERY == 0 and time.monotonic() > deadline:
            return KeyResult(
                key, Outcome.UNKNOWN, len(ops), time.monotonic() - started, n_cached
            )
        if node_is_call[node]:
            i = node_op[node]
            if try_op(i):
                lift(i)
                remaining -= 1
                node = nxt[0]
            else:
                node = nxt[node]
            continue
        # A return entry: its op must be linearized before anything later. Finite candidates
        # are exhausted, so try the indeterminate ops that were called by now.
        limit = node_time[node]
        placed = False
        seen: set[tuple[str, object]] = set()
        for j, c in enumerate(info_calls):
            if c > limit:
                break
            if applied_info[j]:
                continue
            cls = info_class[j]
            if cls in seen:
                continue  # interchangeable with an earlier pending one
            seen.add(cls)
            if try_op(n_f + j):
                applied_info[j] = True
                placed = True
                break
        if placed:
            node = nxt[0]
            continue
        if len(stack) > best_len:
            best_len = len(stack)
            pend: list[Operation] = []
            n = nxt[0]
            while n != node:
                if node_is_call[n]:
                    pend.append(finite[node_op[n]])
                n = nxt[n]
            pend.extend(
                op for j, op in enumerate(info) if info_calls[j] <= limit and not applied_info[j]
            )
            best = KeyResult(
                key, Outcome.FAIL, len(ops), 0.0, 0,
                prefix=[(all_ops[s[0]], s[3]) for s in stack],
                blocked=finite[node_op[node]], pending=pend, t0=t0,
            )
        if not stack:
            assert best is not None
            best.elapsed = time.monotonic() - started
            best.configurations = n_cached
            return best
        i, state, just, _ = stack.pop()
        linearized ^= 1 << i
        if i < n_f:
            unlift(i)
            remaining += 1
            node = call_node[i]  # retry it: the cache skips what was already explored
        else:
            applied_info[i - n_f] = False
            # Resume at the first return entry; finite candidates before it are all cached
            # in this configuration, and info candidates are re-tried through the cache.
            node = nxt[0]


def check(history: Iterable[Operation], *, time_budget: float = 60.0) -> CheckResult:
    """Check a register history. ``time_budget`` (seconds) bounds the whole check."""
    started = time.monotonic()
    deadline = started + time_budget
    by_key: dict[Hashable, list[Operation]] = {}
    for n, op in enumerate(history):
        _validate(op)
        if op.index < 0:
            op.index = n
        if op.status == "fail":
            continue  # definitely took no effect
        if op.status != "ok" and op.kind == "read":
            continue  # an indeterminate read has no effect and an unknown result
        by_key.setdefault(op.key, []).append(op)
    results: dict[Hashable, KeyResult] = {}
    # Small keys first so one hard key cannot starve the rest of the budget.
    for key, ops in sorted(by_key.items(), key=lambda kv: len(kv[1])):
        results[key] = _check_key(key, ops, deadline)
    outcomes = {r.outcome for r in results.values()}
    if Outcome.FAIL in outcomes:
        outcome = Outcome.FAIL
    elif Outcome.UNKNOWN in outcomes:
        outcome = Outcome.UNKNOWN
    else:
        outcome = Outcome.OK
    return CheckResult(outcome, results, time.monotonic() - started)


class HistoryRecorder:
    """Records client ops with monotonic timestamps; single event loop, so no locking."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._ops: list[Operation] = []
        self._open: dict[Hashable, Operation] = {}

    def invoke(
        self, process: Hashable, key: Hashable, kind: Kind, value: object = None
    ) -> Operation:
        """Record the call. A process has at most one open op (Jepsen's process model)."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if kind == "cas" and not (isinstance(value, tuple) and len(value) == 2):
            raise ValueError(f"cas input must be (expected, new), got {value!r}")
        if process in self._open:
            raise ValueError(f"process {process!r} already has an open op: {self._open[process]}")
        op = Operation(process, key, kind, value, self._clock(), index=len(self._ops))
        self._ops.append(op)
        self._open[process] = op
        return op

    def _complete(self, op: Operation, status: Status, output: object) -> None:
        if op.status is not None:
            raise ValueError(f"op already completed: {op.describe()}")
        op.ret = self._clock()
        op.status = status
        op.output = output
        self._open.pop(op.process, None)

    def ok(self, op: Operation, output: object = None) -> None:
        """The op took effect; ``output`` is the value read / cas success bool."""
        if op.kind == "cas" and not isinstance(output, bool):
            raise ValueError(f"cas output must be a bool, got {output!r}")
        self._complete(op, "ok", output)

    def fail(self, op: Operation) -> None:
        """The op definitely took no effect (e.g. a 4xx that proves it was rejected)."""
        self._complete(op, "fail", None)

    def info(self, op: Operation) -> None:
        """Outcome unknown (timeout, connection reset): may take effect any time later."""
        self._complete(op, "info", None)

    @property
    def history(self) -> list[Operation]:
        return list(self._ops)

    def check(self, *, time_budget: float = 60.0) -> CheckResult:
        return check(self._ops, time_budget=time_budget)

    def dump(self, path: str) -> None:
        """Write the history as JSON lines, for post-mortem of a failed run."""
        with open(path, "w", encoding="utf-8") as f:
            for op in self._ops:
                f.write(json.dumps(op.to_json(), default=repr) + "\n")


def load(path: str) -> list[Operation]:
    """Read a history written by :meth:`HistoryRecorder.dump`."""
    with open(path, encoding="utf-8") as f:
        return [Operation.from_json(json.loads(line)) for line in f if line.strip()]

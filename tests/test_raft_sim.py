"""The Raft core under a randomized nemesis: 200 seeds x 10,000 steps, safety checked every step.

Every assertion message carries `seed=<n>`; `MESHNODE_RAFT_SEED=<n>` replays just that seed
(MESHNODE_RAFT_SEEDS / MESHNODE_RAFT_STEPS scale the run up for a soak).
The checkers are also fed deliberately broken histories below, to show each one can fail.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from node.raft.types import Entry, HardState
from tests.sim.raft_network import (
    RaftSim,
    RunStats,
    SafetyChecker,
    SafetyViolation,
    SimNode,
    run_seed,
)

SEEDS = int(os.environ.get("MESHNODE_RAFT_SEEDS", "200"))  # raise both for a soak run
STEPS = int(os.environ.get("MESHNODE_RAFT_STEPS", "10000"))
_ONE = os.environ.get("MESHNODE_RAFT_SEED")


@pytest.fixture(autouse=True, scope="module")
def _quiet_logs() -> Iterator[None]:
    """Thousands of elections each log; keep warnings, restore the config after."""
    saved: dict[str, Any] = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    yield
    structlog.configure(**saved)


def _run(seed: int) -> RunStats:
    """run_seed, with the seed attached to anything that escapes (a crash in the core too)."""
    try:
        return run_seed(seed, STEPS)
    except SafetyViolation:
        raise
    except Exception as exc:
        raise AssertionError(f"seed={seed}: {exc!r} (replay: MESHNODE_RAFT_SEED={seed})") from exc


def test_randomized_clusters_stay_safe_and_recover() -> None:
    seeds = [int(_ONE)] if _ONE else list(range(SEEDS))
    started = time.monotonic()
    stats: list[RunStats] = [_run(seed) for seed in seeds]
    elapsed = time.monotonic() - started
    for s in stats:
        assert s.steps >= STEPS, f"seed={s.seed}: only {s.steps} steps"
        assert s.committed > 0, f"seed={s.seed}: nothing committed"
    if _ONE:
        return
    # the nemesis must actually exercise the interesting paths, or the test proves little
    total = {
        k: sum(getattr(s, k) for s in stats)
        for k in (
            "committed",
            "leaders",
            "reads",
            "snapshots_installed",
            "config_changes",
            "transfers",
            "crashes",
        )
    }
    assert total["snapshots_installed"] > SEEDS, total
    assert total["config_changes"] > 5 * SEEDS, total
    assert total["transfers"] > SEEDS, total
    assert total["crashes"] > 10 * SEEDS, total
    assert total["reads"] > 10 * SEEDS, total
    assert total["leaders"] > 5 * SEEDS, total
    print(f"raft sim: {len(seeds)} seeds x {STEPS} steps in {elapsed:.1f}s: {total}")


def test_a_seed_replays_exactly() -> None:
    assert run_seed(7, 3000) == run_seed(7, 3000)


# ------------------------------------------------------------ the checkers can fail


def test_election_safety_checker_catches_two_leaders_in_a_term() -> None:
    c = SafetyChecker(42)
    c.leader(3, "n1")
    c.leader(3, "n1")
    c.leader(4, "n2")
    with pytest.raises(SafetyViolation, match=r"seed=42: election safety"):
        c.leader(3, "n2")


def test_log_matching_checker_catches_divergent_entries() -> None:
    c = SafetyChecker(42)
    c.appended([Entry(1, 1, data=b"a"), Entry(2, 1, data=b"b")], prev_term=0)
    c.appended([Entry(2, 1, data=b"b")], prev_term=1)  # the same entry again: fine
    with pytest.raises(SafetyViolation, match=r"seed=42: log matching"):
        c.appended([Entry(2, 1, data=b"X")], prev_term=1)
    with pytest.raises(SafetyViolation, match=r"seed=42: log matching"):
        c.appended([Entry(2, 1, data=b"b")], prev_term=0)  # same entry, different prefix


def test_leader_completeness_checker_catches_a_leader_missing_committed_entries() -> None:
    c = SafetyChecker(42)
    for i in range(1, 8):
        c.committed("n1", 3, i, 3)
    c.new_leader("n2", 4, lambda i: 3 if i <= 9 else None, 0)  # has them: fine
    c.new_leader("n3", 3, lambda i: None, 0)  # same term: not "later", not checked
    with pytest.raises(SafetyViolation, match=r"seed=42: leader completeness"):
        c.new_leader("n3", 5, lambda i: 3 if i <= 5 else None, 0)
    with pytest.raises(SafetyViolation, match=r"seed=42: leader completeness"):
        c.new_leader("n4", 5, lambda i: 2, 0)


def test_state_machine_safety_checker_catches_divergent_applies() -> None:
    c = SafetyChecker(42)
    c.apply("n1", Entry(5, 2, data=b"x"), 111)
    c.apply("n2", Entry(5, 2, data=b"x"), 111)
    with pytest.raises(SafetyViolation, match=r"seed=42: state machine safety"):
        c.apply("n3", Entry(5, 2, data=b"y"), 111)
    with pytest.raises(SafetyViolation, match=r"seed=42: state machine safety"):
        c.apply("n3", Entry(5, 2, data=b"x"), 222)
    with pytest.raises(SafetyViolation, match=r"seed=42"):
        c.restored("n4", 5, 333)
    c.committed("n1", 2, 5, 2)
    with pytest.raises(SafetyViolation, match=r"seed=42"):
        c.committed("n2", 3, 5, 3)
    with pytest.raises(SafetyViolation, match=r"seed=42"):
        c.snapshot_installed(5, 9)


def test_the_simulation_catches_storage_that_forgets_the_vote(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End to end: a node that restarts without its persisted vote must trip election safety."""
    real_boot = RaftSim._boot

    def forgetful_boot(self: RaftSim, n: SimNode) -> None:
        hs = n.disk.hard_state
        n.disk.hard_state = HardState(hs.term, "", hs.commit)
        real_boot(self, n)

    monkeypatch.setattr(RaftSim, "_boot", forgetful_boot)
    failure = ""
    for seed in range(SEEDS):
        try:
            run_seed(seed, STEPS)
        except SafetyViolation as e:
            failure = str(e)
            break
    assert "election safety" in failure, failure


def test_liveness_check_fails_when_the_network_never_heals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def never_heal(self: RaftSim) -> None:
        for k, i in enumerate(self.group):
            self.group[i] = k  # everybody alone

    monkeypatch.setattr(RaftSim, "heal", never_heal)
    with pytest.raises(SafetyViolation, match=r"seed=3: liveness"):
        run_seed(3, 500, heal_steps=3000)

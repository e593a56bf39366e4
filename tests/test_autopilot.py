"""Autopilot's rules for who votes, as a pure function of the leader's view."""

from __future__ import annotations

from node.raft.autopilot import AutopilotConfig, Health, MemberView, next_change
from node.raft.types import Configuration, Server

CFG = AutopilotConfig(stabilization=10.0, max_trailing=100)


def member(i: int, health: Health = Health.ALIVE, since: float = 0.0) -> MemberView:
    return MemberView(f"id{i}", f"n{i}", f"127.0.0.{i}:8300", health, since)


def config(voters: list[int], learners: list[int] = ()) -> Configuration:  # type: ignore[assignment]
    servers = [Server(f"id{i}", f"n{i}", f"127.0.0.{i}:8300", True) for i in voters]
    servers += [Server(f"id{i}", f"n{i}", f"127.0.0.{i}:8300", False) for i in learners]
    return Configuration({s.id: s for s in servers})


def step(cfg: Configuration, members: list[MemberView], now: float = 100.0,
         match: dict[str, int] | None = None) -> Configuration | None:
    ms = {m.id: m for m in members}
    caught_up = match if match is not None else {sid: 1000 for sid in ms}
    return next_change(cfg, ms, leader_id="id1", match=caught_up, last_index=1000, now=now,
                       cfg=CFG)


def voters(c: Configuration | None) -> list[str]:
    assert c is not None
    return sorted(c.voters)


def test_new_members_join_as_learners_then_three_voters_stay() -> None:
    c = config([1, 2, 3])
    ms = [member(i) for i in (1, 2, 3, 4)]
    nxt = step(c, ms)
    assert nxt is not None and nxt.learners == {"id4"} and nxt.voters == c.voters
    assert step(nxt, ms) is None  # 4 healthy members: 3 voters is the goal


def test_fifth_healthy_member_brings_five_voters_one_at_a_time() -> None:
    c = config([1, 2, 3], [4, 5])
    ms = [member(i) for i in range(1, 6)]
    c1 = step(c, ms)
    assert voters(c1) == ["id1", "id2", "id3", "id4"]
    c2 = step(c1, ms)  # type: ignore[arg-type]
    assert voters(c2) == ["id1", "id2", "id3", "id4", "id5"]
    assert step(c2, ms) is None  # type: ignore[arg-type]


def test_unstable_or_lagging_learner_is_not_promoted() -> None:
    c = config([1, 2, 3], [4, 5])
    fresh = [member(1), member(2), member(3), member(4, since=95.0), member(5)]
    nxt = step(c, fresh)
    assert voters(nxt) == ["id1", "id2", "id3", "id5"]  # id4 healthy for only 5 s
    lagging = step(c, [member(i) for i in range(1, 6)], match={"id4": 10, "id5": 10})
    assert lagging is None


def test_failed_voter_is_replaced_after_stabilization() -> None:
    c = config([1, 2, 3], [4])
    ms = [member(1), member(2), member(3, Health.FAILED, since=95.0), member(4)]
    # a healthy learner is promoted at once (healthy voters 2 < 3) ...
    c1 = step(c, ms)
    assert voters(c1) == ["id1", "id2", "id3", "id4"]
    # ... and the failed voter demoted only after it stayed failed for the stabilization time
    assert step(c1, ms, now=100.0) is None  # type: ignore[arg-type]
    c2 = step(c1, ms, now=106.0)  # type: ignore[arg-type]
    assert voters(c2) == ["id1", "id2", "id4"] and "id3" in c2.learners  # type: ignore[union-attr]


def test_failed_voter_without_replacement_keeps_its_vote() -> None:
    c = config([1, 2, 3])
    ms = [member(1), member(2), member(3, Health.FAILED, since=0.0)]
    assert step(c, ms, now=1000.0) is None  # demoting would leave 2 voters: no gain


def test_left_members_are_removed_and_voters_shrink_back_to_three() -> None:
    c = config([1, 2, 3, 4, 5], [6])
    ms = [member(i) for i in (1, 2, 3, 4)] + [member(5, Health.LEFT), member(6, Health.LEFT)]
    c1 = step(c, ms)
    assert c1 is not None and "id5" not in c1.servers
    c2 = step(c1, ms)
    assert c2 is not None and "id6" not in c2.servers
    c3 = step(c2, ms)  # 4 members stay: 3 voters wanted
    assert voters(c3) == ["id1", "id2", "id3"]
    assert step(c3, ms) is None  # type: ignore[arg-type]


def test_long_failed_voter_is_demoted_and_returns_when_healthy() -> None:
    c = config([1, 2, 3, 4, 5])
    ms = [member(i) for i in range(1, 5)] + [member(5, Health.FAILED, since=0.0)]
    c1 = step(c, ms, now=1000.0)
    assert voters(c1) == ["id1", "id2", "id3", "id4"] and "id5" in c1.learners  # type: ignore[union-attr]
    assert step(c1, ms, now=1000.0) is None  # type: ignore[arg-type]
    back = [member(i) for i in range(1, 5)] + [member(5, since=1000.0)]
    assert step(c1, back, now=1005.0) is None  # type: ignore[arg-type]  # not stable yet
    assert voters(step(c1, back, now=1011.0)) == ["id1", "id2", "id3", "id4", "id5"]  # type: ignore[arg-type]


def test_reaped_member_is_removed_but_never_the_leader() -> None:
    c = config([1, 2, 3])
    ms = [member(2), member(3)]  # the leader id1 is missing from its own view: keep it
    nxt = step(c, ms)
    assert nxt is None or "id1" in nxt.servers
    gone = step(config([1, 2, 3]), [member(1), member(2)])
    assert gone is not None and "id3" not in gone.servers

"""Shared fixtures: data dirs, netns clusters, local agent clusters; agent logs on failure.

Factories clean up whatever they built at teardown, failed test or not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import netns
from tests.harness.agents import LocalCluster, NetnsAgentCluster, format_logs, registry_mark
from tests.harness.netns import NetnsCluster

NETNS_ROOT = "mt"  # prefix root of every netns object these tests create
_LOG_MARK = pytest.StashKey[int]()
_stale_cleaned = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_LOG_MARK] = registry_mark()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Attach the log tails of the agents a failed test started to its report."""
    report = yield
    if report.failed and _LOG_MARK in item.stash:
        logs = format_logs(since=item.stash[_LOG_MARK])
        if logs:
            report.sections.append((f"agent logs ({call.when})", logs))
    return report


@pytest.fixture
def tmp_data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def netns_cluster() -> Iterator[Callable[..., NetnsCluster]]:
    """Factory ``make(n, net=None) -> NetnsCluster`` (up); all torn down after the test."""
    global _stale_cleaned
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CI runs the netns tests as root)")
    reason = netns.unavailable_reason()
    if reason:
        pytest.fail(reason)
    if netns.missing_tools():
        pytest.fail(f"missing: {', '.join(netns.missing_tools())} (make test installs them)")
    if not _stale_cleaned:
        netns.cleanup_stale(NETNS_ROOT)
        _stale_cleaned = True
    made: list[NetnsCluster] = []

    def make(n: int, net: str | None = None) -> NetnsCluster:
        c = NetnsCluster(n, netns.unique_prefix(NETNS_ROOT), net)
        made.append(c)
        return c.up()

    yield make
    errors = []
    for c in reversed(made):
        try:
            c.down()
        except netns.HarnessError as e:
            errors.append(str(e))
    assert not errors, errors


@pytest.fixture
def local_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """Factory ``make(n, start=True, **agent_kwargs) -> LocalCluster``; closed after the test."""
    made: list[LocalCluster] = []

    def make(n: int, start: bool = True, **agent_kwargs: Any) -> LocalCluster:
        c = LocalCluster(n, tmp_path / f"cluster{len(made)}", **agent_kwargs)
        made.append(c)
        return c.start() if start else c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def netns_agent_cluster(
    netns_cluster: Callable[..., NetnsCluster], tmp_path: Path
) -> Iterator[Callable[..., NetnsAgentCluster]]:
    """Factory ``make(n, start=True, **agent_kwargs)``: an agent on each host of a new netns."""
    made: list[NetnsAgentCluster] = []

    def make(n: int, start: bool = True, **agent_kwargs: Any) -> NetnsAgentCluster:
        c = NetnsAgentCluster(netns_cluster(n), tmp_path / f"ncluster{len(made)}", **agent_kwargs)
        made.append(c)
        return c.start() if start else c

    yield make
    for c in made:
        c.close()

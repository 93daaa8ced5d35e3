"""Shared fixtures. Keep this small and generic: the helpers live in tests/harness.py."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest
from harness import ProcessGroup, Upstream, require_envoy

PROCS = pytest.StashKey[ProcessGroup]()


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessGroup]:
    """Processes started by this test: stopped by PID at teardown, log tails on failure."""
    group = ProcessGroup(tmp_path / "logs")
    request.node.stash[PROCS] = group
    yield group
    group.stop_all()


@pytest.fixture
def upstream() -> Iterator[Callable[[str], Upstream]]:
    """A factory of tiny HTTP upstreams whose body is their name: ``upstream("alpha")``."""
    started: list[Upstream] = []

    def make(name: str) -> Upstream:
        u = Upstream(name)
        started.append(u)
        return u

    yield make
    for u in started:
        u.close()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``envoy`` needs a real Envoy 1.40: skipped without one, or failed when
    XDSPLANE_REQUIRE_ENVOY=1 (CI). Runs before any fixture, module-scoped ones included."""
    if item.get_closest_marker("envoy") is not None:
        require_envoy()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the tails of process logs and diagnostics to the report."""
    report = yield
    group = item.stash.get(PROCS, None)
    if group is not None and report.failed:
        for title, text in group.report():
            report.sections.append((title, text))
    return report

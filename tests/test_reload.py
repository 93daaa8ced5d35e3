"""Reloading a folder in-process: what is served after good, broken and half-written edits.

Drives xdsplane.watch.Reloader against a SnapshotCache on a tmp folder, first by calling
``reload()`` directly, then through the real watch loop (``Reloader.run``) with the kinds of
saves editors make. Waits poll with timeouts; nothing sleeps a fixed time to "let it settle".
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xdsplane import reload as reload_helper
from xdsplane.cache import SnapshotCache
from xdsplane.config import stableread
from xdsplane.snapshot import Snapshot
from xdsplane.types import PUSH_ORDER, ResourceType
from xdsplane.watch import Reloader

NODE = ("edge-1", "edge")
WAIT = 10.0  # the longest any single wait may take before the test fails

CLUSTERS = """\
resources:
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: billing
    type: EDS
    connect_timeout: 1s
    eds_cluster_config:
      eds_config: {ads: {}, resource_api_version: V3}
  - "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
    cluster_name: billing
    endpoints:
      - lb_endpoints:
          - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8081}}}
"""

HCM_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.network"
    ".http_connection_manager.v3.HttpConnectionManager"
)
LISTENERS = """\
resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: http
    address: {socket_address: {address: 127.0.0.1, port_value: 10000}}
    filter_chains:
      - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": HCM_TYPE
              stat_prefix: http
              rds:
                route_config_name: http
                config_source: {ads: {}, resource_api_version: V3}
              http_filters:
                - name: envoy.filters.http.router
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
""".replace("HCM_TYPE", HCM_TYPE)


def routes(prefix: str = "/", cluster: str = "billing") -> str:
    return f"""\
resources:
  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: http
    virtual_hosts:
      - name: edge
        domains: ["*"]
        routes:
          - match: {{prefix: "{prefix}"}}
            route: {{cluster: {cluster}}}
"""


BROKEN_ROUTES = """\
resources:
  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: http
    virtual_hosts:
      - name: edge
        domains: ["*"]
        routes:
          - match: {prefix: "/"}
            route: {cluster: billing, timeout: soon}
"""


@pytest.fixture(autouse=True)
def _leases() -> None:
    stableread.install()  # SIGIO ignored: read-lease probes are allowed in this process


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "snapshots"
    d.mkdir()
    (d / "clusters.yaml").write_text(CLUSTERS)
    (d / "listeners.yaml").write_text(LISTENERS)
    (d / "routes.yaml").write_text(routes())
    return d


@pytest.fixture
def cache() -> SnapshotCache:
    return SnapshotCache()


def served(cache: SnapshotCache) -> Snapshot:
    assert cache.current is not None
    group = cache.current.group_for(*NODE)
    assert group is not None
    return group.snapshot


def route_prefix(snap: Snapshot) -> str:
    rc = snap.of(ResourceType.ROUTE)["http"].message
    return str(rc.virtual_hosts[0].routes[0].match.prefix)


def moved(a: Snapshot, b: Snapshot) -> set[str]:
    return {t.short for t in PUSH_ORDER if a.versions[t] != b.versions[t]}


async def holds(pred: Callable[[], bool], duration: float, what: str) -> None:
    """harness.holds_for on the event loop: ``pred`` stays true at every poll for
    ``duration`` seconds (negative checks only: "it keeps waiting")."""
    deadline = time.monotonic() + duration
    while True:
        assert pred(), f"stopped holding: {what}"
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.01)


async def until(pred: Callable[[], bool], timeout: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        await asyncio.sleep(0.005)


# -- reload() -------------------------------------------------------------------------------


async def test_good_edit_is_served_and_only_its_type_moves(
    folder: Path, cache: SnapshotCache
) -> None:
    r = Reloader(folder, cache)
    assert await r.reload("start") is True
    first = served(cache)
    assert route_prefix(first) == "/"
    notified: list[int] = []
    cache.watch(*NODE, lambda: notified.append(1))
    (folder / "routes.yaml").write_text(routes("/billing"))
    assert await r.reload() is True
    second = served(cache)
    assert second is not first
    assert route_prefix(second) == "/billing"
    assert moved(first, second) == {"RDS"}
    assert notified == [1]
    assert r.state.loaded and r.state.successes == 2 and r.state.errors == []
    # the same content again is nothing new: not served again, nobody notified
    assert await r.reload() is False
    assert served(cache) is second
    assert notified == [1]
    assert r.state.successes == 2 and r.state.unchanged == 1


async def test_broken_edit_keeps_the_last_good_snapshot(folder: Path, cache: SnapshotCache) -> None:
    r = Reloader(folder, cache)
    assert await r.reload("start") is True
    good = cache.current
    path = folder / "routes.yaml"
    path.write_text(BROKEN_ROUTES)
    assert await r.reload() is False
    assert cache.current is good
    assert r.state.failures == 1
    assert len(r.state.errors) == 1
    error = r.state.errors[0]
    assert error.startswith(f"{path}:9:"), error  # path:line:column of `timeout: soon`
    assert "Duration" in error  # the message does not name the field (see the report)
    assert r.state.failed_at > 0
    # a dangling reference is an error too, still with its file and line
    path.write_text(routes("/", cluster="nowhere"))
    assert await r.reload() is False
    assert cache.current is good
    assert r.state.errors[0].startswith(f"{path}:2"), r.state.errors
    assert "nowhere" in r.state.errors[0]
    # the next good edit is served and clears the errors
    path.write_text(routes("/fixed"))
    assert await r.reload() is True
    assert route_prefix(served(cache)) == "/fixed"
    assert r.state.errors == []
    assert (r.state.successes, r.state.failures) == (2, 2)


async def test_a_deleted_file_is_an_edit_too(folder: Path, cache: SnapshotCache) -> None:
    r = Reloader(folder, cache)
    assert await r.reload("start") is True
    good = cache.current
    (folder / "routes.yaml").unlink()
    assert await r.reload() is False  # the listener's RDS name now dangles
    assert cache.current is good
    assert any("http" in e for e in r.state.errors)


async def test_half_written_file_is_not_served_until_closed(
    folder: Path, cache: SnapshotCache
) -> None:
    r = Reloader(folder, cache, busy_timeout=WAIT)
    assert await r.reload("start") is True
    good = cache.current
    content = routes("/complete").encode()
    half = len(content) // 2
    fd = os.open(folder / "routes.yaml", os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, content[:half])
        os.fsync(fd)  # flushed: the bytes are visible to readers, the writer is not done
        task = asyncio.create_task(r.reload())
        await holds(
            lambda: not task.done() and cache.current is good,
            0.3,
            what="the reload keeps waiting while the writer holds the file open",
        )
        os.write(fd, content[half:])
    finally:
        os.close(fd)
    assert await asyncio.wait_for(task, WAIT) is True
    assert route_prefix(served(cache)) == "/complete"
    assert r.state.errors == []


async def test_file_held_open_too_long_is_an_error_and_nothing_changes(
    folder: Path, cache: SnapshotCache
) -> None:
    r = Reloader(folder, cache, busy_timeout=0.2)
    assert await r.reload("start") is True
    good = cache.current
    path = folder / "routes.yaml"
    with open(path, "w") as f:
        f.write(routes("/half")[:40])
        f.flush()
        assert await r.reload() is False
        assert cache.current is good
        assert len(r.state.errors) == 1
        assert "open for writing" in r.state.errors[0]
        assert r.state.errors[0].startswith(f"{path}: "), r.state.errors  # the file, named
    assert await r.reload() is False  # closed, but it is only half a file: a YAML error
    assert cache.current is good
    path.write_text(routes("/whole"))
    assert await r.reload() is True
    assert route_prefix(served(cache)) == "/whole"


async def test_unchanged_files_are_not_parsed_again(folder: Path, cache: SnapshotCache) -> None:
    r = Reloader(folder, cache)
    assert await r.reload("start") is True
    first = served(cache)
    (folder / "routes.yaml").write_text(routes("/other"))
    assert await r.reload() is True
    second = served(cache)
    # Resources of untouched files are the very same objects (not re-parsed, not re-encoded).
    for rtype in (ResourceType.CLUSTER, ResourceType.ENDPOINT, ResourceType.LISTENER):
        for name, res in first.of(rtype).items():
            assert second.of(rtype)[name] is res, (rtype.short, name)
    assert second.of(ResourceType.ROUTE)["http"] is not first.of(ResourceType.ROUTE)["http"]
    # Rewriting a file with identical bytes (new mtime, same content) reuses it as well.
    (folder / "clusters.yaml").write_text(CLUSTERS)
    assert await r.reload() is False  # nothing new to serve
    third = served(cache)
    assert third.of(ResourceType.CLUSTER)["billing"] is first.of(ResourceType.CLUSTER)["billing"]


async def test_parse_is_skipped_for_unchanged_files(
    folder: Path, cache: SnapshotCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xdsplane.pipeline.chunks as chunks_mod
    import xdsplane.pipeline.folder as loader_mod

    parsed: list[str] = []
    real = loader_mod.parse

    def counting(text: str, path: str, **options: Any) -> object:
        parsed.append(Path(path).name)
        return real(text, path, **options)

    monkeypatch.setattr(loader_mod, "parse", counting)
    monkeypatch.setattr(chunks_mod, "parse", counting)  # a raw file's changed entries
    r = Reloader(folder, cache)
    assert await r.reload("start") is True
    assert sorted(parsed) == ["clusters.yaml", "listeners.yaml", "routes.yaml"]
    parsed.clear()
    (folder / "routes.yaml").write_text(routes("/again"))
    assert await r.reload() is True
    assert parsed == ["routes.yaml"]
    parsed.clear()
    assert await r.reload() is False  # nothing changed
    assert parsed == []


async def test_the_event_loop_keeps_running_while_a_load_is_in_progress(
    folder: Path, cache: SnapshotCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The load runs in a worker thread: while it takes its time, the event loop (ADS
    streams, the admin server) keeps running and the last good snapshot is served."""
    r = Reloader(folder, cache)
    assert await r.reload("start") is True
    entered, release = threading.Event(), threading.Event()
    real = r.loader.load

    def slow() -> object:
        entered.set()
        assert release.wait(WAIT), "never released: the event loop was blocked by the load"
        return real()

    monkeypatch.setattr(r.loader, "load", slow)
    (folder / "routes.yaml").write_text(routes("/later"))
    task = asyncio.create_task(r.reload())
    await until(entered.is_set, what="the load to start")
    for _ in range(5):  # timers fire: the loop is not held by the load
        await asyncio.sleep(0.01)
    assert not task.done()
    assert route_prefix(served(cache)) == "/"
    assert r.state.attempts == 2 and r.state.errors == []
    release.set()
    assert await asyncio.wait_for(task, WAIT) is True
    assert route_prefix(served(cache)) == "/later"


def test_file_busy_is_retried_within_one_budget() -> None:
    """reload.retry_busy: a file busy for a moment is read again; one busy for longer than
    the budget is an error naming the file (a rotation seen half-way: its own errors)."""
    calls: list[int] = []

    def busy_twice() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise stableread.FileBusy("/x/routes.yaml: the file is open for writing")
        return "loaded"

    assert reload_helper.retry_busy(busy_twice) == "loaded" and len(calls) == 3

    def always_busy() -> str:
        raise stableread.FileBusy("/x/routes.yaml: the file is open for writing")

    started = time.monotonic()
    with pytest.raises(reload_helper.Refused) as e:
        reload_helper.retry_busy(always_busy, budget=0.05)
    assert time.monotonic() - started < WAIT
    assert e.value.errors == [
        "/x/routes.yaml: the file is open for writing (gave up after waiting 0.05s)"
    ]

    def half_rotated() -> str:
        raise reload_helper.Settling(["--tls-key k: does not match the certificate"])

    with pytest.raises(reload_helper.Refused) as e:
        reload_helper.retry_busy(half_rotated, budget=0.05)
    assert e.value.errors == ["--tls-key k: does not match the certificate"]
    assert reload_helper.BUSY_BUDGET_SECONDS == 5.0  # the documented budget (docs/deploy.md)


# -- the watch loop -------------------------------------------------------------------------


class Watching:
    """Reloader.run in a task, stopped and awaited at the end of the test."""

    def __init__(self, folder: Path, cache: SnapshotCache) -> None:
        self.folder = folder
        self.cache = cache
        self.reloader = Reloader(folder, cache, step_ms=2, busy_timeout=WAIT)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watching:
        assert await self.reloader.reload("start") is True
        self.task = asyncio.create_task(self.reloader.run(self.stop))
        # The watcher has no "ready" signal: repeat a harmless edit until one is picked up.
        path = self.folder / "routes.yaml"
        deadline = time.monotonic() + WAIT
        attempt = 0
        while True:
            attempt += 1
            path.write_text(routes(f"/warm-{attempt}"))
            try:
                await self.wait_prefix(f"/warm-{attempt}", timeout=0.5)
                return self
            except AssertionError:
                if time.monotonic() > deadline:
                    raise

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, WAIT)

    async def wait_prefix(self, prefix: str, timeout: float = WAIT) -> None:
        await until(
            lambda: self.cache.current is not None and route_prefix(served(self.cache)) == prefix,
            timeout,
            f"route prefix {prefix!r} to be served",
        )


async def test_watch_loop_picks_up_write_in_place(folder: Path, cache: SnapshotCache) -> None:
    async with Watching(folder, cache) as w:
        with open(folder / "routes.yaml", "r+") as f:  # truncate and rewrite the same inode
            ino = os.fstat(f.fileno()).st_ino
            f.truncate(0)
            f.write(routes("/in-place"))
        await w.wait_prefix("/in-place")
        assert (folder / "routes.yaml").stat().st_ino == ino


async def test_watch_loop_picks_up_write_then_rename(folder: Path, cache: SnapshotCache) -> None:
    async with Watching(folder, cache) as w:
        for tmp_name in (".routes.yaml.tmp", "routes.yaml.swx", "4913"):
            tmp = folder / tmp_name
            tmp.write_text(routes(f"/renamed-{tmp_name}"))
            os.replace(tmp, folder / "routes.yaml")
            await w.wait_prefix(f"/renamed-{tmp_name}")


async def test_watch_loop_picks_up_delete_and_create(folder: Path, cache: SnapshotCache) -> None:
    async with Watching(folder, cache) as w:
        path = folder / "routes.yaml"
        path.unlink()
        # In between, the folder does not load (the listener's routes are gone) or the
        # reload has not run yet: either way the last good snapshot is what is served.
        assert route_prefix(served(cache)).startswith("/warm-")
        path.write_text(routes("/recreated"))
        await w.wait_prefix("/recreated")
        await until(lambda: w.reloader.state.errors == [], what="errors cleared")


async def test_watch_loop_picks_up_a_new_file_and_keeps_serving_on_a_bad_one(
    folder: Path, cache: SnapshotCache
) -> None:
    async with Watching(folder, cache) as w:
        good = served(cache)
        bad = folder / "zz-extra.yaml"
        bad.write_text("resources: [\n")
        await until(lambda: bool(w.reloader.state.errors), what="the YAML error to be reported")
        assert w.reloader.state.errors[0].startswith(f"{bad}:")
        assert served(cache) is good
        bad.write_text(routes("/x").replace("name: http", "name: extra"))
        await until(
            lambda: "extra" in served(cache).of(ResourceType.ROUTE),
            what="the new RouteConfiguration",
        )
        assert w.reloader.state.errors == []


async def test_watch_loop_stops_promptly(folder: Path, cache: SnapshotCache) -> None:
    """Stopping does not wait for a file change (there is none coming): the task ends
    within WAIT, a ceiling for a busy machine (it takes milliseconds)."""
    w = Watching(folder, cache)
    await w.__aenter__()  # the watch is running: it picked up an edit
    w.stop.set()
    assert w.task is not None
    await asyncio.wait_for(w.task, WAIT)


async def test_watch_loop_survives_the_folder_being_replaced(
    folder: Path, cache: SnapshotCache
) -> None:
    """Deleting the folder and creating it again (a checkout, a volume remount) is followed."""
    import shutil

    async with Watching(folder, cache) as w:
        backup = folder.parent / "backup"
        shutil.copytree(folder, backup)
        shutil.rmtree(folder)
        await until(
            lambda: any("folder gone" in e or str(folder) in e for e in w.reloader.state.errors),
            what="the watcher notices the folder is gone",
        )
        shutil.copytree(backup, folder)
        (folder / "routes.yaml").write_text(routes("/after-remount"))
        await w.wait_prefix("/after-remount")


async def test_watch_loop_tells_the_loader_what_changed(folder: Path, cache: SnapshotCache) -> None:
    """The watch names the files it saw change to the loader (which then looks only at
    those), and says when it is in place and when it stops (every file checked again)."""
    told: list[set[str] | None] = []
    w = Watching(folder, cache)
    real = w.reloader.loader.changed

    def spy(paths: Any) -> None:
        told.append(None if paths is None else set(paths))
        real(paths)

    w.reloader.loader.changed = spy  # type: ignore[method-assign]
    async with w:
        assert w.reloader.loader._tracking
        told.clear()
        path = folder / "routes.yaml"
        tmp = folder / ".routes.yaml.tmp"
        tmp.write_text(routes("/told"))
        os.replace(tmp, path)
        await w.wait_prefix("/told")
        named = {os.path.abspath(p) for paths in told if paths is not None for p in paths}
        assert os.path.abspath(path) in named, told
        assert await w.reloader.reload("SIGHUP") is False  # not from the watch: not known
        assert told[-1] is None
    assert not w.reloader.loader._tracking


async def test_watch_loop_serves_a_change_it_did_not_report(
    folder: Path, cache: SnapshotCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event the watch drops (here: filtered out) is found when the watch is idle: the
    loader is asked what it reused without a stat (``unseen``) and the folder reloaded."""
    import xdsplane.pipeline.folder as folder_mod

    monkeypatch.setattr(folder_mod, "SETTLED_SECONDS", -1.0)  # every file counts as settled
    async with Watching(folder, cache) as w:
        real = w.reloader._relevant
        routes_path = os.path.abspath(folder / "routes.yaml")
        monkeypatch.setattr(
            w.reloader,
            "_relevant",
            lambda change, path: os.path.abspath(path) != routes_path and real(change, path),
        )
        await w.reloader.reload("SIGHUP")  # every file checked (and trusted) from here
        tmp = folder / ".routes.yaml.tmp"
        tmp.write_text(routes("/unreported"))
        os.replace(tmp, folder / "routes.yaml")
        await w.wait_prefix("/unreported")

"""Where replicas' files come from (docs/scaling.md): the ways a policy folder changes on a
host other than by an editor's save, and that ``xdsplane serve`` follows each.

- a git checkout switched by a symlink swap (``--config current``, ``current`` renamed from
  a new link to the new checkout): followed, and the version served is the content's, the
  same as a replica started on the new checkout directly;
- a shared volume written from another host (NFS): inotify never reports those writes. A
  write through a shared memory map is the local change inotify does not report either
  (inotify(7): "modifications that may occur because of mmap(2) ... are not reported"),
  so it stands in for the remote write: ``--poll`` sees it, the inotify watch does not.

The Kubernetes ConfigMap (``..data`` swap) is test_file_faults.py's
test_kubernetes_symlink_swap_under_load.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

from harness import ProcessGroup, XdsServer, wait_until, write_atomic


def policy(timeout_ms: int) -> str:
    """One listener and one upstream; ``timeout_ms`` (4 digits) changes the CDS version."""
    assert 1000 <= timeout_ms <= 9999
    return (
        "listeners:\n"
        "  - name: http\n"
        "    address: 127.0.0.1:10000\n"
        "    hosts:\n"
        "      - name: api\n"
        '        domains: ["*"]\n'
        "        routes:\n"
        "          - {prefix: /, upstream: app}\n"
        "upstreams:\n"
        f'  app: {{endpoints: ["127.0.0.1:10001"], connect_timeout: {timeout_ms}ms}}\n'
    )


def cds(server: XdsServer) -> str:
    version: str = server.status()["groups"][0]["versions"]["CDS"]
    return version


def test_symlink_swapped_checkout_is_followed(procs: ProcessGroup, tmp_path: Path) -> None:
    """A checkout pulled into a new folder, then ``current`` switched in one rename: the
    replica serving ``current`` moves to the new content, and its version is the one a
    replica started on the new checkout directly serves (content-derived)."""
    releases = tmp_path / "releases"
    for name, timeout in (("a", 1000), ("b", 2000)):
        (releases / name).mkdir(parents=True)
        (releases / name / "policy.yaml").write_text(policy(timeout))
    current = tmp_path / "current"
    current.symlink_to(releases / "a")
    served = XdsServer(procs, current, name="replica-current").launch()
    direct_b = XdsServer(procs, releases / "b", name="replica-b").launch()
    served.wait_ready()
    direct_b.wait_ready()
    before = cds(served)
    assert before != cds(direct_b)

    tmp_link = tmp_path / ".current.tmp"
    tmp_link.symlink_to(releases / "b")
    os.replace(tmp_link, current)  # atomic: `ln -sfn` is not (unlink, then symlink)

    # The watch wakes every 250 ms to notice its folder replaced; 10 s covers a busy machine.
    wait_until(lambda: cds(served) != before, 10, what="the swapped checkout served")
    assert cds(served) == cds(direct_b)
    assert served.status()["reload"]["errors"] == []


def mmap_write(path: Path, old: bytes, new: bytes) -> None:
    """Replace ``old`` with ``new`` (same length) through a shared memory map: the file
    changes (content and mtime) with no inotify event. The descriptor, opened for writing,
    is closed before the write, so its close event comes first and says nothing new."""
    assert len(old) == len(new)
    fd = os.open(path, os.O_RDWR)
    try:
        m = mmap.mmap(fd, 0)
    finally:
        os.close(fd)
    with m:
        at = m.find(old)
        assert at >= 0
        m[at : at + len(old)] = new
        m.flush()


def next_second(path: Path) -> None:
    """Wait (at most ~1 s) until the clock is past the second of ``path``'s mtime: the
    poller (watchfiles/notify) misses a change made within the same second as the one
    before it (measured here; docs/scaling.md says so). Not a synchronisation: the write
    that follows is what the test is about, and it must be one a poller can see."""
    limit = int(path.stat().st_mtime) + 1.05
    while time.time() < limit:
        time.sleep(0.05)


def test_poll_sees_a_write_inotify_does_not(procs: ProcessGroup, tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "policy.yaml").write_text(policy(1000))
    polling = XdsServer(procs, folder, name="replica-poll", extra_args=["--poll", "50"])
    inotify = XdsServer(procs, folder, name="replica-inotify")
    for s in (polling, inotify):
        s.launch()
    for s in (polling, inotify):
        s.wait_ready()
    first = cds(polling)
    assert cds(inotify) == first
    # An ordinary edit first, seen by both: each watch is in place (a poll compares with
    # its previous scan, so it must have scanned before the write that follows).
    next_second(folder / "policy.yaml")
    write_atomic(folder / "policy.yaml", policy(1500))
    for s in (polling, inotify):
        wait_until(lambda s=s: cds(s) != first, 10, what=f"{s.proc.name} saw the edit")
    before = cds(polling)
    assert cds(inotify) == before

    next_second(folder / "policy.yaml")
    mmap_write(folder / "policy.yaml", b"1500ms", b"2000ms")
    written = time.monotonic()
    wait_until(lambda: cds(polling) != before, 10, what="the polling replica reloaded")
    # The control: the inotify replica never hears of it. Given as long again as the polling
    # one took, and at least 1 s (four of its 250 ms wake-ups), it still serves the old file.
    quiet = max(1.0, time.monotonic() - written)
    end = time.monotonic() + quiet
    while time.monotonic() < end:
        assert cds(inotify) == before, "inotify saw the mmap write: the test proves nothing"
        time.sleep(0.05)

    # What the polling replica serves is what a fresh replica on the same files serves.
    fresh = XdsServer(procs, folder, name="replica-fresh").start()
    assert cds(polling) == cds(fresh) != before


def test_poll_takes_whole_milliseconds() -> None:
    for bad in ("0", "-5", "fast"):
        r = subprocess.run(
            [sys.executable, "-m", "xdsplane", "serve", "--poll", bad],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2, r
        assert "--poll" in r.stderr and "milliseconds" in r.stderr, r.stderr

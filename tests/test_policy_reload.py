"""Live reload of a policy through `xdsplane serve`: editor-style saves, broken saves.

Each save is picked up exactly once (one reload that changes what is served, never an
intermediate state such as the folder without a file being re-created); a broken save
keeps the last good snapshot, and its error is in /status and the log, until a good save.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import ProcessGroup, XdsServer, holds_for, wait_until, write_atomic

UPSTREAMS = "upstreams:\n  web: {endpoints: [127.0.0.1:9]}\n"


def listeners(body: str) -> str:
    return f"""listeners:
  - name: http
    address: 127.0.0.1:10000
    hosts:
      - name: web
        domains: ["*"]
        routes:
          - {{path: /hello, direct_response: {{status: 200, body: "{body}"}}}}
          - {{prefix: /, upstream: web}}
"""


def write_in_place(path: Path, text: str) -> None:
    with open(path, "w") as f:  # truncate and write the same inode, as many editors do
        f.write(text)


def delete_and_create(path: Path, text: str) -> None:
    path.unlink()
    time.sleep(0.02)  # a gap an editor may well leave
    path.write_text(text)


SAVES: dict[str, Callable[[Path, str], None]] = {
    "write-in-place": write_in_place,
    "write-then-rename": write_atomic,
    "delete-and-create": delete_and_create,
}


def rds_version(server: XdsServer) -> str:
    (group,) = server.status()["groups"]
    return str(group["versions"]["RDS"])


@pytest.fixture
def served(procs: ProcessGroup, tmp_path: Path) -> tuple[XdsServer, Path]:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "upstreams.yaml").write_text(UPSTREAMS)
    (folder / "listeners.yaml").write_text(listeners("v0"))
    return XdsServer(procs, folder).start(), folder


@pytest.mark.parametrize("style", list(SAVES))
def test_editor_saves_are_picked_up_once_each(style: str, served: tuple[XdsServer, Path]) -> None:
    server, folder = served
    for i in range(1, 4):
        before = server.status()["reload"]
        version = rds_version(server)
        SAVES[style](folder / "listeners.yaml", listeners(f"v{i}-{style}"))
        wait_until(lambda v=version: rds_version(server) != v, 5, what=f"save {i} served")
        # exactly one reload changed what is served, and no second one follows
        holds_for(
            lambda b=before: server.status()["reload"]["successes"] == b["successes"] + 1, 0.5
        )
        assert server.status()["reload"]["failures"] == before["failures"]


def test_a_broken_save_keeps_the_last_good_snapshot(served: tuple[XdsServer, Path]) -> None:
    server, folder = served
    good = server.status()
    version = rds_version(server)
    write_atomic(
        folder / "listeners.yaml", listeners("v1").replace("upstream: web", "upstream: nope")
    )

    def error() -> str | None:
        errors = server.status()["reload"]["errors"]
        return errors[0] if errors else None

    message = wait_until(error, 5, what="the error in /status")
    assert message.startswith(f"{folder}/listeners.yaml:9:"), message
    assert "no upstream named 'nope'" in message
    assert rds_version(server) == version  # still the last good snapshot
    assert server.status()["groups"] == good["groups"]
    logged = [
        json.loads(line)
        for line in server.proc.log_path.read_text().splitlines()
        if line.startswith("{")
    ]
    assert any(e.get("error") == message and e["level"] == "error" for e in logged), logged[-5:]
    # the next good save is served and clears the error
    write_atomic(folder / "listeners.yaml", listeners("v2"))
    wait_until(lambda: rds_version(server) != version, 5, what="the good save served")
    assert server.status()["reload"]["errors"] == []


def test_unrelated_files_do_not_reload(served: tuple[XdsServer, Path]) -> None:
    server, folder = served
    before = server.status()["reload"]
    (folder / ".listeners.yaml.swp").write_bytes(b"vim swap")
    (folder / "notes.txt").write_text("not a policy")
    os.utime(folder / "listeners.yaml")  # touched, same content

    def counts() -> tuple[int, int]:
        st = server.status()["reload"]
        return st["successes"], st["failures"]

    unchanged = (before["successes"], before["failures"])
    # The watcher reacts within milliseconds (--watch-step-ms 2): a second without a reload
    # is a negative result, not a slow machine's.
    holds_for(lambda: counts() == unchanged, 1.0, what="no reload for files that are not policy")
    # ... and it was watching all along: a real edit is one reload.
    write_atomic(folder / "listeners.yaml", listeners("v2"))
    wait_until(lambda: counts()[0] > before["successes"], 10, what="the edit reloaded")
    assert counts() == (before["successes"] + 1, before["failures"])

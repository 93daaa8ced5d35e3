"""Operating `xdsplane serve`: it refuses to start on a folder that does not load (errors
listed), SIGHUP reloads, SIGTERM stops it."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from harness import (
    ProcessGroup,
    XdsServer,
    direct,
    free_port,
    listener,
    route_config,
    wait_until,
    write_snapshot,
)


def test_serve_refuses_to_start_on_a_folder_that_does_not_load(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.yaml").write_text("listeners:\n  - name: http\n    adress: 127.0.0.1:1\n")
    r = subprocess.run(
        [sys.executable, "-m", "xdsplane", "serve", "--config", str(folder),
         "--xds-address", f"127.0.0.1:{free_port()}",
         "--admin-address", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 1
    assert f"{folder}/a.yaml:3:5: unknown key 'adress'" in r.stderr
    assert "not starting" in r.stderr
    assert "Traceback" not in r.stderr


def test_sighup_reloads_and_sigterm_stops(procs: ProcessGroup, tmp_path: Path) -> None:
    folder = tmp_path / "snapshots"
    folder.mkdir()
    write_snapshot(
        folder / "edge.yaml",
        [listener("http", free_port()), route_config("http", [direct("/", "hello")])],
    )
    server = XdsServer(procs, folder).start()
    before = server.status()["reload"]["attempts"]
    server.proc.send(signal.SIGHUP)
    wait_until(lambda: server.status()["reload"]["attempts"] == before + 1, 10, what="reload")
    assert server.proc.alive()
    assert server.proc.stop(timeout=15, sig=signal.SIGTERM) == 0

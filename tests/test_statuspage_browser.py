"""The status page, rendered by a real headless browser (Debian's chromium): it shows a
connected node and its acknowledged types; a screenshot is kept in test-artifacts/.

CI installs chromium (.ci/run) and sets XDSPLANE_REQUIRE_BROWSER=1, so there a missing
browser fails the test; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from harness import (
    Envoy,
    ProcessGroup,
    XdsServer,
    direct,
    free_port,
    listener,
    route_config,
    wait_until,
    write_snapshot,
)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("XDSPLANE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium is required here (apt-get install chromium)")
        pytest.skip("no chromium on this machine (apt-get install chromium)")
    return found


def chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


@pytest.mark.envoy
def test_status_page_in_a_real_browser(procs: ProcessGroup, tmp_path: Path) -> None:
    binary = browser()
    folder = tmp_path / "snapshots"
    folder.mkdir()
    port = free_port()
    write_snapshot(
        folder / "edge.yaml",
        [listener("http", port), route_config("http", [direct("/", "hello")])],
    )
    server = XdsServer(procs, folder).start()
    Envoy(procs, tmp_path, "edge-browser", server.xds_address).start()
    wait_until(lambda: server.settled("edge-browser", ("LDS", "RDS")), 20, what="Envoy ACKed")
    url = f"http://127.0.0.1:{server.admin_port}/"

    # The console goes to stderr: a Content-Security-Policy violation (the page's style
    # refused by the admin server's CSP) shows there.
    dom = chromium(
        binary, tmp_path / "profile-dom", "--enable-logging=stderr", "--v=0", "--dump-dom", url
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Content Security Policy" not in dom.stderr, dom.stderr[-2000:]
    assert "edge-browser" in dom.stdout
    assert "LDS" in dom.stdout and "RDS" in dom.stdout
    assert "PRIVATE KEY" not in dom.stdout

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    taken = chromium(
        binary, tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1280,900", url
    )
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 10_000  # a rendered page, not a blank

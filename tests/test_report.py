"""`xdsplane report` and the status page's access matrix, in a real headless Chromium.

The evidence page must render on its own (inline CSS, no script), show the matrix, every
case with its result, the commit (dirty or not) and the certificates' expiry, never a key,
and fetch nothing: hostile policy and case text (an <img> pointing at a local server that
counts hits) stays text. The status page of a running `serve` shows the same matrix for the
served config, and /status carries it.

One test runs the real runner (`xdsplane test`'s: one real Envoy) on the sample's cases;
the others stub the runner only (`report.default_runner`), to feed hostile case text and
a failing case: the matrix, the git state, the certificates and the page are real.
"""

from __future__ import annotations

import html
import http.server
import shutil
import subprocess
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import ClassVar

import pytest
from harness import ProcessGroup, XdsServer, free_port, xdsplane_argv
from test_sample import sample_copy
from test_statuspage_browser import ARTIFACTS, browser, chromium

from xdsplane import pki
from xdsplane.cli import main
from xdsplane.policytest import report
from xdsplane.policytest.results import CaseResult


class _Hits(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Hits.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def trap() -> Iterator[tuple[int, list[str]]]:
    """A local HTTP server that records every request: the page must send it none."""
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Hits)
    _Hits.hits = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port, _Hits.hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _git(folder: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
        cwd=folder,
        check=True,
        capture_output=True,
        timeout=30,
    )


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def _results(port: int) -> list[CaseResult]:
    hostile = f"<img src=http://127.0.0.1:{port}/case> & <script>fetch('/x')</script>"
    return [
        CaseResult(
            "cases.yaml", 3, "admin needs a client certificate", True, "status 403", "status 403"
        ),
        CaseResult(
            "cases.yaml", 7, hostile, False, "status 200, upstream billing", "status 403", hostile
        ),
    ]


def test_report_in_a_real_browser(
    tmp_path: Path, trap: tuple[int, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = browser()
    port, hits = trap
    folder, _ = sample_copy(tmp_path)
    policy = folder / "billing-edge.yaml"
    hostile_san = f"spiffe://example.com/ops/<img src=http://127.0.0.1:{port}/san>"
    text = policy.read_text().replace('"spiffe://example.com/ops/*"', f'"{hostile_san}"')
    policy.write_text(text)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "snapshots")
    _git(tmp_path, "commit", "-q", "-m", "policy")
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, timeout=30
    ).stdout.strip()
    cases = tmp_path / "cases.yaml"
    cases.write_text("cases: []\n")
    calls: list[tuple[Path, list[Path], str | None]] = []

    def runner(p: Path, c: list[Path], node: str | None) -> list[CaseResult]:
        calls.append((p, c, node))
        return _results(port)

    monkeypatch.setattr(report, "default_runner", lambda envoy_binary: runner)
    out = tmp_path / "evidence.html"
    assert main(["report", str(folder), str(cases), "--out", str(out), "--node", "edge-1"]) == 1
    assert calls == [(folder, [cases], "edge-1")]
    html = out.read_text()
    assert commit in html and "clean" in html

    # nothing to fetch, nothing to run: no script, image, link or frame; no src or href
    tags = _Tags()
    tags.feed(html)
    assert not tags.tags & {"script", "img", "link", "iframe", "object", "embed", "base"}
    assert not tags.attrs & {"src", "href", "srcset", "action", "background"}
    assert "PRIVATE KEY" not in html
    for key in (tmp_path / "certs").glob("*.key"):
        body = "".join(key.read_text().splitlines()[1:-1])
        assert body[:40] not in html

    dom = chromium(binary, tmp_path / "profile", "--dump-dom", out.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "Access matrix" in page and "certificate-only" in page
    assert "admin needs a client certificate" in page and "PASS" in page and "FAIL" in page
    assert "&lt;img src=http://127.0.0.1" in page and "<img" not in page
    assert "edge-server" in page and "not after" in page  # the certificates' expiry
    assert "1 of 2 case(s) failed" in page
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "evidence-report.png"
    shot.unlink(missing_ok=True)
    taken = chromium(
        binary,
        tmp_path / "profile-shot",
        f"--screenshot={shot}",
        "--window-size=1400,1000",
        out.as_uri(),
    )
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 10_000
    assert hits == []

    # an edit not committed: the page says so
    policy.write_text(text + "\n# edited\n")
    monkeypatch.setattr(report, "default_runner", lambda e: lambda p, c, n: _results(port)[:1])
    assert main(["report", str(folder), str(cases), "--out", str(out)]) == 0
    html = out.read_text()
    assert "uncommitted changes" in html and "billing-edge.yaml" in html


def test_report_outside_git_and_on_a_broken_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, _ = sample_copy(tmp_path)
    monkeypatch.setattr(report, "default_runner", lambda e: lambda p, c, n: _results(1)[:1])
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    out = tmp_path / "r.html"
    assert main(["report", str(folder), str(tmp_path / "c.yaml"), "--out", str(out)]) == 0
    assert "not in a git work tree" in out.read_text()
    (folder / "broken.yaml").write_text("listeners: 3\n")
    out.unlink()
    assert main(["report", str(folder), str(tmp_path / "c.yaml"), "--out", str(out)]) == 1
    assert "does not load" in capsys.readouterr().err and not out.exists()


def test_status_page_shows_the_served_matrix(procs: ProcessGroup, tmp_path: Path) -> None:
    binary = browser()
    folder, _ = sample_copy(tmp_path)
    server = XdsServer(procs, folder).start()
    status = server.status()
    rows = {(r["host"], r["route"]): r for g in status["groups"] for r in g["access"]}
    assert rows[("billing", "admin")]["who"] == "certificate-only"
    assert rows[("billing", "admin")]["client_sans"] == ["spiffe://example.com/ops/*"]
    assert rows[("billing", "billing")]["replay_protection"] is True

    url = f"http://127.0.0.1:{server.admin_port}/"
    dom = chromium(
        binary, tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", url
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Content Security Policy" not in dom.stderr, dom.stderr[-2000:]
    page = dom.stdout
    assert "Access matrix (served config)" in page and "nodes edge-*" in page
    assert "certificate-only" in page and "spiffe://example.com/ops/*" in page
    assert "SHADOW" not in page and "PRIVATE KEY" not in page


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.envoy
def test_report_runs_the_sample_cases_on_a_real_envoy(tmp_path: Path) -> None:
    """The command as an assessor runs it: a subprocess, the real runner, a real Envoy."""
    binary = browser()
    folder = tmp_path / "snapshots"  # as shipped: the cases expect its redirect port
    shutil.copytree(REPO / "snapshots", folder)
    pki.init(tmp_path / "certs")
    cases = REPO / "policy-tests" / "billing-edge.yaml"
    out = tmp_path / "evidence.html"
    done = subprocess.run(
        [*xdsplane_argv("report", str(folder), str(cases), "--out", str(out))],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    dom = chromium(binary, tmp_path / "profile", "--dump-dom", out.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = dom.stdout
    assert "all cases passed" in page and "FAIL" not in page
    names = [
        html.escape(line.split("- name: ", 1)[1].strip().strip('"'), quote=False)
        for line in cases.read_text().splitlines()
        if "- name: " in line
    ]
    assert len(names) > 5 and all(n in page for n in names), [n for n in names if n not in page]
    assert page.count("PASS") == len(names)
    assert "certificate-only" in page and "policy commit" in page


def test_report_on_bad_cases_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real runner refuses a bad cases file (before any Envoy): exit 2, no page."""
    folder, _ = sample_copy(tmp_path)
    bad = tmp_path / "cases.yaml"
    bad.write_text("cases:\n  - name: x\n    request: {host: billing.example.com}\n")
    out = tmp_path / "r.html"
    assert main(["report", str(folder), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "cases.yaml" in err and "nothing written" in err
    assert not out.exists()

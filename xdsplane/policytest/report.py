"""``xdsplane report``: one self-contained HTML page of evidence for an assessor.

The page holds the access matrix (policy/matrix.py), every policy test case with its
result (run by ``xdsplane test``'s runner against a real Envoy), the policy folder's git
commit and whether it has uncommitted changes, each served certificate's subject and expiry
(never a key), when it was generated and by which xdsplane. Inline CSS only: no script, no
image, no font, no link to fetch, and a Content-Security-Policy that forbids any. Every
text from the policy or the cases is escaped: policy text is input, not markup.
"""

from __future__ import annotations

import datetime
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from xdsplane import __version__
from xdsplane.atomicwrite import write_atomic
from xdsplane.policy import matrix_render
from xdsplane.policy.matrix import access_matrix
from xdsplane.policytest.results import CaseResult

Runner = Callable[[Path, list[Path], str | None], list[CaseResult]]
GIT_TIMEOUT = 10.0

CSP = "default-src 'none'; style-src 'unsafe-inline'"
_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; } td { vertical-align: top; }
.pass { color: #1b5e20; font-weight: 600; } .fail { color: #b00020; font-weight: 600; }
tr.open td { background: #fff4e5; } .muted { color: #777; } code { font-size: 0.95em; }
"""


class NotLoaded(Exception):
    """The policy folder does not load: nothing to report."""

    def __init__(self, folder: Path, errors: Sequence[str]) -> None:
        super().__init__(f"{folder} does not load ({len(errors)} error(s))")
        self.errors = list(errors)


@dataclass(frozen=True)
class GitState:
    commit: str
    dirty: bool
    changed: tuple[str, ...]  # paths under the folder with uncommitted changes


@dataclass(frozen=True)
class Evidence:
    policy_dir: str
    node: str | None
    groups: list[dict[str, Any]]
    results: list[CaseResult]
    cases_files: list[str]
    git: GitState | None
    certificates: list[dict[str, Any]]
    generated_at: datetime.datetime = field(
        default_factory=lambda: datetime.datetime.now(datetime.UTC)
    )
    version: str = __version__


def git_state(folder: Path) -> GitState | None:
    """The commit checked out where ``folder`` lives and its uncommitted changes; None
    when it is not in a git work tree (or git is not installed)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(folder), *args],
                capture_output=True,
                text=True,
                timeout=GIT_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=all", "--", ".") or ""
    changed = tuple(line[3:] for line in status.splitlines() if line.strip())
    return GitState(commit.strip(), bool(changed), changed)


def default_runner(envoy_binary: str | None = None) -> Runner:
    """``xdsplane test``'s runner (policytest/run.py): one real Envoy, hermetic."""
    from xdsplane.policytest.run import run_cases

    def run(folder: Path, cases: list[Path], node: str | None) -> list[CaseResult]:
        return run_cases(folder, cases, node=node, envoy_binary=envoy_binary)

    return run


def collect(
    folder: Path, cases: list[Path], node: str | None, run: Runner | None = None
) -> Evidence:
    """Load ``folder``, run ``cases`` and gather the rest; raises NotLoaded, and the
    runner's PolicyTestError (bad cases, no Envoy)."""
    from xdsplane import pipeline

    loaded = pipeline.load(folder)
    if loaded.snapshots is None:
        raise NotLoaded(folder, loaded.errors)
    snapshots = loaded.snapshots
    groups = list(snapshots.groups)
    if node is not None:
        chosen = snapshots.group_for(node, node)
        groups = [chosen] if chosen is not None else []
    secrets = {n for g in groups if g.policy is not None for n in g.policy.secrets}
    certs = [
        {k: v for k, v in c.as_dict().items() if k != "path"} | {"file": Path(c.path).name}
        for c in snapshots.certificates
        if node is None or c.secret in secrets
    ]
    results = (run or default_runner())(folder, cases, node)
    return Evidence(
        policy_dir=str(folder),
        node=node,
        groups=[
            {
                "group": g.name,
                "rows": [r.as_json() for r in access_matrix(g.policy)] if g.policy else [],
            }
            for g in groups
        ],
        results=results,
        cases_files=[str(c) for c in cases],
        git=git_state(folder),
        certificates=certs,
    )


def _e(value: object) -> str:
    text = "".join(c if c.isprintable() or c in "\n\t" else "?" for c in str(value))
    return escape(text, quote=True)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>\n" for r in rows)
    attr = f" class='{cls}'" if cls else ""
    head_row = f"<tr>{head}</tr>\n" if any(headers) else ""
    return f"<table{attr}>\n{head_row}{body}</table>\n"


def _cases(results: Sequence[CaseResult]) -> str:
    if not results:
        return "<p class='fail'>No case was run.</p>\n"
    rows = [
        [
            f"<code>{_e(r.file)}:{_e(r.line)}</code>",
            _e(r.name),
            "<span class='pass'>PASS</span>" if r.passed else "<span class='fail'>FAIL</span>",
            _e(r.expected),
            _e(r.got),
            _e(r.detail),
        ]
        for r in results
    ]
    return _table(["case", "name", "result", "expected", "got", "detail"], rows, "cases")


def _certs(certs: Sequence[dict[str, Any]]) -> str:
    if not certs:
        return "<p class='muted'>No certificates are served.</p>\n"
    rows = [
        [
            _e(c.get("secret", "")),
            _e(c.get("file", "")),
            _e(c.get("subject", "")),
            _e(c.get("issuer", "")),
            _e(", ".join(map(str, [*c.get("dns", []), *c.get("uris", [])]))),
            _e(c.get("not_after", "")),
            _e(c.get("days_left", "")),
            f"<code>{_e(c.get('fingerprint_sha256', ''))}</code>",
        ]
        for c in certs
    ]
    headers = ["secret", "file", "subject", "issuer", "SANs", "not after", "days left", "SHA-256"]
    return _table(headers, rows, "certificates")


def _git(state: GitState | None) -> str:
    if state is None:
        return "not in a git work tree: no commit to name"
    text = f"<code>{_e(state.commit)}</code>"
    if state.dirty:
        shown = ", ".join(state.changed[:20]) + (" ..." if len(state.changed) > 20 else "")
        return text + f" <span class='fail'>with uncommitted changes</span> ({_e(shown)})"
    return text + " <span class='pass'>clean</span> (no uncommitted change in the folder)"


def render(ev: Evidence) -> str:
    failed = sum(1 for r in ev.results if not r.passed)
    verdict = (
        "<span class='pass'>all cases passed</span>"
        if ev.results and not failed
        else f"<span class='fail'>{failed} of {len(ev.results)} case(s) failed</span>"
        if ev.results
        else "<span class='fail'>no case was run</span>"
    )
    matrix = "".join(
        f"<h3>nodes {_e(g['group'])}</h3>\n{matrix_render.html(g['rows'])}" for g in ev.groups
    )
    facts = [
        ["policy folder", f"<code>{_e(ev.policy_dir)}</code>"],
        ["policy commit", _git(ev.git)],
        ["node", _e(ev.node or "every node group")],
        ["cases files", _e(", ".join(ev.cases_files))],
        ["generated", _e(ev.generated_at.strftime("%Y-%m-%d %H:%M:%S UTC"))],
        ["xdsplane version", _e(ev.version)],
    ]
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>\n"
        f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">\n"
        f"<title>xdsplane evidence: {_e(ev.policy_dir)}</title>\n"
        f"<style>{_STYLE}</style></head><body>\n"
        f"<h1>Policy evidence: {verdict}</h1>\n"
        + _table(["", ""], facts, "facts")
        + "<h2>Access matrix</h2>\n<p>Who may reach each route, as Envoy is told; rows on a "
        "tint reach an upstream with no check.</p>\n"
        + (matrix or "<p class='muted'>No node group selected.</p>\n")
        + f"<h2>Test cases ({len(ev.results)}, run against a real Envoy)</h2>\n"
        + _cases(ev.results)
        + "<h2>Certificates served (subject and expiry)</h2>\n"
        + _certs(ev.certificates)
        + "</body></html>\n"
    )


def write(path: Path, ev: Evidence) -> None:
    write_atomic(path, render(ev).encode())

"""The broken-folder corpus: `xdsplane validate` prints exactly the expected error lines.

tests/corpus/broken/<case>/ holds one or more YAML files and ``expected.txt``, the exact
lines ``xdsplane validate <case>`` prints on stdout when run from tests/corpus/broken (so
every path is relative and stable). A case whose message is known to be wrong holds the
right one in ``expected.txt`` and the reason in ``xfail.txt``: it runs as a strict xfail
until the loader is fixed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_policy_corpus import run_cli as shared_run_cli

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"
BROKEN = CORPUS / "broken"
GOOD = CORPUS / "good"
CASES = sorted(p.name for p in BROKEN.iterdir() if p.is_dir())

# Any single case, alias bomb included, must finish well within this (startup is ~0.4 s).
CASE_TIMEOUT = 20.0


def run_cli(
    *args: str, cwd: Path, timeout: float = CASE_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return shared_run_cli(*args, cwd=cwd, timeout=timeout)


def assert_no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stdout, r.stdout
    assert "Traceback" not in r.stderr, r.stderr


def test_corpus_is_not_empty() -> None:
    assert len(CASES) >= 17


@dataclass(frozen=True)
class Outcome:
    result: subprocess.CompletedProcess[str]
    seconds: float


def _validate(case: str) -> Outcome:
    started = time.monotonic()
    r = run_cli("validate", case, cwd=BROKEN)
    return Outcome(r, time.monotonic() - started)


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Outcome]:
    """Every case validated once, a few at a time (each run is mostly interpreter startup)."""
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip(CASES, pool.map(_validate, CASES), strict=True))


@pytest.mark.parametrize("case", CASES)
def test_broken_folder_fails_cleanly(case: str, outcomes: dict[str, Outcome]) -> None:
    """Exit status 1, one stdout line per error, a summary on stderr, no traceback."""
    o = outcomes[case]
    assert_no_traceback(o.result)
    assert o.result.returncode == 1, (o.result.stdout, o.result.stderr)
    lines = o.result.stdout.splitlines()
    assert lines
    expected = (BROKEN / case / "expected.txt").read_text().splitlines()
    assert len(lines) == len(expected), lines
    for line in lines:
        assert line.startswith(f"{case}/"), line
    assert f"{len(lines)} error(s)" in o.result.stderr
    assert o.seconds < CASE_TIMEOUT


@pytest.mark.parametrize("case", CASES)
def test_broken_folder_messages(
    case: str, outcomes: dict[str, Outcome], request: pytest.FixtureRequest
) -> None:
    """Exactly the lines of expected.txt (strict xfail where xfail.txt says why not yet)."""
    folder = BROKEN / case
    xfail = folder / "xfail.txt"
    if xfail.exists():
        request.applymarker(pytest.mark.xfail(strict=True, reason=xfail.read_text().strip()))
    expected = (folder / "expected.txt").read_text().splitlines()
    assert expected, f"{case}/expected.txt is empty"
    assert outcomes[case].result.stdout.splitlines() == expected


def test_every_case_has_an_expected_file_and_yaml() -> None:
    for case in CASES:
        folder = BROKEN / case
        assert (folder / "expected.txt").is_file(), case
        assert any(p.suffix in (".yaml", ".yml") for p in folder.rglob("*")), case


def test_expected_lines_name_their_case_folder() -> None:
    """Every error line starts with the case folder: paths are relative and stable."""
    for case in CASES:
        for line in (BROKEN / case / "expected.txt").read_text().splitlines():
            assert line.startswith(f"{case}/"), (case, line)


def test_good_folder_is_valid() -> None:
    r = run_cli("validate", "good", cwd=CORPUS)
    assert_no_traceback(r)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert "ok: nodes" in r.stderr


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    r = run_cli("validate", "empty", cwd=tmp_path)
    assert_no_traceback(r)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["empty: holds no .yaml or .yml files"]


def test_folder_with_only_other_files(tmp_path: Path) -> None:
    d = tmp_path / "docs"
    d.mkdir()
    (d / "README.md").write_text("# not a snapshot\n")
    (d / "clusters.json").write_text("{}\n")
    (d / ".hidden.yaml").write_text("resources: [\n")
    r = run_cli("validate", "docs", cwd=tmp_path)
    assert_no_traceback(r)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["docs: holds no .yaml or .yml files"]


def test_missing_folder(tmp_path: Path) -> None:
    r = run_cli("validate", "nowhere", cwd=tmp_path)
    assert_no_traceback(r)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["nowhere: is not a folder"]


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    shutil.copy(GOOD / "edge.yaml", tmp_path / "edge.yaml")
    r = run_cli("validate", "edge.yaml", cwd=tmp_path)
    assert_no_traceback(r)
    assert r.returncode == 1
    assert r.stdout.splitlines() == ["edge.yaml: is not a folder"]


def test_hidden_files_and_folders_are_skipped(tmp_path: Path) -> None:
    d = tmp_path / "snap"
    shutil.copytree(GOOD, d)
    (d / ".edge.yaml.swp").write_bytes(b"\x00\x01garbage")
    (d / ".draft.yaml").write_text("resources: [\n")
    (d / ".git").mkdir()
    (d / ".git" / "x.yaml").write_text("{{{\n")
    (d / "notes.txt").write_text("not yaml: [\n")
    r = run_cli("validate", "snap", cwd=tmp_path)
    assert_no_traceback(r)
    assert r.returncode == 0, (r.stdout, r.stderr)


def test_subfolders_are_loaded(tmp_path: Path) -> None:
    d = tmp_path / "snap"
    shutil.copytree(GOOD, d)
    (d / "team").mkdir()
    (d / "team" / "bad.yml").write_text("resources: 3\n")
    r = run_cli("validate", "snap", cwd=tmp_path)
    assert_no_traceback(r)
    assert r.returncode == 1
    assert len(r.stdout.splitlines()) == 1
    assert r.stdout.startswith("snap/team/bad.yml:1:")


def test_errors_from_every_file_are_reported_together(tmp_path: Path) -> None:
    """One run lists the problems of all files, sorted by path and line."""
    d = tmp_path / "many"
    d.mkdir()
    for case in ("duplicate-yaml-key", "bad-yaml-syntax", "missing-type"):
        for f in (BROKEN / case).glob("*.yaml"):
            shutil.copy(f, d / f"{case}-{f.name}")
    r = run_cli("validate", "many", cwd=tmp_path)
    assert_no_traceback(r)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert len(lines) == 3
    assert lines == sorted(lines)
    for case in ("bad-yaml-syntax", "duplicate-yaml-key", "missing-type"):
        want = [
            line.replace(f"{case}/", f"many/{case}-", 1)
            for line in (BROKEN / case / "expected.txt").read_text().splitlines()
        ]
        assert set(want) <= set(lines), (want, lines)


# -- in-process -----------------------------------------------------------------------------


def test_alias_bomb_is_refused_fast_in_process() -> None:
    from xdsplane.config.yamlsrc import YamlError, parse

    text = (BROKEN / "alias-bomb" / "bomb.yaml").read_text()
    started = time.process_time()  # CPU time: other work on the machine does not count
    with pytest.raises(YamlError):
        parse(text, "bomb.yaml")
    assert time.process_time() - started < 5.0


def test_deep_nesting_is_refused() -> None:
    from xdsplane.config.yamlsrc import YamlError, parse

    text = "resources: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(YamlError) as info:
        parse(text, "deep.yaml")
    assert str(info.value).startswith("deep.yaml")

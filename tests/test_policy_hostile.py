"""The hostile policy corpus: odd encodings, huge and deep files, expanding aliases, folders
that loop. Each is generated here (some are megabytes) and loaded by the loader in bounded
CPU time and memory, with a clear error at ``path:line:column`` or a success where the
file is valid. Some go through ``xdsplane validate`` too: no traceback, exit 1, the error.

tests/corpus/broken holds the small committed cases (alias bomb, non-UTF-8, ...) and
test_loader.py the deep-nesting and alias-bomb checks; this adds what they do not cover.
"""

from __future__ import annotations

import codecs
import os
import re
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import ProcessGroup, XdsServer, wait_until
from test_policy_corpus import run_cli

from xdsplane.config.errors import MAX_MESSAGE, ConfigErrors
from xdsplane.config.loader import FolderLoader
from xdsplane.policy.parse import MAX_ERRORS

GOOD = """listeners:
  - name: http
    address: 0.0.0.0:8080
    redirect_to_https: true
"""


def listeners(n: int, same_address: bool = False) -> str:
    return "listeners:\n" + "".join(
        f"  - name: l{i}\n    address: 0.0.0.0:{8080 if same_address else 10000 + i}\n"
        "    redirect_to_https: true\n"
        for i in range(n)
    )


def nested_merges(levels: int) -> str:
    """Each level merges the one before twice: exponential if merges were expanded blindly."""
    lines = ["a0: &a0 {k: 1}"]
    lines += [f"a{i}: &a{i} {{<<: [*a{i - 1}, *a{i - 1}], k{i}: 1}}" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


# name -> (file content, None for "loads" or a regex of the first error, CPU seconds bound)
CASES: dict[str, tuple[Callable[[], bytes], str | None, float]] = {
    "utf-8 with BOM": (lambda: codecs.BOM_UTF8 + GOOD.encode(), None, 2),
    "utf-16 with BOM": (lambda: GOOD.encode("utf-16"), r"p.yaml:1:1: UTF-16 text .*UTF-8$", 2),
    "utf-32 with BOM": (lambda: GOOD.encode("utf-32"), r"p.yaml:1:1: UTF-32 text", 2),
    "utf-16 without BOM": (
        lambda: GOOD.encode("utf-16-le"),
        r"p.yaml:1:2: invalid YAML: control character U\+0000 is not allowed \(UTF-16 text\?",
        2,
    ),
    "latin-1": (
        lambda: ("# café\n" + GOOD).encode("latin-1"),
        r"p.yaml:1:6: not UTF-8 text \(byte 5\)$",
        2,
    ),
    "NUL in a value": (
        lambda: GOOD.encode().replace(b"http", b"ht\x00tp"),
        r"p.yaml:2:13: invalid YAML: control character U\+0000 is not allowed",
        2,
    ),
    "BEL control character": (
        lambda: b"listeners: \x07\n",
        r"p.yaml:1:12: invalid YAML: control character U\+0007 is not allowed$",
        2,
    ),
    "invalid UTF-8 at the end": (
        lambda: GOOD.encode() + b"\xff\xfe\n",
        r"p.yaml:5:1: not UTF-8 text \(byte 80\)$",
        2,
    ),
    "CRLF line ends": (lambda: GOOD.replace("\n", "\r\n").encode(), None, 2),
    "a 5,000-digit number": (
        lambda: b"resources: " + b"9" * 5000 + b"\n",
        r"p.yaml:1:12: invalid YAML: a number of 5000 digits is too long$",
        2,
    ),
    "a 5,000-digit port": (
        lambda: GOOD.replace("8080", "9" * 5000).encode(),
        r"p.yaml:3:14: port out of range 1-65535 in '0.0.0.0:9999",
        2,
    ),
    "a 5 MB line": (
        lambda: GOOD.replace("name: http", "name: " + "a" * 5_000_000).encode(),
        r"p.yaml:2:11: not a valid name: 'aaaa.*\.\.\.' \(\d+ characters\)",
        5,
    ),
    "a 2 MB key": (
        lambda: b"k" * 2_000_000 + b": 1\n",
        r"p.yaml:1:2000001: invalid YAML: mapping values are not allowed in this context$",
        5,
    ),
    "8 MB of comments around a valid policy": (
        lambda: ("# " + "y" * 1000 + "\n").encode() * 8000 + GOOD.encode(),
        None,
        5,
    ),
    "3,000 listeners": (lambda: listeners(3000).encode(), None, 10),
    "1,000 listeners on one address": (
        lambda: listeners(1000, same_address=True).encode(),
        r"p.yaml:6:14: listener 'l1' address 0.0.0.0:8080 conflicts with listener 'l0' at ",
        10,
    ),
    "50,000 unknown keys": (
        lambda: "".join(f"k{i}: {i}\n" for i in range(50_000)).encode(),
        rf"p.yaml:1:1: 49800 more errors in this file \(the first {MAX_ERRORS} are shown\)$",
        10,
    ),
    "deep block nesting": (
        lambda: ("resources:\n" + "".join("  " * i + "-\n" for i in range(1, 3000))).encode(),
        r"p.yaml:\d+:\d+: invalid YAML: exceeded maximum nesting depth$",
        5,
    ),
    "deep flow mappings": (
        lambda: ("resources: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n").encode(),
        r"p.yaml:1:\d+: invalid YAML: exceeded maximum nesting depth$",
        5,
    ),
    "nested merge keys": (
        lambda: nested_merges(25).encode(),
        r"p.yaml:\d+:\d+: document expands to more than 1000000 values \(aliases\?\)$",
        5,
    ),
    "an alias inside itself": (
        lambda: b"resources: &a [*a]\n",
        r"p.yaml:1:12: nesting deeper than 200 levels$",
        2,
    ),
    "a python tag": (
        lambda: b"!!python/object/apply:os.system ['true']\n",
        r"p.yaml:1:1: expected a mapping of policy keys$",
        2,
    ),
    "10,000 documents": (lambda: b"---\nresources: []\n" * 10_000, None, 10),
}


def load(folder: Path) -> list[str]:
    """The loader's errors for ``folder`` ([] when it loads); anything else fails."""
    try:
        FolderLoader(folder).load()
    except ConfigErrors as e:
        return [str(x) for x in e.errors]
    return []


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_file_loads_in_bounded_time_and_memory(case: str, tmp_path: Path) -> None:
    make, expected, cpu_seconds = CASES[case]
    (tmp_path / "p.yaml").write_bytes(make())
    tracemalloc.start()
    started = time.process_time()  # CPU time: other work on the machine does not count
    try:
        errors = load(tmp_path)
    finally:
        took = time.process_time() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert took < cpu_seconds, f"{case}: {took:.1f} s"
    assert peak < 512 * 2**20, f"{case}: {peak / 2**20:.0f} MiB"
    if expected is None:
        assert errors == [], errors[:3]
        return
    assert errors, f"{case} loaded"
    shown = [e.split(str(tmp_path) + os.sep, 1)[-1] for e in errors]
    assert any(re.match(expected, e, re.S) for e in shown), [e[:300] for e in shown[:3]]
    assert len(errors) <= MAX_ERRORS + 1000, len(errors)
    assert all(len(e) < MAX_MESSAGE + len(str(tmp_path)) + 100 for e in errors)


def test_listeners_on_one_address_get_one_error_each(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(listeners(300, same_address=True))
    errors = load(tmp_path)
    assert len(errors) == 299
    assert errors[-1].endswith(
        "conflicts with listener 'l0' at " + f"{tmp_path}/p.yaml:3 (and 298 more)"
    )


def test_a_file_over_64_mib_is_not_read(tmp_path: Path) -> None:
    with open(tmp_path / "huge.yaml", "wb") as f:
        f.truncate(65 * 2**20)  # sparse: nothing written, nothing read
    started = time.process_time()
    assert load(tmp_path) == [f"{tmp_path}/huge.yaml: cannot read: larger than 67108864 bytes"]
    assert time.process_time() - started < 1


def test_folder_that_loops_and_special_files(tmp_path: Path) -> None:
    """``sub -> .`` twice would make the walk exponential; a FIFO would block a read."""
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "edge.yaml").write_text(GOOD)
    (folder / "sub").symlink_to(".")
    (folder / "sub2").symlink_to(".")
    os.mkfifo(folder / "fifo.yaml")
    (folder / "zero.yaml").symlink_to("/dev/zero")
    r = run_cli("validate", "policies", cwd=tmp_path, timeout=30)
    assert "Traceback" not in r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "policies/fifo.yaml: is not a regular file",
        "policies/zero.yaml: is not a regular file",
    ]
    assert r.returncode == 1
    (folder / "fifo.yaml").unlink()
    (folder / "zero.yaml").unlink()
    assert load(folder) == []


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            GOOD.encode("utf-16"),
            "bad.yaml:1:1: UTF-16 text (a byte-order mark says so); save it as UTF-8",
        ),
        (
            b"resources: " + b"9" * 5000 + b"\n",
            "bad.yaml:1:12: invalid YAML: a number of 5000 digits is too long",
        ),
        (
            GOOD.encode().replace(b"http", b"ht\x00tp"),
            "bad.yaml:2:13: invalid YAML: control character U+0000 is not allowed "
            "(UTF-16 text? save the file as UTF-8)",
        ),
    ],
)
def test_validate_names_the_place_without_a_traceback(
    content: bytes, expected: str, tmp_path: Path
) -> None:
    (tmp_path / "bad.yaml").write_bytes(content)
    r = run_cli("validate", ".", cwd=tmp_path, timeout=30)
    assert "Traceback" not in r.stdout + r.stderr and "internal error" not in r.stdout
    assert r.stdout.splitlines() == [expected], r.stdout
    assert r.returncode == 1


def test_serve_starts_on_a_folder_that_loops_and_follows_edits(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """The watcher too: a folder with ``sub -> .`` is served and an edit in it reloads."""
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "edge.yaml").write_text(GOOD)
    (folder / "sub").symlink_to(".")
    (folder / "sub2").symlink_to(".")
    server = XdsServer(procs, folder).start()
    (folder / "edge.yaml").write_text(GOOD.replace("8080", "8081"))
    wait_until(lambda: server.status()["reload"]["successes"] >= 2, 10, what="the edit reloaded")

"""The import contract (.importlinter) holds, and it and ARCHITECTURE.md place every module.

A new top-level module must be given a layer: otherwise the contract says nothing about it
and the architecture page misses it.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "xdsplane"


def _top_level() -> set[str]:
    names = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    names |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    return names


def _layered() -> set[str]:
    config = configparser.ConfigParser()
    config.read(REPO / ".importlinter")
    text = config["importlinter:contract:layers"]["layers"]
    return set(re.findall(r"\bxdsplane\.(\w+)", text))


def test_every_top_level_module_has_a_layer() -> None:
    missing = _top_level() - _layered()
    assert not missing, f"add {sorted(missing)} to a layer in .importlinter and ARCHITECTURE.md"
    stale = _layered() - _top_level()
    assert not stale, f".importlinter names modules that do not exist: {sorted(stale)}"


def test_architecture_page_names_every_top_level_module() -> None:
    page = (REPO / "ARCHITECTURE.md").read_text()
    missing = [m for m in sorted(_top_level()) if not re.search(rf"`{m}(\.py|/)?[`/ (]", page)]
    assert not missing, f"ARCHITECTURE.md does not place {missing}"


def test_import_contract_holds() -> None:
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.fail("lint-imports is missing: pip install -c constraints.txt -e '.[dev]'")
    done = subprocess.run(
        [lint, "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]

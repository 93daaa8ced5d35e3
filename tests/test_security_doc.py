"""SECURITY.md names the tests that prove each promise: every test it names exists, so a
renamed or deleted test cannot leave the page pointing at nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)(?:::(\w+))?")
CORPUS = re.compile(r"`(tests/policy_corpus/[\w.-]+)`")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test")
    }


def test_every_test_named_in_security_md_exists() -> None:
    text = (REPO / "SECURITY.md").read_text()
    named = REFERENCE.findall(text)
    assert len(named) > 40, "SECURITY.md lists the tests behind each promise"
    missing = []
    for file, name in named:
        path = REPO / file
        if not path.is_file():
            missing.append(file)
        elif name and name not in _test_names(path):
            missing.append(f"{file}::{name}")
    for folder in CORPUS.findall(text):
        if not (REPO / folder / "policy.yaml").is_file():
            missing.append(folder)
    assert not missing, f"SECURITY.md names tests that do not exist: {missing}"

"""The result of one policy test case: what `xdsplane test` prints and `xdsplane report` shows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CaseResult:
    """One case of a cases file, run.

    `expected` and `got` are short texts for people (e.g. "status 403" and "status 200,
    upstream billing"); they never hold a token or a key.
    """

    file: str
    line: int
    name: str
    passed: bool
    expected: str
    got: str
    detail: str = ""

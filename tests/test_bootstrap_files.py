"""envoy/ holds the sample's Envoy and gRPC bootstrap files as `xdsplane bootstrap` prints
them for the README's commands: regenerated here with the CLI and compared, so they never
drift from what the command prints.

The commands run from a folder with the development PKI (`certs/`), as the README's do from
the repository; the CLI prints absolute paths, which are written back relative to that
folder. Regenerate after an intended change with
``XDSPLANE_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_bootstrap_files.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from harness import xdsplane_argv

from xdsplane import pki

REPO = Path(__file__).resolve().parent.parent
UPDATE = os.environ.get("XDSPLANE_UPDATE_GOLDEN") == "1"
TLS = [
    "--tls-cert",
    "certs/{node}.crt",
    "--tls-key",
    "certs/{node}.key",
    "--ca",
    "certs/service-ca.crt",
]
FILES = {
    "edge-1.yaml": ["--node", "edge-1", *TLS, "--sni", "localhost"],
    "grpc-client.json": ["--grpc", "--node", "grpc-1", *TLS],
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bootstrap")
    pki.init(d / "certs")
    return d


def printed(workdir: Path, args: list[str]) -> str:
    node = args[args.index("--node") + 1]
    argv = xdsplane_argv("bootstrap", *(a.format(node=node) for a in args))
    done = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.replace(f"{workdir}/", "")


@pytest.mark.parametrize("name", sorted(FILES))
def test_bootstrap_file_is_what_the_command_prints(workdir: Path, name: str) -> None:
    path = REPO / "envoy" / name
    text = printed(workdir, FILES[name])
    if UPDATE:
        path.write_text(text)
    assert path.read_text() == text, f"envoy/{name} differs from what the command prints"
    data = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    assert str(workdir) not in text and "certs/service-ca.crt" in text
    assert data["node"]["id"] in ("edge-1", "grpc-1")

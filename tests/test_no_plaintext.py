"""No plaintext off the host: `xdsplane serve` refuses (exit 2) to listen without TLS on
anything but loopback (127.0.0.0/8, ::1, localhost) unless --insecure is given; --insecure
starts, logs a warning and lists the reasons in /status, on the page and in `xdsplane
status`. The admin server (plain HTTP) follows the same rule. Real `xdsplane serve`
processes on free ports; the attacker's spellings of "loopback" are refused too."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness import (
    HOST,
    Proc,
    ProcessGroup,
    direct,
    free_port,
    http_get,
    listener,
    route_config,
    wait_until,
    write_snapshot,
    xdsplane_argv,
)

from xdsplane import pki
from xdsplane.exposure import is_loopback


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "snapshots"
    d.mkdir()
    write_snapshot(
        d / "edge.yaml", [listener("http", free_port()), route_config("http", [direct("/", "ok")])]
    )
    return d


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    pki.init(d)  # xds-server and service-ca among them
    return d


def tls_flags(certs: Path) -> list[str]:
    return [
        "--tls-cert", str(certs / "xds-server.crt"),
        "--tls-key", str(certs / "xds-server.key"),
        "--client-ca", str(certs / "service-ca.crt"),
    ]  # fmt: skip


def run_serve(folder: Path, xds: str, admin: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`xdsplane serve` expected to refuse: it must exit by itself (a started server would
    run until the timeout, which fails the test)."""
    return subprocess.run(
        xdsplane_argv(
            "serve", "--config", str(folder), "--xds-address", xds, "--admin-address", admin,
            *extra,
        ),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def start_serve(
    procs: ProcessGroup,
    folder: Path,
    xds: str,
    admin_port: int,
    *extra: str,
    admin_host: str = HOST,
) -> Proc:
    """`xdsplane serve` expected to start: wait for /readyz on the loopback admin port."""
    admin = f"{f'[{admin_host}]' if ':' in admin_host else admin_host}:{admin_port}"
    proc = procs.spawn(
        "xdsplane",
        xdsplane_argv(
            "serve", "--config", str(folder), "--xds-address", xds, "--admin-address", admin,
            "--log-format", "json", *extra,
        ),
    )  # fmt: skip
    proc.start()

    def ready() -> bool:
        proc.ensure_alive()
        return http_get(admin_port, "/readyz", timeout=2.0).status == 200

    wait_until(ready, 30, what="xdsplane serve /readyz")
    return proc


def status(admin_port: int) -> dict[str, object]:
    r = http_get(admin_port, "/status", timeout=5.0)
    assert r.status == 200, r
    data: dict[str, object] = json.loads(r.body)
    return data


# Off the host, however it is spelled: wildcards, this machine's own non-loopback address
# family, other spellings of 127.0.0.1 (which the refusal must not trust), names.
OFF_HOST = [
    "0.0.0.0",
    "[::]",
    "192.0.2.2",
    "127.1",
    "0x7f000001",
    "[::ffff:127.0.0.1]",
    "[::1%lo]",
    "localhost.",
    "localhost.example.com",
]


@pytest.mark.parametrize("host", OFF_HOST)
def test_plaintext_xds_off_loopback_is_refused(folder: Path, host: str) -> None:
    port = free_port()
    r = run_serve(folder, f"{host}:{port}", f"{HOST}:{free_port()}")
    assert r.returncode == 2, r.stderr
    assert f"--xds-address {host}:{port}" in r.stderr
    assert "plaintext on a non-loopback address" in r.stderr
    assert "--insecure" in r.stderr
    assert "Traceback" not in r.stderr


def test_plain_http_admin_off_loopback_is_refused_even_with_tls_xds(
    folder: Path, certs: Path
) -> None:
    port = free_port()
    r = run_serve(folder, f"0.0.0.0:{free_port()}", f"0.0.0.0:{port}", *tls_flags(certs))
    assert r.returncode == 2, r.stderr
    assert f"--admin-address 0.0.0.0:{port}" in r.stderr
    assert "xDS is plaintext" not in r.stderr  # the xDS port has TLS: only the admin is named


def test_insecure_starts_warns_and_says_so_in_status(procs: ProcessGroup, folder: Path) -> None:
    xds_port, admin_port = free_port(), free_port()
    proc = start_serve(
        procs, folder, f"0.0.0.0:{xds_port}", admin_port, "--insecure", admin_host="0.0.0.0"
    )
    reasons = status(admin_port)["insecure"]
    assert isinstance(reasons, list) and len(reasons) == 2, reasons
    assert f"--xds-address 0.0.0.0:{xds_port}" in reasons[0]
    assert f"--admin-address 0.0.0.0:{admin_port}" in reasons[1]
    # The page and `xdsplane status` show it too, and the log has a warning per reason.
    page = http_get(admin_port, "/", timeout=5.0)
    assert page.status == 200 and "Insecure: xDS is plaintext" in page.text
    text = subprocess.run(
        xdsplane_argv("status", "--admin-address", f"{HOST}:{admin_port}"),
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert text.startswith("INSECURE (--insecure): xDS is plaintext"), text
    warnings = [
        json.loads(line)
        for line in proc.log_path.read_text().splitlines()
        if line.startswith("{") and '"insecure' in line
    ]
    assert [w["level"] for w in warnings] == ["warning", "warning"], warnings


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "[::1]", "localhost", "LocalHost"])
def test_plaintext_on_loopback_starts(procs: ProcessGroup, folder: Path, host: str) -> None:
    admin_port = free_port()
    start_serve(procs, folder, f"{host}:{free_port()}", admin_port)
    assert status(admin_port)["insecure"] == []


def test_tls_on_the_wildcard_starts(procs: ProcessGroup, folder: Path, certs: Path) -> None:
    admin_port = free_port()
    start_serve(procs, folder, f"0.0.0.0:{free_port()}", admin_port, *tls_flags(certs))
    assert status(admin_port)["insecure"] == []


def test_loopback_is_exactly_127_8_and_1_and_localhost() -> None:
    assert all(is_loopback(h) for h in ["127.0.0.1", "127.255.255.254", "::1", "[::1]"])
    assert all(is_loopback(h) for h in ["localhost", "LOCALHOST"])
    off = ["0.0.0.0", "::", "", "128.0.0.1", "::2", "fe80::1", "0:0:0:0:0:0:0:0"]
    assert not any(is_loopback(h) for h in off + [h.strip("[]") for h in OFF_HOST])


def test_serve_help_documents_insecure() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "xdsplane", "serve", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "--insecure" in out

"""Bad secret files are refused before they reach Envoy, with the policy line that names
them: in-process through FolderLoader and `xdsplane validate`, and live: a running server
keeps serving the last good certificate while the files on disk are wrong.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from harness import ProcessGroup, holds_for, wait_until, xdsplane_argv
from tls_helpers import (
    BILLING,
    STRICT,
    Edge,
    Layout,
    assert_no_key_material,
    days_ago,
    expired_certificate,
    file_serial,
    handshake,
    make_pki,
    new_key_pem,
    start_edge,
    write_crl,
)

from xdsplane import cli, pki
from xdsplane.config.errors import ConfigError, ConfigErrors
from xdsplane.pipeline import FolderLoader

# -- a policy folder with the sample PKI, shared read-only; each case breaks a copy ----------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("secrets-pristine")
    make_pki(root / "certs")
    return root


def setup_folder(pristine: Path, root: Path, billing_domains: str = BILLING) -> Layout:
    shutil.copytree(pristine / "certs", root / "certs")
    layout = Layout(root, https_port=8443, http_port=8080, upstream_port=9443)
    layout.write_policy(billing_domains=billing_domains)
    return layout


def line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


def settled(certs: Path) -> None:
    """Date the files a minute back: what is wrong with them is not a write in progress
    (a loader may give a just-replaced certificate and key a moment to both arrive)."""
    past = time.time() - 60
    for f in certs.rglob("*"):
        os.utime(f, (past, past))


def load_errors(layout: Layout) -> list[ConfigError]:
    with pytest.raises(ConfigErrors) as caught:
        FolderLoader(layout.policy_dir).load()
    return caught.value.errors


def test_the_unbroken_folder_loads(pristine: Path, tmp_path: Path) -> None:
    """The control for every case below: the copy loads and names all four secrets."""
    layout = setup_folder(pristine, tmp_path)
    snapshots = FolderLoader(layout.policy_dir).load()
    assert {c.secret for c in snapshots.certificates} == {
        "edge-server",
        "client-ca",
        "gateway-client",
        "service-ca",
    }


# -- each way a secret file can be wrong ---------------------------------------------------


def _key_mismatch(certs: Path) -> None:
    pki.write_atomic(certs / "edge.key", new_key_pem(), 0o600)


def _expired(certs: Path) -> None:
    expired_certificate(certs, "edge", "service-ca", [BILLING, STRICT])


def _chain_broken(certs: Path) -> None:
    # The leaf followed by a CA that did not issue it.
    chain = (certs / "edge.crt").read_bytes() + (certs / "client-ca.crt").read_bytes()
    pki.write_atomic(certs / "edge.crt", chain)


def _crl_of_another_ca(certs: Path) -> None:
    pki.empty_crl(certs, "service-ca")
    pki.write_atomic(certs / "client-ca.crl", (certs / "service-ca.crl").read_bytes())


def _crl_forged(certs: Path) -> None:
    # Same issuer name as client-ca, signed by another key.
    other = certs / "forger"
    pki.issue(other, "client-ca", None)
    pki.empty_crl(other, "client-ca")
    pki.write_atomic(certs / "client-ca.crl", (other / "client-ca.crl").read_bytes())


def _swapped(certs: Path) -> None:
    # certificate and private_key mixed up: the key must not end up in a message.
    cert, key = (certs / "edge.crt").read_bytes(), (certs / "edge.key").read_bytes()
    pki.write_atomic(certs / "edge.crt", key)
    pki.write_atomic(certs / "edge.key", cert, 0o600)


def _empty_certificate(certs: Path) -> None:
    pki.write_atomic(certs / "edge.crt", b"")


def _directory_for_a_file(certs: Path) -> None:
    (certs / "edge.crt").unlink()
    (certs / "edge.crt").mkdir()


def _ca_is_a_leaf(certs: Path) -> None:
    pki.write_atomic(certs / "client-ca.crt", (certs / "alice.crt").read_bytes())


def _garbage_certificate(certs: Path) -> None:
    pki.write_atomic(certs / "edge.crt", b"this is not a certificate\n\x00\xff\x10")


def _garbage_key(certs: Path) -> None:
    pki.write_atomic(certs / "gateway.key", b"-----BEGIN PRIVATE KEY-----\nnope\n", 0o600)


def _missing_key(certs: Path) -> None:
    (certs / "gateway.key").unlink()


def _missing_ca(certs: Path) -> None:
    (certs / "service-ca.crt").unlink()


def _encrypted_key(certs: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    pki.write_atomic(certs / "edge.key", pem, 0o600)


# (break the files, the secret whose line is named, the message)
CASES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "key-mismatch": (
        _key_mismatch,
        "edge-server",
        r"secret 'edge-server': private key does not match the certificate \(CN=edge,",
    ),
    "expired": (
        _expired,
        "edge-server",
        r"secret 'edge-server': certificate expired on \d{4}-\d\d-\d\d \d\d:\d\d UTC",
    ),
    "chain-broken": (
        _chain_broken,
        "edge-server",
        r"secret 'edge-server': certificate chain is broken at position 1: .*CN=edge.* is not "
        r"issued by .*CN=client-ca",
    ),
    "crl-of-another-ca": (
        _crl_of_another_ca,
        "client-ca",
        r"secret 'client-ca': crl is issued by .*CN=service-ca.*, which is not in the ca file",
    ),
    "crl-forged": (
        _crl_forged,
        "client-ca",
        r"secret 'client-ca': crl signature does not verify",
    ),
    "ca-is-a-leaf": (
        _ca_is_a_leaf,
        "client-ca",
        r"secret 'client-ca': ca file certificate 1 \(.*CN=alice.*\) is not a CA",
    ),
    "garbage-certificate": (
        _garbage_certificate,
        "edge-server",
        r"secret 'edge-server': certificate file holds no (valid PEM )?certificate",
    ),
    "swapped-certificate-and-key": (
        _swapped,
        "edge-server",
        r"secret 'edge-server': certificate file holds no (valid PEM )?certificate",
    ),
    "empty-certificate": (
        _empty_certificate,
        "edge-server",
        r"secret 'edge-server': certificate file holds no (valid PEM )?certificate",
    ),
    "directory-for-a-file": (
        _directory_for_a_file,
        "edge-server",
        r"certificate: cannot read .*/certs/edge\.crt: (Is a directory|not a regular file)",
    ),
    "garbage-key": (
        _garbage_key,
        "gateway-client",
        r"secret 'gateway-client': private_key file holds no valid PEM private key",
    ),
    "missing-key": (
        _missing_key,
        "gateway-client",
        r"private_key: cannot read .*/certs/gateway\.key: No such file or directory",
    ),
    "missing-ca": (
        _missing_ca,
        "service-ca",
        r"ca: cannot read .*/certs/service-ca\.crt: No such file or directory",
    ),
    "encrypted-key": (
        _encrypted_key,
        "edge-server",
        r"secret 'edge-server': private key is encrypted",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_secret_file_is_refused_with_its_policy_line(
    case: str, pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    breaks, secret, message = CASES[case]
    layout = setup_folder(pristine, tmp_path)
    breaks(layout.certs)
    settled(layout.certs)
    line = line_of(layout.policy_file, f"  {secret}: ")

    (error,) = load_errors(layout)
    assert error.location.path == str(layout.policy_file), error
    assert error.location.line == line, error
    assert re.search(message, error.message), error

    assert cli.main(["validate", str(layout.policy_dir)]) == 1
    out, err = capsys.readouterr()
    (printed,) = out.splitlines()
    assert printed.startswith(f"{layout.policy_file}:{line}:"), printed
    assert re.search(message, printed), printed
    assert "would not be served" in err
    assert "Traceback" not in out + err
    assert_no_key_material("xdsplane validate", out + err, layout.certs)


@pytest.mark.parametrize(("last", "next_"), [(8, 1), (-1, -8)], ids=["expired", "not-yet-valid"])
def test_crl_outside_its_validity_is_refused(
    last: float, next_: float, pristine: Path, tmp_path: Path
) -> None:
    layout = setup_folder(pristine, tmp_path)
    write_crl(layout.certs, "client-ca", last_update=days_ago(last), next_update=days_ago(next_))
    settled(layout.certs)
    (error,) = load_errors(layout)
    assert error.location.line == line_of(layout.policy_file, "  client-ca: "), error
    assert re.search(r"secret 'client-ca': crl .*(expired|not valid before)", error.message)


@pytest.mark.parametrize(
    ("domains", "uncovered"),
    [
        (f"{BILLING}, pay.example.com", "pay.example.com"),
        ("'*.example.com'", "*.example.com"),
    ],
)
def test_host_domain_must_be_covered_by_its_certificate(
    domains: str, uncovered: str, pristine: Path, tmp_path: Path
) -> None:
    """A host whose certificate does not name one of its domains would fail every
    handshake for it (or need clients to skip the host name check): refused, at the
    domains line."""
    layout = setup_folder(pristine, tmp_path, billing_domains=domains)
    (error,) = load_errors(layout)
    assert error.location.path == str(layout.policy_file)
    assert error.location.line == line_of(layout.policy_file, "domains: [" + domains), error
    assert f"domain {uncovered!r} is not covered by the certificate of secret 'edge-server'" in (
        error.message
    ), error
    assert "DNS SANs: billing.example.com, mtls.billing.example.com, localhost" in error.message


# -- live: a running server keeps the last good certificate -----------------------------------


@pytest.mark.envoy
def test_live_bad_key_keeps_the_old_certificate_until_a_good_rotation(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """With Envoy serving the edge certificate, edge.key is replaced by a key that does not
    match: /status reports the error with its policy line, `xdsplane validate` refuses the
    folder, new handshakes still get the old certificate (the old Secret keeps serving and
    nothing was pushed), and a good rotation afterwards is served."""
    edge = start_edge(procs, tmp_path)
    try:
        live_bad_key(edge)
    finally:
        edge.upstream.stop()


def live_bad_key(edge: Edge) -> None:
    port = edge.layout.https_port
    policy = edge.layout.policy_file
    secret_line = line_of(policy, "  edge-server: ")
    old = file_serial(edge.certs / "edge.crt")
    assert handshake(port, edge.ctx(), BILLING).serial == old
    sds_before = edge.secret_stat("edge-server")
    failures_before = edge.server.status()["reload"]["failures"]

    bad_key = new_key_pem()
    pki.write_atomic(edge.certs / "edge.key", bad_key, 0o600)

    def reported() -> dict[str, Any] | None:
        reload = edge.server.status()["reload"]
        return reload if reload["errors"] else None

    reload = wait_until(reported, 10, what="/status reports the bad key")
    (error,) = reload["errors"]
    assert error.startswith(f"{policy}:{secret_line}:"), error
    assert "secret 'edge-server': private key does not match the certificate" in error
    assert reload["failures"] > failures_before

    # The old certificate keeps serving, and Envoy was sent nothing.
    holds_for(
        lambda: (
            handshake(port, edge.ctx(), BILLING).serial == old
            and edge.get("/healthz").status == 200
        ),
        1.0,
        what="old certificate served, requests answered",
    )
    assert edge.secret_stat("edge-server") == sds_before
    assert edge.secret_stat("edge-server", "update_rejected") == 0
    status = edge.server.status()
    (served,) = [c for c in status["certificates"] if c["secret"] == "edge-server"]
    assert int(served["serial"], 16) == old
    assert status["reload"]["errors"] == [error]  # still pending

    done = subprocess.run(
        xdsplane_argv("validate", str(edge.layout.policy_dir)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done
    assert f"{policy}:{secret_line}:" in done.stdout, done.stdout
    assert "private key does not match the certificate" in done.stdout

    # A good rotation (new key and certificate) is served, and the error clears.
    pki.rotate(edge.certs, "edge")
    new = file_serial(edge.certs / "edge.crt")
    wait_until(
        lambda: handshake(port, edge.ctx(), BILLING).serial == new,
        10,
        what="the rotated certificate is served",
    )
    wait_until(lambda: edge.server.status()["reload"]["errors"] == [], 10, what="error cleared")
    assert edge.secret_stat("edge-server") > sds_before
    assert edge.get("/healthz").status == 200

    # Nothing of any key, the refused one included, reached the log or /status.
    log = edge.server.proc.log_path.read_text(encoding="utf-8", errors="replace")
    assert "private key does not match" in log  # the error was logged...
    assert_no_key_material("the server log", log, edge.certs, [bad_key])  # ...not the key
    status_text = json.dumps(edge.server.status())
    assert_no_key_material("/status", status_text, edge.certs, [bad_key])

"""The broken-policy corpus: `xdsplane validate` prints exactly the expected error lines.

tests/policy_corpus/<case>/ holds one or more policy files and ``expected.txt``: the exact
lines ``python -m xdsplane validate <case>`` prints on stdout when run from the corpus
folder (so every path is relative and stable).

Key material is never committed. A case whose secrets need files lists them in
``pki.txt``, one per line, and they are generated at test time into a copy of the case:

    cert edge.crt edge.key [SAN ...]   a self-signed certificate (default SANs: example.com,
                                       *.example.com) and its private key
    ca ca.crt [ca.crl]                 a self-signed CA certificate (and an empty CRL)

A case whose expected message is right but whose current output is not holds the reason
in ``xfail.txt``: it runs as a strict xfail until the message is fixed.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "policy_corpus"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())
CASE_TIMEOUT = 30.0
DEFAULT_SANS = ("example.com", "*.example.com")


def run_cli(
    *args: str, cwd: Path, timeout: float = CASE_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("PYTHONWARNINGS", None)
    return subprocess.run(
        [sys.executable, "-m", "xdsplane", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )


def write_certificate(
    cert_path: Path, key_path: Path | None, names: list[str], crl_path: Path | None = None
) -> None:
    """A self-signed certificate for DNS ``names`` and its key, or (``key_path`` None) a
    self-signed CA named ``names[0]`` (and an empty CRL it signed) whose key is dropped."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=key_path is None, path_length=None), True)
    )
    if key_path is not None:
        sans = [x509.DNSName(n) for n in names]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
    cert = builder.sign(key, hashes.SHA256())
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key_path is not None:
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    if crl_path is not None:
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(name)
            .last_update(now - datetime.timedelta(minutes=5))
            .next_update(now + datetime.timedelta(days=2))
            .sign(key, hashes.SHA256())
        )
        crl_path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))


def write_ocsp(staple: Path, cert_path: Path, key_path: Path) -> None:
    """A good OCSP response (next update in a day) for the self-signed ``cert_path``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import ocsp

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    response = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=cert,
            issuer=cert,
            algorithm=hashes.SHA1(),
            cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=now - datetime.timedelta(minutes=5),
            next_update=now + datetime.timedelta(days=1),
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, cert)
        .sign(key, hashes.SHA256())
    )
    staple.write_bytes(response.public_bytes(serialization.Encoding.DER))


def make_pki(folder: Path) -> list[Path]:
    """Generate the files ``folder/pki.txt`` lists; returns their paths."""
    spec = folder / "pki.txt"
    made: list[Path] = []
    if not spec.exists():
        return made
    for line in spec.read_text().splitlines():
        words = line.split()
        if not words:
            continue
        if words[0] == "cert" and len(words) >= 3:
            cert, key = folder / words[1], folder / words[2]
            write_certificate(cert, key, words[3:] or list(DEFAULT_SANS))
            made += [cert, key]
        elif words[0] == "ca" and len(words) in (2, 3):
            cert = folder / words[1]
            crl = folder / words[2] if len(words) == 3 else None
            write_certificate(cert, None, [Path(words[1]).stem + " test CA"], crl)
            made += [cert] if crl is None else [cert, crl]
        elif words[0] == "ocsp" and len(words) == 4:
            # ocsp RESPONSE CERT KEY: a good OCSP response for a self-signed CERT, signed by KEY
            staple = folder / words[1]
            write_ocsp(staple, folder / words[2], folder / words[3])
            made.append(staple)
        else:
            raise ValueError(f"{spec}: bad line {line!r}")
    return made


def materialize(case: str, into: Path) -> Path:
    """A copy of the case under ``into`` (same folder name) with its PKI generated."""
    dest = into / case
    shutil.copytree(CORPUS / case, dest)
    make_pki(dest)
    return dest


def test_corpus_is_big_enough() -> None:
    assert len(CASES) >= 30


def test_no_private_key_is_committed() -> None:
    for path in CORPUS.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY-----" not in path.read_bytes(), path


def _param(case: str) -> object:
    xfail = CORPUS / case / "xfail.txt"
    if xfail.exists():
        reason = " ".join(xfail.read_text().split())
        return pytest.param(case, marks=pytest.mark.xfail(strict=True, reason=reason))
    return case


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_case(case: str, tmp_path: Path) -> None:
    folder = CORPUS / case
    expected = (folder / "expected.txt").read_text().splitlines()
    if (folder / "pki.txt").exists():
        materialize(case, tmp_path)
        cwd = tmp_path
    else:
        cwd = CORPUS
    r = run_cli("validate", case, cwd=cwd)
    assert "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert r.stdout.splitlines() == expected
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.rstrip().endswith(f"error(s); {case} would not be served"), r.stderr


# -- folders that must load (the rules' other side) ------------------------------------------


def _validate(folder: Path, files: dict[str, str]) -> subprocess.CompletedProcess[str]:
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return run_cli("validate", folder.name, cwd=folder.parent)


REDIRECT = """
listeners:
  - name: http
    address: 0.0.0.0:8080
    redirect_to_https: true
"""


def test_same_names_in_different_node_groups(tmp_path: Path) -> None:
    """Groups are checked apart: edge-* and api-* may both define listener http."""
    r = _validate(
        tmp_path / "groups",
        {
            "edge.yaml": 'nodes: ["edge-*"]\n' + REDIRECT,
            "api.yaml": 'nodes: ["api-*"]\n' + REDIRECT,
        },
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok: nodes edge-*" in r.stderr and "ok: nodes api-*" in r.stderr


def test_upstream_used_by_a_raw_route_is_used(tmp_path: Path) -> None:
    r = _validate(
        tmp_path / "raw-use",
        {
            "policy.yaml": """
upstreams:
  api:
    endpoints: [10.0.0.1:8080]
resources:
  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: raw-routes
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {prefix: /}
            route: {cluster: api}
"""
        },
    )
    assert r.returncode == 0, r.stdout + r.stderr

"""OCSP stapling: a certificate secret's ``ocsp_staple`` is checked at load (for this
certificate, signed by its issuer or a delegated responder, good, current), served inside
the Secret, re-served when the file changes, and stapled by a real Envoy 1.40
(``openssl s_client -status``). ``xdsplane certs ocsp`` writes dev-PKI responses.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from harness import ProcessGroup, holds_for, wait_until
from tls_helpers import (
    BILLING,
    Edge,
    Layout,
    TlsConnection,
    attach_to_report,
    make_pki,
    process_group,
    start_edge,
)

from xdsplane import cli, pki, tlsfiles
from xdsplane.config.errors import ConfigErrors
from xdsplane.pipeline import FolderLoader
from xdsplane.snapshot import SnapshotSet
from xdsplane.types import ResourceType

EDGE_LINE = "  edge-server: {certificate: ../certs/edge.crt, private_key: ../certs/edge.key}"
STAPLED = (
    "  edge-server:\n"
    "    certificate: ../certs/edge.crt\n"
    "    private_key: ../certs/edge.key\n"
    "    ocsp_staple: ../certs/edge.ocsp.der\n"
    "    ocsp_issuer: ../certs/service-ca.crt"
)


def stapled_policy(layout: Layout, ocsp_policy: str | None = None) -> str:
    text = layout.policy()
    assert EDGE_LINE in text
    text = text.replace(EDGE_LINE, STAPLED)
    if ocsp_policy is not None:
        text = text.replace(
            "        certificate: edge-server\n        client_certificate: optional\n",
            f"        certificate: edge-server\n        ocsp: {ocsp_policy}\n"
            "        client_certificate: optional\n",
            1,
        )
    return text


def line_of(path: Path, needle: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ocsp-pristine")
    make_pki(root / "certs")
    pki.ocsp_response(root / "certs", "edge")
    return root


def folder(pristine: Path, root: Path, ocsp_policy: str | None = None) -> Layout:
    shutil.copytree(pristine / "certs", root / "certs")
    layout = Layout(root, https_port=8443, http_port=8080, upstream_port=9443)
    layout.policy_dir.mkdir(parents=True)
    layout.policy_file.write_text(stapled_policy(layout, ocsp_policy))
    return layout


def _response(
    certs: Path,
    *,
    cert: str = "edge",
    issuer: str = "service-ca",
    signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    embed: bool = False,
    this_update: datetime.timedelta = datetime.timedelta(minutes=-5),
    next_update: datetime.timedelta | None = datetime.timedelta(days=1),
) -> bytes:
    """A response for ``cert`` naming ``issuer``, signed by ``signer`` (default: the
    issuer), which is embedded as a responder certificate when ``embed``."""
    now = datetime.datetime.now(datetime.UTC)
    builder = ocsp.OCSPResponseBuilder().add_response(
        cert=pki.load_cert(certs / f"{cert}.crt"),
        issuer=pki.load_cert(certs / f"{issuer}.crt"),
        algorithm=hashes.SHA1(),
        cert_status=ocsp.OCSPCertStatus.GOOD,
        this_update=now + this_update,
        next_update=now + next_update if next_update is not None else None,
        revocation_time=None,
        revocation_reason=None,
    )
    by_cert, by_key = signer or (
        pki.load_cert(certs / f"{issuer}.crt"),
        pki.load_key(certs / f"{issuer}.key"),
    )
    builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, by_cert)
    if embed:
        builder = builder.certificates([by_cert])
    return builder.sign(by_key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _delegate(
    certs: Path, issuer: str, ocsp_signing: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    ca = pki.load_cert(certs / f"{issuer}.crt")
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ocsp responder")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    usage = [ExtendedKeyUsageOID.OCSP_SIGNING if ocsp_signing else ExtendedKeyUsageOID.SERVER_AUTH]
    builder = builder.add_extension(x509.ExtendedKeyUsage(usage), False)
    return builder.sign(pki.load_key(certs / f"{issuer}.key"), hashes.SHA256()), key


def settled(certs: Path) -> None:
    """Date the files a minute back: what is wrong is not a rotation half-way (a staple
    for another serial, just written, is waited for as the next write may fix it)."""
    past = time.time() - 60
    for f in certs.iterdir():
        os.utime(f, (past, past))


def _write(certs: Path, data: bytes) -> None:
    pki.write_atomic(certs / "edge.ocsp.der", data)


def _wrong_certificate(certs: Path) -> None:
    _write(certs, _response(certs, cert="billing"))


def _expired(certs: Path) -> None:
    _write(
        certs,
        _response(
            certs,
            this_update=datetime.timedelta(days=-8),
            next_update=datetime.timedelta(days=-1),
        ),
    )


def _not_yet_valid(certs: Path) -> None:
    _write(certs, _response(certs, this_update=datetime.timedelta(hours=1)))


def _no_next_update(certs: Path) -> None:
    _write(certs, _response(certs, next_update=None))


def _forged_signature(certs: Path) -> None:
    # The issuer's good response with one bit of its signature flipped.
    der = bytearray(_response(certs))
    der[-1] ^= 0x01
    _write(certs, bytes(der))


def _signed_by_another_ca(certs: Path) -> None:
    # A real CA of the PKI, but not edge's: client-ca signs a response naming service-ca.
    ca = (pki.load_cert(certs / "client-ca.crt"), pki.load_key(certs / "client-ca.key"))
    _write(certs, _response(certs, signer=ca))


def _rogue_responder(certs: Path) -> None:
    # A self-made responder certificate sent along with the response.
    rogue = (pki.load_cert(certs / "rogue-ca.crt"), pki.load_key(certs / "rogue-ca.key"))
    _write(certs, _response(certs, signer=rogue, embed=True))


def _undelegated_responder(certs: Path) -> None:
    _write(certs, _response(certs, signer=_delegate(certs, "service-ca", False), embed=True))


def _responder_of_another_ca(certs: Path) -> None:
    _write(certs, _response(certs, signer=_delegate(certs, "client-ca", True), embed=True))


def _revoked(certs: Path) -> None:
    pki.ocsp_response(certs, "edge", revoked=True)


def _garbage(certs: Path) -> None:
    _write(certs, b"-----BEGIN CERTIFICATE-----\nnot an OCSP response\n")


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "wrong-certificate": (_wrong_certificate, r"is for serial [0-9a-f]+, not the certificate's"),
    "not-yet-valid": (_not_yet_valid, r"is not valid before"),
    "no-next-update": (_no_next_update, r"has no next update"),
    "forged-signature": (_forged_signature, r"signature does not verify with its issuer"),
    "signed-by-another-ca": (_signed_by_another_ca, r"signature does not verify with its issuer"),
    "rogue-responder": (
        _rogue_responder,
        r"responder certificate \(.*rogue-ca.*\) is not issued by the certificate's issuer",
    ),
    "undelegated-responder": (_undelegated_responder, r"is not delegated \(no OCSPSigning"),
    "responder-of-another-ca": (
        _responder_of_another_ca,
        r"responder certificate \(.*ocsp responder.*\) is not issued by the certificate's issuer",
    ),
    "revoked": (_revoked, r"the certificate is revoked on "),
    "garbage": (_garbage, r"holds no valid DER OCSP response"),
}


def test_a_good_staple_is_served_inline_in_the_secret(pristine: Path, tmp_path: Path) -> None:
    layout = folder(pristine, tmp_path, "must_staple")
    snapshots = FolderLoader(layout.policy_dir).load()
    staple = (layout.certs / "edge.ocsp.der").read_bytes()
    found = []
    for group in snapshots.groups:
        for res in group.snapshot.of(ResourceType.SECRET).values():
            if res.name == "edge-server":
                found.append(res.message.tls_certificate.ocsp_staple.inline_bytes)
    assert found and all(f == staple for f in found)


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_staple_is_refused_at_its_line(
    case: str, pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    breaks, message = CASES[case]
    layout = folder(pristine, tmp_path)
    breaks(layout.certs)
    settled(layout.certs)
    with pytest.raises(ConfigErrors) as caught:
        FolderLoader(layout.policy_dir).load()
    (error,) = caught.value.errors
    staple = str(layout.policy_dir / "../certs/edge.ocsp.der")
    assert error.location.path == str(layout.policy_file), error
    assert error.location.line == line_of(layout.policy_file, "ocsp_staple:"), error
    assert error.message.startswith(f"secret 'edge-server': ocsp_staple {staple}"), error
    assert re.search(message, error.message), error

    assert cli.main(["validate", str(layout.policy_dir)]) == 1
    out, _ = capsys.readouterr()
    assert re.search(message, out), out


EXPIRED = r"expired: its next update was due \d{4}-\d\d-\d\d \d\d:\d\d UTC"


def _secret(snapshots: SnapshotSet, name: str = "edge-server") -> Any:
    (found,) = {
        res.message.SerializeToString(): res.message
        for g in snapshots.groups
        for res in g.snapshot.of(ResourceType.SECRET).values()
        if res.name == name
    }.values()
    return found


@pytest.mark.parametrize("policy", [None, "lenient", "strict"])
def test_an_expired_staple_is_left_out_with_a_warning(
    policy: str | None, pristine: Path, tmp_path: Path
) -> None:
    """At its nextUpdate a staple stops the load only under must_staple: otherwise the
    certificate is served without it (Envoy would not staple it under lenient, and would
    fail every handshake under strict), other edits keep loading, and it is said."""
    layout = folder(pristine, tmp_path, policy)
    _expired(layout.certs)
    settled(layout.certs)
    snapshots = FolderLoader(layout.policy_dir).load()
    secret = _secret(snapshots)
    assert secret.tls_certificate.certificate_chain.inline_bytes  # the certificate: served
    assert not secret.tls_certificate.HasField("ocsp_staple")
    (warning,) = snapshots.warnings
    assert warning.location.line == line_of(layout.policy_file, "ocsp_staple:"), warning
    assert re.search(EXPIRED, warning.message), warning
    assert "served without a staple" in warning.message, warning
    (summary,) = [c for c in snapshots.certificates if c.secret == "edge-server"]
    status = summary.as_dict()
    assert (status["ocsp_stapled"], status["ocsp_expired"], status["ocsp_due"]) == (
        False,
        True,
        True,
    )


def test_an_expired_staple_under_must_staple_is_refused(pristine: Path, tmp_path: Path) -> None:
    """must_staple: nothing valid to serve without a current staple; the load is refused
    (the last good snapshot keeps serving) with the reason at the staple's line."""
    layout = folder(pristine, tmp_path, "must_staple")
    _expired(layout.certs)
    settled(layout.certs)
    with pytest.raises(ConfigErrors) as caught:
        FolderLoader(layout.policy_dir).load()
    (error,) = caught.value.errors
    assert error.location.line == line_of(layout.policy_file, "ocsp_staple:"), error
    assert re.search(EXPIRED, error.message), error
    assert "must_staple" in error.message, error


def test_a_due_staple_shows_in_status_metrics_and_page(pristine: Path, tmp_path: Path) -> None:
    """nextUpdate within a day: served, and /status, the page, `xdsplane status` and
    xdsplane_ocsp_staple_next_update_seconds say it is due."""
    from xdsplane import statuspage
    from xdsplane.metrics import _SnapshotCollector as SnapshotCollector

    layout = folder(pristine, tmp_path, "strict")
    _write(layout.certs, _response(layout.certs, next_update=datetime.timedelta(hours=12)))
    settled(layout.certs)
    snapshots = FolderLoader(layout.policy_dir).load()
    assert _secret(snapshots).tls_certificate.ocsp_staple.inline_bytes
    assert snapshots.warnings == ()
    (summary,) = [c for c in snapshots.certificates if c.secret == "edge-server"]
    entry = summary.as_dict()
    assert entry["ocsp_due"] is True and entry["ocsp_expired"] is False, entry
    assert entry["ocsp_stapled"] is True and 11.9 < float(entry["ocsp_hours_left"]) <= 12, entry
    status = {"certificates": [entry]}
    page = statuspage.render(status)
    assert "OCSP staple due: edge-server" in page and "DUE: next update" in page, page
    lines = "\n".join(statuspage.status_lines(status))
    assert "warning: the OCSP staple of edge-server is due" in lines, lines
    samples = {
        (s.name, s.labels["secret"], s.labels["stapled"]): s.value
        for family in SnapshotCollector(lambda: snapshots).collect()
        for s in family.samples
        if s.name == "xdsplane_ocsp_staple_next_update_seconds"
    }
    value = samples[("xdsplane_ocsp_staple_next_update_seconds", "edge-server", "true")]
    assert 12 * 3600 - 120 < value <= 12 * 3600, samples
    # A certificate without a staple has no such series.
    assert {k[1] for k in samples} == {"edge-server"}, samples


def test_the_issuer_must_be_the_certificates(pristine: Path, tmp_path: Path) -> None:
    layout = folder(pristine, tmp_path)
    text = layout.policy_file.read_text().replace(
        "certs/service-ca.crt\n", "certs/client-ca.crt\n", 1
    )
    layout.policy_file.write_text(text)
    with pytest.raises(ConfigErrors) as caught:
        FolderLoader(layout.policy_dir).load()
    (error,) = caught.value.errors
    assert (
        "issuer CN=client-ca" in error.message and "did not issue the certificate" in error.message
    )


def test_without_an_issuer_the_staple_cannot_be_checked(pristine: Path, tmp_path: Path) -> None:
    layout = folder(pristine, tmp_path)
    text = layout.policy_file.read_text().replace("    ocsp_issuer: ../certs/service-ca.crt\n", "")
    layout.policy_file.write_text(text)
    with pytest.raises(ConfigErrors) as caught:
        FolderLoader(layout.policy_dir).load()
    (error,) = caught.value.errors
    assert "the certificate file holds no issuer" in error.message, error
    # The chain with its CA after the leaf is enough.
    chain = (layout.certs / "edge.crt").read_bytes() + (
        layout.certs / "service-ca.crt"
    ).read_bytes()
    (layout.certs / "edge.crt").write_bytes(chain)
    FolderLoader(layout.policy_dir).load()


def test_must_staple_needs_a_staple(pristine: Path, tmp_path: Path) -> None:
    layout = folder(pristine, tmp_path, "must_staple")
    text = layout.policy_file.read_text().replace("    ocsp_staple: ../certs/edge.ocsp.der\n", "")
    text = text.replace("    ocsp_issuer: ../certs/service-ca.crt\n", "")
    layout.policy_file.write_text(text)
    with pytest.raises(ConfigErrors) as caught:
        FolderLoader(layout.policy_dir).load()
    (error,) = caught.value.errors
    assert error.location.line == line_of(layout.policy_file, "ocsp: must_staple"), error
    assert "secret 'edge-server' has no ocsp_staple" in error.message


def test_ocsp_needs_a_tls_listener(pristine: Path, tmp_path: Path) -> None:
    layout = folder(pristine, tmp_path)
    text = layout.policy_file.read_text()
    redirect = f"    redirect_to_https: true\n    https_port: {layout.https_port}\n"
    assert redirect in text
    plain = (
        "    hosts:\n"
        "      - name: plain\n"
        "        domains: [plain.example.com]\n"
        "        ocsp: lenient\n"
        "        routes: [{name: all, prefix: /, upstream: billing}]\n"
    )
    layout.policy_file.write_text(text.replace(redirect, plain))
    with pytest.raises(ConfigErrors) as caught:
        FolderLoader(layout.policy_dir).load()
    (error,) = caught.value.errors
    assert error.location.line == line_of(layout.policy_file, "ocsp: lenient"), error
    assert error.message.startswith("ocsp: listener 'http' has no tls"), error


# -- xdsplane certs ocsp --------------------------------------------------------------------


def test_certs_ocsp_writes_a_response_its_ca_signed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tmp_path / "certs"
    pki.init(certs)
    assert cli.main(["certs", "ocsp", "edge", "--dir", str(certs), "--days", "3"]) == 0
    out, _ = capsys.readouterr()
    assert f"wrote {certs / 'edge.ocsp.der'}" in out
    resp = ocsp.load_der_ocsp_response((certs / "edge.ocsp.der").read_bytes())
    edge, ca = pki.load_cert(certs / "edge.crt"), pki.load_cert(certs / "service-ca.crt")
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert resp.serial_number == edge.serial_number
    assert resp.next_update_utc is not None
    left = resp.next_update_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=2.9) < left <= datetime.timedelta(days=3)
    # openssl, independently: signed by service-ca, for edge, good.
    done = subprocess.run(
        [
            "openssl",
            "ocsp",
            "-respin",
            str(certs / "edge.ocsp.der"),
            "-CAfile",
            str(certs / "service-ca.crt"),
            "-issuer",
            str(certs / "service-ca.crt"),
            "-cert",
            str(certs / "edge.crt"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "Response verify OK" in done.stdout + done.stderr, done
    assert f"{certs / 'edge.crt'}: good" in done.stdout, done
    assert ca.subject.rfc4514_string()

    assert cli.main(["certs", "ocsp", "edge", "--dir", str(certs), "--revoked"]) == 0
    resp = ocsp.load_der_ocsp_response((certs / "edge.ocsp.der").read_bytes())
    assert resp.certificate_status == ocsp.OCSPCertStatus.REVOKED


def test_certs_ocsp_refuses_a_ca_and_a_missing_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tmp_path / "certs"
    pki.init(certs)
    assert cli.main(["certs", "ocsp", "service-ca", "--dir", str(certs)]) == 1
    assert cli.main(["certs", "ocsp", "nobody", "--dir", str(certs)]) == 1
    _, err = capsys.readouterr()
    assert "self-signed CA" in err and "no such certificate" in err
    assert [p.name for p in certs.glob("*.ocsp.der")] == ["edge.ocsp.der"]  # init's


# -- a real Envoy staples it ----------------------------------------------------------------

# One edge for the module's three tests (~20 s together here); 10 minutes is the ceiling
# on a much slower machine before the watchdog stops the processes.
MODULE_SECONDS = 600.0


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroup]:
    with process_group(tmp_path_factory.mktemp("ocsp-logs"), max_seconds=MODULE_SECONDS) as g:
        yield g


@pytest.fixture(autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    if "edge" in request.fixturenames:
        attach_to_report(request, request.getfixturevalue("group"))


@pytest.fixture(scope="module")
def edge(group: ProcessGroup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    e = start_edge(group, tmp_path_factory.mktemp("ocsp-edge"))
    try:
        pki.ocsp_response(e.certs, "edge", days=7)
        from harness import write_atomic

        write_atomic(e.layout.policy_file, stapled_policy(e.layout, "strict"))
        wait_until(
            lambda: "Cert Status: good" in s_client(e),
            20,
            what="Envoy staples the OCSP response",
        )
        yield e
    finally:
        e.upstream.stop()


def s_client(edge: Edge) -> str:
    done = subprocess.run(
        [
            "openssl",
            "s_client",
            "-status",
            "-servername",
            BILLING,
            "-connect",
            f"127.0.0.1:{edge.layout.https_port}",
            "-CAfile",
            str(edge.certs / "service-ca.crt"),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout


def next_update(output: str) -> str:
    m = re.search(r"Next Update: (.+)", output)
    assert m, output
    return m.group(1).strip()


@pytest.mark.envoy
def test_envoy_staples_the_response(edge: Edge) -> None:
    out = s_client(edge)
    assert "OCSP Response Status: successful" in out, out
    assert "Cert Status: good" in out, out
    edge_serial = format(pki.load_cert(edge.certs / "edge.crt").serial_number, "X")
    assert re.search(rf"Serial Number: 0*{edge_serial}\b", out), out


@pytest.mark.envoy
def test_a_new_staple_reaches_new_handshakes_without_dropping_connections(edge: Edge) -> None:
    before = next_update(s_client(edge))
    conn = TlsConnection(edge.layout.https_port, edge.ctx(), BILLING)
    try:
        assert conn.get("/healthz").status == 200
        pki.ocsp_response(edge.certs, "edge", days=3)
        wait_until(
            lambda: next_update(s_client(edge)) != before,
            20,
            what="new handshakes staple the new response",
        )
        assert "Cert Status: good" in s_client(edge)
        assert conn.get("/healthz").status == 200
        assert conn.connects == 1, "the open connection was dropped"
    finally:
        conn.close()


LIVE = ("revoked", "wrong-certificate", "forged-signature")


@pytest.mark.envoy
@pytest.mark.parametrize("case", LIVE)
def test_a_bad_staple_is_refused_live_and_the_good_one_kept(edge: Edge, case: str) -> None:
    breaks, message = CASES[case]
    good = (edge.certs / "edge.ocsp.der").read_bytes()
    served = next_update(s_client(edge))
    sds_before = edge.secret_stat("edge-server")
    try:
        breaks(edge.certs)

        def reported() -> list[str] | None:
            errors: list[str] = edge.server.status()["reload"]["errors"]
            return errors or None

        (error,) = wait_until(reported, 10, what=f"/status reports the {case} staple")
        assert "ocsp_staple" in error and re.search(message, error), error
        holds_for(
            lambda: "Cert Status: good" in (out := s_client(edge)) and next_update(out) == served,
            1.0,
            what="the last good staple is still served",
        )
        assert edge.secret_stat("edge-server") == sds_before
    finally:
        pki.write_atomic(edge.certs / "edge.ocsp.der", good)
        wait_until(lambda: edge.server.status()["reload"]["errors"] == [], 10, what="cleared")


def _staple_metric(edge: Edge) -> float | None:
    from harness import http_get
    from prometheus_client.parser import text_string_to_metric_families

    text = http_get(edge.server.admin_port, "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "xdsplane_ocsp_staple_next_update_seconds":
                return float(sample.value)
    return None


# A staple that expires while served: long enough to be loaded and stapled first.
SHORT_STAPLE_SECONDS = 12  # stapled for the first 9 s (tlsfiles.STAPLE_MARGIN_SECONDS)


@pytest.mark.envoy
def test_a_staple_expiring_while_served_is_dropped_and_the_edge_stays_up(edge: Edge) -> None:
    """The edge's host is ocsp: strict, under which Envoy fails every handshake with an
    expired staple. At its nextUpdate (no file changes) xdsplane reloads on its own and
    serves the certificate without the staple: handshakes go on, unstapled; /status and
    the metric say it expired; a fresh staple is stapled again."""
    good = (edge.certs / "edge.ocsp.der").read_bytes()
    failed_before = _staple_failures(edge)
    short = _response(edge.certs, next_update=datetime.timedelta(seconds=SHORT_STAPLE_SECONDS))
    _write(edge.certs, short)
    due = next_update(pki_ocsp_text(short))
    try:
        wait_until(
            lambda: (out := s_client(edge)) and "Cert Status: good" in out and due in out,
            SHORT_STAPLE_SECONDS,
            what="the short-lived staple is stapled",
        )
        # Past its nextUpdate: no staple, and handshakes of clients that ask for one (as
        # browsers do; Envoy under strict refuses them while it holds an expired staple:
        # its ssl.ocsp_staple_failed) still succeed, as does a request.
        out = wait_until(
            lambda: o if "OCSP response: no response sent" in (o := s_client(edge)) else None,
            SHORT_STAPLE_SECONDS + 20,
            what="the expired staple is no longer stapled",
        )
        assert "Verify return code: 0 (ok)" in out, out
        assert _staple_failures(edge) == failed_before
        assert edge.get("/healthz").status == 200
        status = edge.server.status()
        (cert,) = [c for c in status["certificates"] if c["secret"] == "edge-server"]
        assert cert["ocsp_expired"] is True and cert["ocsp_stapled"] is False, cert
        assert any("served without a staple" in w for w in status["reload"]["warnings"]), status
        assert status["reload"]["errors"] == [], status
        metric = _staple_metric(edge)
        # dropped STAPLE_MARGIN_SECONDS before its nextUpdate: at most that much left
        assert metric is not None and metric <= tlsfiles.STAPLE_MARGIN_SECONDS, metric
    finally:
        pki.write_atomic(edge.certs / "edge.ocsp.der", good)
        wait_until(lambda: "Cert Status: good" in s_client(edge), 20, what="stapled again")
    assert edge.server.status()["reload"]["warnings"] == []


def _staple_failures(edge: Edge) -> int:
    """Handshakes Envoy refused for an expired staple under strict (every listener)."""
    return sum(v for k, v in edge.envoy.stats(r"ssl\.ocsp_staple_failed$").items())


def pki_ocsp_text(der: bytes) -> str:
    """'Next Update: ...' as openssl prints it, for a DER response."""
    resp = ocsp.load_der_ocsp_response(der)
    assert resp.next_update_utc is not None
    return f"Next Update: {resp.next_update_utc:%b %e %H:%M:%S %Y} GMT"


@pytest.mark.envoy
def test_certs_rotate_renews_the_staple_with_the_certificate(edge: Edge) -> None:
    """`certs rotate edge` re-issues edge.crt and, as a staple exists, edge.ocsp.der for the
    new serial: new handshakes get the new certificate with a staple for it, and the
    loader never reports the half-way state as an error."""
    pki.rotate(edge.certs, "edge")
    serial = format(pki.load_cert(edge.certs / "edge.crt").serial_number, "X")
    wait_until(
        lambda: re.search(rf"Serial Number: 0*{serial}\b", s_client(edge)),
        20,
        what="the new certificate's staple is served",
    )
    out = s_client(edge)
    assert "Cert Status: good" in out, out
    assert edge.server.status()["reload"]["errors"] == []


@pytest.mark.envoy
def test_the_sample_under_up_staples_its_edge_certificate(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    """`xdsplane up` on the sample (no certificates yet): certs init writes edge.ocsp.der,
    and the edge staples it on the billing host."""
    from test_up import running_up

    with running_up(tmp_path, procs) as up:
        staple = ocsp.load_der_ocsp_response((up.certs / "edge.ocsp.der").read_bytes())
        assert staple.serial_number == pki.load_cert(up.certs / "edge.crt").serial_number
        done = subprocess.run(
            ["openssl", "s_client", "-status", "-servername", BILLING, "-connect",
             f"127.0.0.1:{up.edge_port}", "-CAfile", str(up.certs / "service-ca.crt")],
            input="", capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert "OCSP Response Status: successful" in done.stdout, done.stdout
        assert "Cert Status: good" in done.stdout, done.stdout
        serial = format(staple.serial_number, "X")
        assert re.search(rf"Serial Number: 0*{serial}\b", done.stdout), done.stdout

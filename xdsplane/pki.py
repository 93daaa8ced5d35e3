"""A development PKI on ``cryptography``: the CAs, certificates and keys the sample needs.

Files are ``DIR/NAME.crt`` and ``DIR/NAME.key`` (keys mode 0600), written atomically: a
reader (the control plane's watcher) never sees half a file. Keys are ECDSA P-256.
Not for production CAs: no key protection beyond file permissions.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from xdsplane import jwt
from xdsplane.atomicwrite import write_atomic as write_atomic  # tests write with it too

DEFAULT_DAYS = 90
GUARD_CLIENT_URI = "spiffe://xdsplane/guard-client"  # the SAN the guard lets call it
CA_DAYS = 3650


class PkiError(Exception):
    pass


@dataclass(frozen=True)
class Spec:
    """What ``certs init`` issues."""

    name: str
    ca: str | None  # None: a self-signed CA
    dns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    days: int = DEFAULT_DAYS
    usage: tuple[str, ...] = field(default=("server", "client"))


SAMPLE: tuple[Spec, ...] = (
    Spec("client-ca", None, days=CA_DAYS),
    Spec("service-ca", None, days=CA_DAYS),
    Spec(
        "edge",
        "service-ca",
        dns=("billing.example.com", "mtls.billing.example.com", "localhost"),
        usage=("server",),
    ),
    Spec("gateway", "service-ca", uris=("spiffe://example.com/gateway",), usage=("client",)),
    Spec("billing", "service-ca", dns=("billing.internal", "localhost"), usage=("server",)),
    Spec("alice", "client-ca", uris=("spiffe://example.com/ops/alice",), usage=("client",)),
    # mTLS on the xDS channel (xdsplane serve --tls-cert/--tls-key/--client-ca service-ca.crt):
    # the control plane's server certificate and the sample node's client certificate.
    Spec("xds-server", "service-ca", dns=("localhost", "127.0.0.1"), usage=("server",)),
    Spec("edge-1", "service-ca", uris=("spiffe://xdsplane/node/edge-1",), usage=("client",)),
    # The sample gRPC client's certificate for the xDS channel (node grpc-1, see
    # snapshots/grpc-clients.yaml and `xdsplane bootstrap --grpc`).
    Spec("grpc-1", "service-ca", uris=("spiffe://xdsplane/node/grpc-1",), usage=("client",)),
    # mTLS between Envoy and the guard (xdsplane guard --tls-cert guard.crt ... --client-san
    # spiffe://xdsplane/guard-client): the guard's server certificate and the client
    # certificate Envoy presents to it (the policy's guard.tls.certificate).
    Spec("guard", "service-ca", dns=("guard", "localhost", "127.0.0.1"), usage=("server",)),
    Spec("guard-client", "service-ca", uris=(GUARD_CLIENT_URI,), usage=("client",)),
)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "xdsplane development"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _sans(dns: Iterable[str], uris: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for d in dns:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(d)))
        except ValueError:
            out.append(x509.DNSName(d))
    out.extend(x509.UniformResourceIdentifier(u) for u in uris)
    return out


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path}: no such certificate") from None
    except ValueError as e:
        raise PkiError(f"{path}: not a PEM certificate ({e})") from None


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PkiError(f"{path}: no such key") from None
    except (ValueError, TypeError):
        raise PkiError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path}: only EC keys are supported by this development PKI")
    return key


def issue(
    directory: Path,
    name: str,
    ca: str | None,
    dns: Iterable[str] = (),
    uris: Iterable[str] = (),
    days: int = DEFAULT_DAYS,
    usage: Iterable[str] = ("server", "client"),
) -> Path:
    """Issue ``NAME.crt``/``NAME.key`` signed by ``CA`` (or a self-signed CA when None)."""
    if days < 1:
        raise PkiError("--days must be at least 1")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if ca is None:
        builder = builder.issuer_name(_name(name))
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        signer: ec.EllipticCurvePrivateKey = key
    else:
        ca_cert = load_cert(directory / f"{ca}.crt")
        signer = load_key(directory / f"{ca}.key")
        builder = builder.issuer_name(ca_cert.subject)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
        )
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), True
        )
        ekus = []
        if "server" in usage:
            ekus.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if "client" in usage:
            ekus.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        if ekus:
            builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), False)
        sans = _sans(dns, uris)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), False)
    cert = builder.sign(signer, hashes.SHA256())
    # Key first: a watcher that reads between the two renames sees a key that does not
    # match the old certificate and rejects the pair until the certificate arrives.
    write_atomic(directory / f"{name}.key", _key_bytes(key), 0o600)
    write_atomic(directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
    return directory / f"{name}.crt"


def empty_crl(directory: Path, ca: str, days: int = 365) -> Path:
    ca_cert = load_cert(directory / f"{ca}.crt")
    signer = load_key(directory / f"{ca}.key")
    now = _now()
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=days))
        .sign(signer, hashes.SHA256())
    )
    path = directory / f"{ca}.crl"
    write_atomic(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


OCSP_DAYS = 7


def ocsp_response(directory: Path, name: str, days: int = OCSP_DAYS, revoked: bool = False) -> Path:
    """Write ``NAME.ocsp.der``: an OCSP response for NAME signed by its CA (found in
    ``directory``), good (or revoked, for tests) from five minutes ago for ``days``."""
    if days < 1:
        raise PkiError("--days must be at least 1")
    cert = load_cert(directory / f"{name}.crt")
    ca = _find_issuer(directory, cert)
    if ca is None:
        raise PkiError(f"{name} is a self-signed CA: there is no issuer to answer for it")
    ca_cert = load_cert(directory / f"{ca}.crt")
    signer = load_key(directory / f"{ca}.key")
    now = _now()
    this_update = now - datetime.timedelta(minutes=5)
    status = ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD
    response = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=cert,
            issuer=ca_cert,
            algorithm=hashes.SHA1(),  # the hash every client matches (RFC 5019)
            cert_status=status,
            this_update=this_update,
            next_update=now + datetime.timedelta(days=days),
            revocation_time=this_update if revoked else None,
            revocation_reason=x509.ReasonFlags.key_compromise if revoked else None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, ca_cert)
        .sign(signer, hashes.SHA256())
    )
    path = directory / f"{name}.ocsp.der"
    write_atomic(path, response.public_bytes(serialization.Encoding.DER))
    return path


STAPLED = ("edge",)


def _staple_due(directory: Path, name: str) -> bool:
    try:
        resp = ocsp.load_der_ocsp_response((directory / f"{name}.ocsp.der").read_bytes())
        cert = load_cert(directory / f"{name}.crt")
        if resp.serial_number != cert.serial_number or resp.next_update_utc is None:
            return True
        return resp.next_update_utc - _now() < datetime.timedelta(days=1)
    except (OSError, ValueError, PkiError):
        return True


def _find_issuer(directory: Path, cert: x509.Certificate) -> str | None:
    if cert.issuer == cert.subject:
        return None
    for path in sorted(directory.glob("*.crt")):
        try:
            candidate = x509.load_pem_x509_certificate(path.read_bytes())
        except ValueError:
            continue
        if candidate.subject == cert.issuer and (directory / f"{path.stem}.key").exists():
            return path.stem
    raise PkiError(f"no CA in {directory} issued {cert.subject.rfc4514_string()}")


def rotate(directory: Path, name: str, days: int | None = None) -> Path:
    """Re-issue NAME with a new key and serial, the same SANs, usages and issuer."""
    old = load_cert(directory / f"{name}.crt")
    ca = _find_issuer(directory, old)
    dns: list[str] = []
    uris: list[str] = []
    try:
        san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [*san.get_values_for_type(x509.DNSName)]
        dns += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        uris = list(san.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        pass
    usage: list[str] = []
    try:
        eku = old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.SERVER_AUTH in eku:
            usage.append("server")
        if ExtendedKeyUsageOID.CLIENT_AUTH in eku:
            usage.append("client")
    except x509.ExtensionNotFound:
        usage = ["server", "client"]
    if days is None:
        lifetime = old.not_valid_after_utc - old.not_valid_before_utc
        days = max(1, round(lifetime.total_seconds() / 86400))
    path = issue(directory, name, ca, dns, uris, days, usage)
    if ca is not None and (directory / f"{name}.ocsp.der").exists():
        # The old staple answers for the old serial: a new one, right after the certificate
        # (a loader seeing the two half-way waits, as for the key).
        ocsp_response(directory, name)
    return path


def init(directory: Path, force: bool = False) -> list[Path]:
    """Everything the sample needs; existing files are kept unless ``force``."""
    written: list[Path] = []
    for spec in SAMPLE:
        if (directory / f"{spec.name}.crt").exists() and not force:
            continue
        written.append(
            issue(directory, spec.name, spec.ca, spec.dns, spec.uris, spec.days, spec.usage)
        )
    if force or not (directory / "client-ca.crl").exists():
        written.append(empty_crl(directory, "client-ca"))
    # The sample staples an OCSP response for edge (the secret's ocsp_staple): renewed when
    # missing, for another certificate, or due within a day, so a restart never meets an
    # expired one.
    for name in STAPLED:
        if force or (directory / f"{name}.crt") in written or _staple_due(directory, name):
            written.append(ocsp_response(directory, name))
    # The development JWT issuer: jwt-signing.key (0600) and its public key in jwks.json.
    written.extend(jwt.init(directory, force))
    return written

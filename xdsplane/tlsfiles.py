"""Checks on certificate, key, CA and CRL files before they are served over SDS.

A certificate secret is served only when its key matches its certificate, its chain is in
order (each certificate signed by the next), and it is valid now; a CA bundle only when it
holds CA certificates valid now, and its CRL (if any) is signed by one of them; an OCSP
staple only when it answers `good` for the certificate, signed by its issuer, and is current.
What is found is summarized (never the key) for /status, logs and expiry warnings.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID


@dataclass(frozen=True, slots=True)
class CertSummary:
    """What people need to know about a served certificate; no key material."""

    secret: str
    path: str
    subject: str
    issuer: str
    serial: str
    not_after: datetime.datetime
    dns: tuple[str, ...]
    uris: tuple[str, ...]
    fingerprint_sha256: str
    is_ca: bool
    # The OCSP staple of a certificate secret: its nextUpdate, and whether it is served
    # (an expired one is not, unless a host has ocsp: must_staple: docs/policy.md).
    ocsp_next_update: datetime.datetime | None = None
    ocsp_stapled: bool = False

    def seconds_left(self, now: datetime.datetime | None = None) -> float:
        now = now or datetime.datetime.now(datetime.UTC)
        return (self.not_after - now).total_seconds()

    def ocsp_seconds_left(self, now: datetime.datetime | None = None) -> float | None:
        """Seconds until the staple's nextUpdate (negative: expired); None without one."""
        if self.ocsp_next_update is None:
            return None
        now = now or datetime.datetime.now(datetime.UTC)
        return (self.ocsp_next_update - now).total_seconds()

    def as_dict(self) -> dict[str, object]:
        return {
            "secret": self.secret,
            "path": self.path,
            "subject": self.subject,
            "issuer": self.issuer,
            "serial": self.serial,
            "not_after": self.not_after.isoformat(),
            "days_left": round(self.seconds_left() / 86400, 1),
            "dns": list(self.dns),
            "uris": list(self.uris),
            "fingerprint_sha256": self.fingerprint_sha256,
            "ca": self.is_ca,
            **self._ocsp_dict(),
        }

    def _ocsp_dict(self) -> dict[str, object]:
        left = self.ocsp_seconds_left()
        if self.ocsp_next_update is None or left is None:
            return {}
        return {
            "ocsp_next_update": self.ocsp_next_update.isoformat(),
            "ocsp_hours_left": round(left / 3600, 1),
            "ocsp_stapled": self.ocsp_stapled,
            # Renew it (xdsplane certs ocsp NAME) before: due within a day, or past.
            "ocsp_due": left < OCSP_DUE_SECONDS,
            # expired for serving: dropped a margin before its nextUpdate
            "ocsp_expired": left <= STAPLE_MARGIN_SECONDS,
        }


class TlsFileError(Exception):
    pass


class KeyMismatch(TlsFileError):
    """The key does not match the certificate (maybe only half-way through a rotation)."""


class StapleMismatch(TlsFileError):
    """The OCSP staple is for another certificate (maybe only half-way through a rotation)."""


# A staple is dropped this long before its nextUpdate: the reload that leaves it out must
# reach Envoy before Envoy itself sees it expired (under ocsp: strict Envoy then fails every
# handshake that asks for a staple).
STAPLE_MARGIN_SECONDS = 3.0


class StapleExpired(TlsFileError):
    """The OCSP staple is good in every way but time: its nextUpdate has passed."""

    def __init__(self, message: str, next_update: datetime.datetime) -> None:
        super().__init__(message)
        self.next_update = next_update


OCSP_DUE_SECONDS = 86400.0
"""A staple whose nextUpdate is this close is due: /status warns, the alert fires."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _certs(data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsFileError(f"{what} holds no valid PEM certificate") from None
    if not certs:
        raise TlsFileError(f"{what} holds no certificate")
    return certs


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _sans(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    dns = [*san.get_values_for_type(x509.DNSName)]
    dns += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return tuple(dns), tuple(san.get_values_for_type(x509.UniformResourceIdentifier))


def summarize(secret: str, path: str, cert: x509.Certificate) -> CertSummary:
    dns, uris = _sans(cert)
    return CertSummary(
        secret=secret,
        path=path,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"),
        not_after=cert.not_valid_after_utc,
        dns=dns,
        uris=uris,
        fingerprint_sha256=hashlib.sha256(
            cert.public_bytes(serialization.Encoding.DER)
        ).hexdigest(),
        is_ca=_is_ca(cert),
    )


def _check_validity(cert: x509.Certificate, what: str, now: datetime.datetime) -> None:
    if cert.not_valid_after_utc <= now:
        raise TlsFileError(
            f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
            f"({cert.subject.rfc4514_string()})"
        )
    if cert.not_valid_before_utc > now:
        raise TlsFileError(
            f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )


def check_certificate(secret: str, cert_path: str, cert_pem: bytes, key_pem: bytes) -> CertSummary:
    """The leaf's summary; raises TlsFileError naming what is wrong."""
    now = _now()
    chain = _certs(cert_pem, "certificate file")
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TlsFileError("private key is encrypted; Envoy needs an unencrypted key") from None
    except ValueError:
        raise TlsFileError("private_key file holds no valid PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) != leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise KeyMismatch(
            "private key does not match the certificate "
            f"({leaf.subject.rfc4514_string()}, serial {leaf.serial_number:x})"
        )
    _check_validity(leaf, "certificate", now)
    for i, (child, parent) in enumerate(itertools.pairwise(chain)):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise TlsFileError(
                f"certificate chain is broken at position {i + 1}: "
                f"{child.subject.rfc4514_string()} is not issued by "
                f"{parent.subject.rfc4514_string()} ({e.__class__.__name__})"
            ) from None
        _check_validity(parent, f"chain certificate {i + 2}", now)
    return summarize(secret, cert_path, leaf)


def check_ocsp(
    staple_path: str, staple_der: bytes, cert_pem: bytes, issuer_pem: bytes | None
) -> datetime.datetime:
    """An OCSP response to staple: for the chain's leaf (serial and issuer hashes), signed
    by its issuer (or a responder the issuer delegated to), status good, current. The issuer
    is ``issuer_pem`` or else the chain's second certificate. Returns its nextUpdate.
    Raises TlsFileError (StapleExpired when only its nextUpdate has passed)."""
    now = _now()
    chain = _certs(cert_pem, "certificate file")
    leaf = chain[0]
    what = f"ocsp_staple {staple_path}"
    if issuer_pem is not None:
        issuer = _certs(issuer_pem, "ocsp_issuer file")[0]
    elif len(chain) > 1:
        issuer = chain[1]
    elif leaf.issuer == leaf.subject:
        issuer = leaf  # self-signed: it answers for itself
    else:
        raise TlsFileError(
            f"{what}: cannot check its signature: the certificate file holds no issuer "
            "(add the CA after the leaf, or set ocsp_issuer)"
        )
    if leaf.issuer != issuer.subject:
        raise TlsFileError(
            f"{what}: issuer {issuer.subject.rfc4514_string()} did not issue the certificate "
            f"({leaf.issuer.rfc4514_string()})"
        )
    try:
        resp = ocsp.load_der_ocsp_response(staple_der)
    except ValueError:
        raise TlsFileError(f"{what} holds no valid DER OCSP response") from None
    if resp.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise TlsFileError(f"{what}: response status is {resp.response_status.name.lower()}")
    if sum(1 for _ in resp.responses) != 1:
        raise TlsFileError(f"{what} must answer for one certificate only (Envoy's rule)")
    if resp.serial_number != leaf.serial_number:
        raise StapleMismatch(
            f"{what} is for serial {resp.serial_number:x}, not the certificate's "
            f"({leaf.serial_number:x})"
        )
    try:
        algorithm = resp.hash_algorithm
        expected = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, algorithm).build()
    except (ValueError, UnsupportedAlgorithm):
        raise TlsFileError(f"{what}: its certificate ID uses an unsupported hash") from None
    if (
        resp.issuer_name_hash != expected.issuer_name_hash
        or resp.issuer_key_hash != expected.issuer_key_hash
    ):
        raise TlsFileError(f"{what} names another issuer than the certificate's")
    signer = issuer
    if resp.certificates:
        delegate = resp.certificates[0]
        try:
            delegate.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise TlsFileError(
                f"{what}: its responder certificate ({delegate.subject.rfc4514_string()}) "
                "is not issued by the certificate's issuer"
            ) from None
        try:
            eku = delegate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            eku = x509.ExtendedKeyUsage([])
        if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
            raise TlsFileError(
                f"{what}: its responder certificate is not delegated (no OCSPSigning usage)"
            )
        _check_validity(delegate, f"{what}: responder certificate", now)
        signer = delegate
    if not _signed_by(resp, signer):
        raise TlsFileError(f"{what}: signature does not verify with its issuer")
    if resp.certificate_status == ocsp.OCSPCertStatus.REVOKED:
        when = resp.revocation_time_utc
        at = f" on {when:%Y-%m-%d %H:%M} UTC" if when is not None else ""
        raise TlsFileError(f"{what}: the certificate is revoked{at}")
    if resp.certificate_status != ocsp.OCSPCertStatus.GOOD:
        raise TlsFileError(f"{what}: certificate status is unknown to the responder")
    if resp.this_update_utc > now:
        raise TlsFileError(f"{what} is not valid before {resp.this_update_utc:%Y-%m-%d %H:%M} UTC")
    if resp.next_update_utc is None:
        raise TlsFileError(f"{what} has no next update (Envoy refuses such responses)")
    if resp.next_update_utc <= now + datetime.timedelta(seconds=STAPLE_MARGIN_SECONDS):
        raise StapleExpired(
            f"{what} expired: its next update was due {resp.next_update_utc:%Y-%m-%d %H:%M} UTC",
            resp.next_update_utc,
        )
    return resp.next_update_utc


def _signed_by(resp: ocsp.OCSPResponse, signer: x509.Certificate) -> bool:
    key = signer.public_key()
    algorithm = resp.signature_hash_algorithm
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(algorithm))  # type: ignore[arg-type]
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(), algorithm)  # type: ignore[arg-type]
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(resp.signature, resp.tbs_response_bytes)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def check_ca(secret: str, ca_path: str, ca_pem: bytes, crl_pem: bytes | None) -> list[CertSummary]:
    now = _now()
    cas = _certs(ca_pem, "ca file")
    for i, ca in enumerate(cas):
        if not _is_ca(ca):
            raise TlsFileError(
                f"ca file certificate {i + 1} ({ca.subject.rfc4514_string()}) is not a CA "
                "(no basicConstraints CA:TRUE)"
            )
        _check_validity(ca, f"CA certificate {i + 1}", now)
    if crl_pem is not None:
        try:
            crl = x509.load_pem_x509_crl(crl_pem)
        except ValueError:
            raise TlsFileError("crl file holds no valid PEM CRL") from None
        issuers = [ca for ca in cas if ca.subject == crl.issuer]
        if not issuers:
            raise TlsFileError(
                f"crl is issued by {crl.issuer.rfc4514_string()}, which is not in the ca file"
            )
        if not any(crl.is_signature_valid(ca.public_key()) for ca in issuers):  # type: ignore[arg-type]
            raise TlsFileError("crl signature does not verify with its CA")
        if crl.next_update_utc is not None and crl.next_update_utc <= now:
            raise TlsFileError(
                f"crl expired: its next update was due {crl.next_update_utc:%Y-%m-%d %H:%M} UTC "
                "(Envoy would refuse every client certificate)"
            )
        if crl.last_update_utc > now:
            raise TlsFileError(f"crl is not valid before {crl.last_update_utc:%Y-%m-%d %H:%M} UTC")
    return [summarize(secret, ca_path, ca) for ca in cas]


def covers(sans: tuple[str, ...], domain: str) -> bool:
    """Does a certificate with these DNS SANs serve ``domain`` (itself maybe ``*.x``)?"""
    domain = domain.lower().rstrip(".")
    for san in sans:
        san = san.lower().rstrip(".")
        if san == domain:
            return True
        if san.startswith("*.") and not domain.startswith("*."):
            rest = domain.split(".", 1)
            if len(rest) == 2 and rest[1] == san[2:]:
                return True
    return False

"""Secrets from the files a policy names; contents are passed in, never read here."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from xdsplane.policy.model import Secret


def resolve(folder: Path, path: str) -> str:
    """A policy path (relative to its file's folder) as read and shown: joined, not resolved,
    so messages show the path the way the user wrote it, from where the command runs."""
    return path if Path(path).is_absolute() else str(folder / path)


def paths(secret: Secret, folder: Path) -> dict[str, str]:
    """The files a secret needs, by field name."""
    out = {}
    for field in ("certificate", "private_key", "ocsp_staple", "ocsp_issuer", "ca", "crl"):
        value = getattr(secret, field)
        if value is not None:
            out[field] = resolve(folder, value)
    return out


def secret(name: str, spec: Secret, folder: Path, files: Mapping[str, bytes]) -> Any:
    p = paths(spec, folder)

    def data(field: str) -> Any:
        return base_pb2.DataSource(inline_bytes=files[p[field]])

    if spec.is_certificate:
        cert = common_pb2.TlsCertificate(
            certificate_chain=data("certificate"), private_key=data("private_key")
        )
        if "ocsp_staple" in p:
            cert.ocsp_staple.CopyFrom(data("ocsp_staple"))
        return secret_pb2.Secret(name=name, tls_certificate=cert)
    ctx = common_pb2.CertificateValidationContext(trusted_ca=data("ca"))
    if "crl" in p:
        ctx.crl.CopyFrom(data("crl"))
    return secret_pb2.Secret(name=name, validation_context=ctx)

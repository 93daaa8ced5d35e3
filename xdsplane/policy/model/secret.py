"""The policy schema: secrets (certificates, keys, CAs, CRLs, OCSP staples)."""

from __future__ import annotations

from pydantic import (
    Field,
    model_validator,
)

from xdsplane.policy.model.common import (
    Model,
)

# -- secrets ---------------------------------------------------------------------------------


class Secret(Model):
    """Files served over SDS. Paths are relative to the policy file's folder.

    Either a certificate with its private key, or a CA bundle (optionally with a CRL).
    """

    certificate: str | None = Field(None, description="PEM certificate chain file")
    private_key: str | None = Field(None, description="PEM private key file")
    ca: str | None = Field(None, description="PEM CA bundle file, to verify peers")
    crl: str | None = Field(None, description="PEM certificate revocation list for `ca`")
    ocsp_staple: str | None = Field(
        None,
        description="DER OCSP response for `certificate`, stapled in TLS handshakes; checked "
        "at load: for this certificate, signed by its issuer, status good, current",
    )
    ocsp_issuer: str | None = Field(
        None,
        description="PEM certificate of the issuer that signs `ocsp_staple` "
        "(default: the second certificate of the `certificate` chain)",
    )

    @model_validator(mode="after")
    def _kind(self) -> Secret:
        cert = self.certificate is not None or self.private_key is not None
        ca = self.ca is not None or self.crl is not None
        if cert and ca:
            raise ValueError("a secret is either certificate+private_key or ca (+crl), not both")
        if cert and (self.certificate is None or self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if self.crl is not None and self.ca is None:
            raise ValueError("crl needs ca")
        if (self.ocsp_staple is not None or self.ocsp_issuer is not None) and not cert:
            raise ValueError("ocsp_staple goes with certificate and private_key")
        if self.ocsp_issuer is not None and self.ocsp_staple is None:
            raise ValueError("ocsp_issuer needs ocsp_staple")
        if not cert and not ca:
            raise ValueError("give certificate and private_key, or ca")
        return self

    @property
    def is_certificate(self) -> bool:
        return self.certificate is not None

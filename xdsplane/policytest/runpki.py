"""The run's own CA, certificates and JWT key, in a private temporary folder.

Everything here lives for one run of ``xdsplane test`` and is removed with its folder: no
key, certificate or token of the run is printed or kept. One CA of the run stands in for
every CA the policy names and signs every certificate the run needs (see docs/testing.md,
"Hermetic replacements").
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from xdsplane import jwt, pki

CA = "run-ca"
DAYS = 2  # lifetime of what is issued here: one run, with room for a slow machine


def _ascii(names: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n for n in names if n and n != "*" and n.isascii()))


class RunPki:
    """A folder (mode 0700) holding the run's CA and what it issued; ``close()`` removes it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="xdsplane-test-"))
        self._lock = threading.Lock()
        self._issued: dict[tuple[tuple[str, ...], tuple[str, ...], str], str] = {}
        pki.issue(self.dir, CA, None, days=DAYS)
        self.ca_path = self.dir / f"{CA}.crt"
        self.jwt_key = jwt.new_key()

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- certificates -----------------------------------------------------------------------

    def issue(
        self, dns: Iterable[str] = (), uris: Iterable[str] = (), usage: str = "both"
    ) -> tuple[Path, Path]:
        """A certificate of the run's CA with these SANs (made once per SAN set): its
        certificate and key files."""
        key = (_ascii(dns), _ascii(uris), usage)
        with self._lock:
            name = self._issued.get(key)
            if name is None:
                name = f"cert-{len(self._issued) + 1}"
                usages = {"server": ("server",), "client": ("client",)}.get(
                    usage, ("server", "client")
                )
                pki.issue(self.dir, name, CA, key[0], key[1], DAYS, usages)
                self._issued[key] = name
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"

    def crl(self) -> Path:
        path = self.dir / f"{CA}.crl"
        if not path.exists():
            pki.empty_crl(self.dir, CA, days=DAYS)
        return path

    def ocsp(self, cert: Path) -> Path:
        """A good OCSP response for ``cert`` (issued by this run), signed by the run's CA."""
        return pki.ocsp_response(self.dir, cert.stem, days=DAYS)

    # -- tokens -----------------------------------------------------------------------------

    def jwks(self) -> bytes:
        return jwt.jwks(self.jwt_key)

    def token(self, claims: Mapping[str, Any]) -> str:
        return jwt.sign(self.jwt_key, claims)


def token_claims(
    sub: str,
    iss: str | None,
    aud: str | list[str] | None,
    exp_in: int | None,
    default_ttl: int,
    extra: Mapping[str, Any],
    now: float | None = None,
) -> dict[str, Any]:
    """The claims of a case's token: ``exp_in`` seconds from now (default ``default_ttl``);
    issued a minute before an expiry in the past, so the token is only expired."""
    issued = int(time.time() if now is None else now)
    exp = issued + (default_ttl if exp_in is None else exp_in)
    iat = min(issued, exp - 60)
    out: dict[str, Any] = {"sub": sub, "iat": iat, "nbf": iat, "exp": exp}
    if iss is not None:
        out["iss"] = iss
    if aud is not None:
        out["aud"] = aud
    out["jti"] = jwt.b64url(secrets.token_bytes(16))
    out.update(extra)
    return out

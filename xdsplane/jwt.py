"""Development JWTs: an ES256 signing key, its JWKS, and compact JWS tokens signed with it.

Written by hand on ``cryptography`` (no JWT library): a token is
``base64url(header) . base64url(payload) . base64url(r || s)``, the ECDSA signature in the
raw 64-byte form JWS requires (RFC 7518 3.4), not the DER that ``cryptography`` returns.
For ``xdsplane certs init`` / ``xdsplane token`` and the tests, not for a production issuer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from xdsplane.atomicwrite import write_atomic

KEY_FILE = "jwt-signing.key"
JWKS_FILE = "jwks.json"
DEFAULT_ISSUER = "https://idp.example.com"
DEFAULT_AUDIENCE = "billing"
DEFAULT_TTL = 300
_P256_BYTES = 32


class JwtError(Exception):
    pass


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise JwtError(f"{path}: no such key (run `xdsplane certs init`)") from None
    except (ValueError, TypeError):
        raise JwtError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise JwtError(f"{path}: an EC P-256 key is needed for ES256")
    return key


def public_jwk(key: ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) -> dict[str, str]:
    """The public key as a JWK, with ``kid`` its RFC 7638 thumbprint (base64url SHA-256)."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    numbers = pub.public_numbers()
    jwk = {
        "crv": "P-256",
        "kty": "EC",
        "x": b64url(numbers.x.to_bytes(_P256_BYTES, "big")),
        "y": b64url(numbers.y.to_bytes(_P256_BYTES, "big")),
    }
    thumbprint = b64url(hashlib.sha256(_json(jwk)).digest())
    return {**jwk, "kid": thumbprint, "alg": "ES256", "use": "sig"}


def kid(key: ec.EllipticCurvePrivateKey) -> str:
    return public_jwk(key)["kid"]


def jwks(*keys: ec.EllipticCurvePrivateKey) -> bytes:
    """A JWKS document holding the public keys, as written to ``jwks.json``."""
    return json.dumps({"keys": [public_jwk(k) for k in keys]}, indent=2).encode() + b"\n"


def sign(
    key: ec.EllipticCurvePrivateKey, claims: Mapping[str, Any], key_id: str | None = None
) -> str:
    """A compact JWS (ES256) of ``claims``; the header names ``key_id`` (default: the key's)."""
    header = {"alg": "ES256", "typ": "JWT", "kid": key_id if key_id is not None else kid(key)}
    signing_input = f"{b64url(_json(header))}.{b64url(_json(claims))}".encode("ascii")
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    raw = r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
    return f"{signing_input.decode('ascii')}.{b64url(raw)}"


def claims(
    sub: str,
    aud: str | list[str] = DEFAULT_AUDIENCE,
    iss: str = DEFAULT_ISSUER,
    ttl: int = DEFAULT_TTL,
    jti: str | None = None,
    now: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The registered claims of a token valid from ``now`` for ``ttl`` seconds."""
    issued = int(time.time() if now is None else now)
    out: dict[str, Any] = {
        "iss": iss,
        "sub": sub,
        "aud": aud,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
        "jti": jti if jti is not None else secrets.token_urlsafe(16),
    }
    out.update(extra)
    return out


def verify(token: str, jwk: Mapping[str, str]) -> dict[str, Any]:
    """Check an ES256 token's signature against a JWK; return its claims (no time checks).
    For tests and debugging: Envoy does the real verification."""
    try:
        head_b64, body_b64, sig_b64 = token.split(".")
        header = json.loads(b64url_decode(head_b64))
        sig = b64url_decode(sig_b64)
    except ValueError as e:
        raise JwtError(f"not a compact JWS: {e}") from None
    if header.get("alg") != "ES256" or len(sig) != 2 * _P256_BYTES:
        raise JwtError("not an ES256 token")
    x = int.from_bytes(b64url_decode(jwk["x"]), "big")
    y = int.from_bytes(b64url_decode(jwk["y"]), "big")
    pub = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    der = encode_dss_signature(
        int.from_bytes(sig[:_P256_BYTES], "big"), int.from_bytes(sig[_P256_BYTES:], "big")
    )
    try:
        pub.verify(der, f"{head_b64}.{body_b64}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
    except Exception as e:  # cryptography's InvalidSignature
        raise JwtError("bad signature") from e
    payload: dict[str, Any] = json.loads(b64url_decode(body_b64))
    return payload


def check_jwks(data: bytes) -> int:
    """Raise ValueError unless ``data`` is a JWKS with at least one key; the key count."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ValueError('not a JWKS: expected {"keys": [...]} with at least one key')
    for i, k in enumerate(keys):
        if not isinstance(k, dict) or not isinstance(k.get("kty"), str):
            raise ValueError(f"not a JWKS: key {i} has no kty")
        if "d" in k:
            raise ValueError(f"key {i} holds a private key ('d'): publish only public keys")
    return len(keys)


def init(directory: Path, force: bool = False) -> list[Path]:
    """``jwt-signing.key`` (0600) and ``jwks.json`` with its public key, unless present."""
    key_path, jwks_path = directory / KEY_FILE, directory / JWKS_FILE
    if key_path.exists() and jwks_path.exists() and not force:
        return []
    key = new_key()
    write_atomic(key_path, key_pem(key), 0o600)
    write_atomic(jwks_path, jwks(key))
    return [key_path, jwks_path]


def token(
    directory: Path,
    sub: str,
    aud: str = DEFAULT_AUDIENCE,
    iss: str = DEFAULT_ISSUER,
    ttl: int = DEFAULT_TTL,
    jti: str | None = None,
) -> str:
    """A token signed with ``DIR/jwt-signing.key``, as ``xdsplane token`` prints it."""
    if ttl < 1:
        raise JwtError("--ttl must be at least 1 second")
    key = load_key(directory / KEY_FILE)
    return sign(key, claims(sub, aud=aud, iss=iss, ttl=ttl, jti=jti))

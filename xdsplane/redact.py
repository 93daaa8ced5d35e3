"""What may be printed: key material hidden, long values cut, control characters escaped.

Every text that leaves the process for people (error messages, logs, ``render``, ``diff``,
``/status``, the status page, ``xdsplane status``) goes through these functions at the place
it is built. A hidden value is shown as ``<redacted sha256:1a2b3c4d...>``: the first 32 bits of
its SHA-256, enough to see that a secret changed, not to recover a key.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

ELLIPSIS = "..."
MAX_VALUE = 120  # characters of one quoted value in an error message
MAX_TEXT = 4000  # characters of one text from a client (a NACK) in logs, /status, the page

# A PEM block, or its start when the end was cut off or mangled. The body is matched loosely
# (text from a repr() has "\n" as two characters) and lazily, up to the first END line.
_PEM = re.compile(
    r"-----BEGIN ([A-Z0-9 ]{1,40})-----"
    r"(?:[\s\S]*?-----END [A-Z0-9 ]{1,40}-----|[A-Za-z0-9+/=\s\\:,.-]*)"
)
# A JWT (or any JWS/JWE in compact form): base64url JSON header "eyJ", then dot-separated parts.
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}(?:\.[A-Za-z0-9_-]*){1,3}")
# Key material without a PEM header: a long run of base64(url) mixing upper, lower case and
# digits (names in a policy are lower case, versions and digests hex: they never look like
# this). "/" ends a run, so a file path is not taken for a key.
_BLOB = re.compile(r"(?<![A-Za-z0-9+_=-])[A-Za-z0-9+_-]{32,}={0,2}(?![A-Za-z0-9+_=-])")
# A quoted value as repr() writes it in a message.
_QUOTED = re.compile(r"'[^'\\\n]*(?:\\.[^'\\\n]*)*'" + r'|"[^"\\\n]*(?:\\.[^"\\\n]*)*"')

# Field names whose value is a secret (matched on words of the name, any case).
_SECRET_WORDS = frozenset(
    {
        "key",
        "keys",
        "secret",
        "secrets",
        "password",
        "passwd",
        "passphrase",
        "token",
        "tokens",
        "credential",
        "credentials",
        "pkcs12",
        "hmac",
        "apikey",
        "authorization",
        "cookie",
        "k",
        "d",
    }
)
# Envoy (proto) fields that hold key material or shared secrets.
SECRET_PROTO_FIELDS = frozenset(
    {
        "private_key",  # TlsCertificate
        "password",  # TlsCertificate, and any auth password
        "pkcs12",
        "private_key_provider",
        "secret",  # GenericSecret.secret
        "secrets",  # GenericSecret.secrets (a map of DataSources)
        "keys",  # TlsSessionTicketKeys.keys
        "session_ticket_keys",
        "hmac_secret",
        "token_secret",
        "auth_password",  # Redis
        "users",  # basic_auth: an htpasswd file inline
        "credential",
        "credentials",
    }
)
# ...except these, whose value is a file name (the policy's private_key is a path).
_PATH_FIELDS = frozenset({"private_key", "private_key_file", "key_file", "password_file"})


def fingerprint(value: str | bytes) -> str:
    """``<redacted sha256:1a2b3c4d...>``: the same for the same value, different otherwise."""
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return f"<redacted sha256:{hashlib.sha256(data).hexdigest()[:8]}{ELLIPSIS}>"


def is_secret_field(name: object) -> bool:
    """Whether a field (policy key, proto field, header or JSON member) holds a secret."""
    if not isinstance(name, str) or not name:
        return False
    words = [w for w in re.split(r"[^a-z0-9]+", _snake(name)) if w]
    if len(words) == 1 and words[0] in ("k", "d"):
        return True  # a JWK's symmetric key or private exponent
    return any(w in _SECRET_WORDS and w not in ("k", "d") for w in words)


def hide_value(message: str, value: object) -> str:
    """``message`` with every spelling of a scalar ``value`` replaced by its fingerprint (for
    messages about a secret field, built by code that quotes what it got)."""
    if isinstance(value, dict | list) or value is None or isinstance(value, bool):
        return message
    hidden = fingerprint(str(value))
    for shown in sorted({repr(value), str(value)}, key=len, reverse=True):
        if shown:
            message = message.replace(shown, hidden)
    return message


def is_path_field(name: object) -> bool:
    return isinstance(name, str) and (name in _PATH_FIELDS or name.endswith("_file"))


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def looks_secret(text: str) -> bool:
    """Whether a string holds key material: a PEM block, a JWT or a long base64 run."""
    return bool(_PEM.search(text) or _JWT.search(text) or _has_blob(text))


def _is_blob(run: str) -> bool:
    return (
        any(c.isupper() for c in run)
        and any(c.islower() for c in run)
        and any(c.isdigit() for c in run)
    )


def _has_blob(text: str) -> bool:
    return any(_is_blob(m.group(0)) for m in _BLOB.finditer(text))


def scrub(text: str, blobs: bool = True) -> str:
    """``text`` with PEM blocks, JWTs and (``blobs``) long base64 runs replaced."""
    if "-----BEGIN " in text:
        text = _PEM.sub(lambda m: f"<redacted PEM block ({m.group(1).strip().lower()})>", text)
    if "eyJ" in text:
        text = _JWT.sub(lambda m: fingerprint(m.group(0)), text)
    if blobs:
        text = _BLOB.sub(
            lambda m: fingerprint(m.group(0)) if _is_blob(m.group(0)) else m.group(0), text
        )
    return text


def cut(text: str, limit: int = MAX_VALUE) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}{ELLIPSIS} ({len(text)} characters)"


def quote(value: object, field: object = None, limit: int = MAX_VALUE) -> str:
    """A value as an error message quotes it (like ``repr``), or ``<redacted …>`` when the
    field holds a secret or the value looks like key material; long values are cut."""
    text = value if isinstance(value, str) else repr(value)
    if is_secret_field(field) and not is_path_field(field):
        return fingerprint(text)
    if not isinstance(value, str):
        return cut(scrub(text), limit)
    shown = scrub(value)
    return _cut_quoted(repr(value), limit) if shown == value else cut(shown, limit)


def scrub_message(message: str, limit: int = MAX_VALUE) -> str:
    """A message with key material replaced and each quoted value cut to ``limit``."""
    message = scrub(message)
    message = _QUOTED.sub(lambda m: _cut_quoted(m.group(0), limit), message)
    return escape_control(message)


def _cut_quoted(quoted: str, limit: int) -> str:
    if len(quoted) <= limit + 2:
        return quoted
    q = quoted[0]
    return f"{quoted[: limit + 1]}{ELLIPSIS}{q} ({len(quoted) - 2} characters)"


def escape_control(text: str, keep: str = "") -> str:
    """``text`` with control and format characters (ESC, BEL, CR, bidi overrides, line
    separators...) written as ``\\x1b``/``\\u202e``; characters in ``keep`` are left."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c in keep or c == " ":
            out.append(c)
        elif unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Co", "Cs"):
            o = ord(c)
            out.append(
                f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"
            )
        else:
            out.append(c)
    return "".join(out)

"""Resources as JSON for people: ``render`` output and ``/status``. Secrets are redacted."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from google.protobuf import json_format

from xdsplane import redact as redact_text
from xdsplane.redact import SECRET_PROTO_FIELDS, fingerprint
from xdsplane.snapshot import Snapshot
from xdsplane.types import PUSH_ORDER

REDACTED = "[redacted]"

# Fields that hold key material or shared secrets, in proto (snake_case) form; their whole
# content is replaced by its fingerprint.
SECRET_FIELDS = SECRET_PROTO_FIELDS
# Members of a JWK that are secret: a symmetric (kty oct) key, and the private parts of RSA
# and EC keys (validate refuses those in jwks_file, but `resources:` may hold anything).
JWK_SECRET_MEMBERS = frozenset({"k", "d", "p", "q", "dp", "dq", "qi", "oth"})


def _hidden(value: Any) -> str:
    """``<redacted sha256:…>`` of a JSON value: the same for the same content."""
    return fingerprint(json.dumps(value, sort_keys=True, separators=(",", ":")))


def _secret_string(value: str) -> bool:
    """A string that is key material wherever it is: a private key or a token."""
    if "PRIVATE KEY" in value or ("eyJ" in value and redact_text.looks_secret(value)):
        return True
    if len(value) >= 64 and value.isascii():
        try:
            return b"PRIVATE KEY" in base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return False
    return False


def _jwks(text: str) -> str:
    """A JWKS document (JSON text) with each key's secret members replaced."""
    try:
        doc = json.loads(text)
    except ValueError:
        return _hidden(text) if _secret_string(text) else text
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        return text
    hidden = 0
    for key in doc["keys"]:
        if isinstance(key, dict):
            for member in JWK_SECRET_MEMBERS & set(key):
                key[member] = _hidden(key[member])
                hidden += 1
    return json.dumps(doc, sort_keys=True) if hidden else text  # public keys: as served


def _sensitive_header(name: Any) -> bool:
    return isinstance(name, str) and (
        name.lower() in ("authorization", "proxy-authorization", "cookie", "set-cookie")
        or redact_text.is_secret_field(name)
    )


def redact(value: Any, parent: str = "") -> Any:
    """A copy of a JSON-like value with every secret replaced by its fingerprint, and keys
    in sorted order: protobuf maps and Structs come out in an order that changes between
    processes, and output must be byte-identical for the same resources.

    Secret: the content of a field in SECRET_FIELDS, the secret members of a JWKS (a JWT
    provider's ``local_jwks``), the value of a header such as ``authorization``, and any
    string holding a private key or a token."""
    if isinstance(value, dict):
        out = {}
        header = "key" in value and "value" in value and _sensitive_header(value["key"])
        for k in sorted(value):
            v = value[k]
            if k in SECRET_FIELDS or (header and k == "value"):
                out[k] = _hidden(v)
            elif parent == "local_jwks" and k == "inline_string" and isinstance(v, str):
                out[k] = _jwks(v)
            elif parent == "local_jwks" and k == "inline_bytes":
                out[k] = _hidden(v)  # a key set as bytes: not parsed, hidden whole
            else:
                out[k] = redact(v, k)
        return out
    if isinstance(value, list):
        return [redact(v, parent) for v in value]
    if isinstance(value, str) and _secret_string(value):
        return _hidden(value)
    return value


def message_to_json(message: Any) -> dict[str, Any]:
    data = json_format.MessageToDict(message, preserving_proto_field_name=True)
    data = {"@type": "type.googleapis.com/" + message.DESCRIPTOR.full_name, **data}
    return redact(data)  # type: ignore[no-any-return]


def snapshot_to_json(snapshot: Snapshot) -> dict[str, Any]:
    """Resources by type (SDS, CDS, EDS, ECDS, LDS, RDS), each with its version."""
    out: dict[str, Any] = {}
    for rtype in PUSH_ORDER:
        named = snapshot.of(rtype)
        out[rtype.short] = {
            "type_url": rtype.value,
            "version": snapshot.versions[rtype],
            "resources": [
                {
                    "name": r.name,
                    "version": r.version,
                    "source": r.source,
                    "resource": message_to_json(r.message),
                }
                for r in named.values()
            ],
        }
    return out

"""Resources as JSON for people: ``render`` output and ``/status``. Secrets are redacted."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from xdsplane.snapshot import Snapshot
from xdsplane.types import PUSH_ORDER

REDACTED = "[redacted]"

# Fields that hold key material or shared secrets, in proto (snake_case) form.
SECRET_FIELDS = frozenset(
    {
        "private_key",
        "password",
        "pkcs12",
        "secret",  # GenericSecret.secret
        "keys",  # TlsSessionTicketKeys.keys
        "private_key_provider",
    }
)


def redact(value: Any) -> Any:
    """A copy of a JSON-like value with every secret field's content replaced, and keys in
    sorted order: protobuf maps and Structs come out in an order that changes between
    processes, and output must be byte-identical for the same resources."""
    if isinstance(value, dict):
        return {k: (REDACTED if k in SECRET_FIELDS else redact(value[k])) for k in sorted(value)}
    if isinstance(value, list):
        return [redact(v) for v in value]
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

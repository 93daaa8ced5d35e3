"""The JSON Schema of a policy file, for editors: ``xdsplane schema > policy.schema.json``.

Generated from the pydantic models (xdsplane.policy.model), so it names exactly the keys the
loader accepts. It checks a file's shape only: cross-references (a route's upstream exists,
a secret is of the right kind, addresses do not clash) are ``xdsplane validate``'s job.
"""

from __future__ import annotations

import json
from typing import Any

from xdsplane.policy.model import PolicyFile

DIALECT = "https://json-schema.org/draft/2020-12/schema"
TITLE = "xdsplane policy file"
DESCRIPTION = (
    "A gateway policy compiled by xdsplane into Envoy resources. Several files in a folder "
    "form one policy per node group; see docs/policy.md."
)


def policy_schema() -> dict[str, Any]:
    schema = _named_maps(PolicyFile.model_json_schema(mode="validation"))
    schema["title"] = TITLE
    schema["description"] = DESCRIPTION
    return {"$schema": DIALECT, **schema}


def _named_maps(value: Any) -> Any:
    """Maps keyed by names (secrets, upstreams): pydantic gives ``patternProperties``, which
    lets a key that breaks the pattern through unchecked. Say instead that every key must
    match (``propertyNames``) and every value is the item schema."""
    if isinstance(value, list):
        return [_named_maps(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _named_maps(v) for k, v in value.items()}
    patterns = out.get("patternProperties")
    if isinstance(patterns, dict) and len(patterns) == 1 and "additionalProperties" not in out:
        ((pattern, item),) = patterns.items()
        del out["patternProperties"]
        out["propertyNames"] = {**out.get("propertyNames", {}), "pattern": pattern}
        out["additionalProperties"] = item
    return out


def dumps() -> str:
    """The schema as stable JSON text: sorted keys, two-space indent, a final newline."""
    return json.dumps(policy_schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

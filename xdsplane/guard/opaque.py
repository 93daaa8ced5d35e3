"""Judging an introspected token: the bearer token of a request, the checks on an active
answer (``exp``, ``nbf``, ``iss``, ``aud``, the route's scopes) and the claim headers sent
upstream. Pure functions; the call to the endpoint is ``introspect.py``'s."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xdsplane.guard.introspect import IntrospectionSpec

# RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9._~+/-]+=*)")
MAX_TOKEN = 4096  # characters: a longer "token" is refused without asking the endpoint
NBF_LEEWAY = 5.0  # seconds: the endpoint's clock may be a little ahead of the guard's
MAX_HEADER_VALUE = 4096
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\uffff]*")


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # the x-guard-reason and metrics label
    message: str  # for the body and the log
    status: int  # 401 or 403


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token of ``Authorization: Bearer TOKEN`` (one header, one token), or None."""
    value = headers.get("authorization")
    if value is None:
        return None
    m = _BEARER.fullmatch(value)
    if m is None or len(m.group(1)) > MAX_TOKEN:
        return None
    return m.group(1)


def scopes_of(claims: Mapping[str, Any]) -> set[str]:
    scope = claims.get("scope")
    return set(scope.split()) if isinstance(scope, str) else set()


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def judge(
    spec: IntrospectionSpec, claims: Mapping[str, Any], now: float, required: list[str]
) -> Refusal | None:
    """None when an active answer lets the request through, else why not."""
    if "exp" in claims:
        exp = _number(claims["exp"])
        if exp is None:
            return Refusal("bad_exp", "the token's exp is not a number", 401)
        if exp <= now:
            return Refusal("expired", "the token has expired", 401)
    if "nbf" in claims:
        nbf = _number(claims["nbf"])
        if nbf is None:
            return Refusal("bad_nbf", "the token's nbf is not a number", 401)
        if nbf > now + NBF_LEEWAY:
            return Refusal("not_yet_valid", "the token is not valid yet", 401)
    if spec.issuer is not None and "iss" in claims and claims["iss"] != spec.issuer:
        return Refusal("wrong_issuer", "the token is from another issuer", 401)
    if spec.audiences is not None and "aud" in claims:
        aud = claims["aud"]
        if isinstance(aud, str):
            given = {aud}
        elif isinstance(aud, list):
            given = {a for a in aud if isinstance(a, str)}
        else:
            given = set()
        if not given & set(spec.audiences):
            return Refusal("wrong_audience", "the token is not for this audience", 403)
    missing = [s for s in required if s not in scopes_of(claims)]
    if missing:
        return Refusal("insufficient_scope", f"the token lacks scope {' '.join(missing)}", 403)
    return None


def claim_headers(spec: IntrospectionSpec, claims: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(header, value) for each forwarded claim the answer has: a string as is, a list
    joined with spaces, a number or boolean as JSON; a value with control characters or
    longer than 4096 characters is not sent."""
    out = []
    for claim, header in spec.forward_claims:
        if claim not in claims:
            continue
        value = claims[claim]
        if isinstance(value, str):
            text = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            text = " ".join(value)
        elif isinstance(value, bool | int | float):
            text = json.dumps(value)
        else:
            continue
        if len(text) <= MAX_HEADER_VALUE and _HEADER_VALUE.fullmatch(text):
            out.append((header.lower(), text))
    return out

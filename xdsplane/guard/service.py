"""The guard's two gRPC services: ext_authz (``Authorization/Check``) and the rate limit
service.

``Check`` reads the JWT claims that Envoy's jwt_authn filter wrote into dynamic metadata
(``payload_in_metadata``; ext_authz forwards them when configured with
``metadata_context_namespaces: [envoy.filters.http.jwt_authn]``), the route's mode from the
context extensions Envoy sets, and the client certificate (``include_peer_certificate``),
and puts them to the transport-free decision (decide.py), shared with the HTTP front
(httpfront.py). ``RateLimitService/ShouldRateLimit`` counts requests per descriptor in fixed
windows, as configured by the limits file.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]

from xdsplane.guard.decide import (
    INTROSPECTION,
    REPLAY,
    REVOCATION,
    Ask,
    Decider,
    Decision,
    challenge_of,
)
from xdsplane.guard.decide import JWT_NAMESPACE as JWT_NAMESPACE
from xdsplane.guard.decide import MAX_HITS_ADDEND as MAX_HITS_ADDEND
from xdsplane.guard.decide import GuardConfig as GuardConfig
from xdsplane.guard.decide import GuardMetrics as GuardMetrics
from xdsplane.guard.decide import jti_hash as jti_hash
from xdsplane.guard.limits import counter_key
from xdsplane.guard.store import StoreUnavailable
from xdsplane.names import (
    GUARD_ALSO_REVOCATION,
    GUARD_CHECK_EXTENSION,
    GUARD_CHECK_INTROSPECTION,
    GUARD_CHECK_REVOCATION,
    GUARD_INTROSPECTION_PROVIDER,
    GUARD_REQUIRED_SCOPES,
)

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
RLS_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
REASON_HEADER = "x-guard-reason"

_Code = rls_pb2.RateLimitResponse.Code
_UNITS = {
    "second": rls_pb2.RateLimitResponse.RateLimit.SECOND,
    "minute": rls_pb2.RateLimitResponse.RateLimit.MINUTE,
    "hour": rls_pb2.RateLimitResponse.RateLimit.HOUR,
}
_MODES = {GUARD_CHECK_REVOCATION: REVOCATION, GUARD_CHECK_INTROSPECTION: INTROSPECTION}


class GuardService(Decider):
    """The decision core (decide.Decider) behind gRPC."""

    # -- wiring ---------------------------------------------------------------------------

    def handlers(
        self, authorize: Callable[[Any], Awaitable[None]] | None = None
    ) -> list[grpc.GenericRpcHandler]:
        """The two services; with ``authorize`` (it aborts a call it refuses), every call
        is put to it first."""
        check: Any = self.check
        should_rate_limit: Any = self.should_rate_limit
        if authorize is not None:
            check = _authorized(self.check, authorize)
            should_rate_limit = _authorized(self.should_rate_limit, authorize)
        return [
            grpc.method_handlers_generic_handler(
                AUTHZ_SERVICE,
                {
                    "Check": grpc.unary_unary_rpc_method_handler(
                        check,
                        request_deserializer=external_auth_pb2.CheckRequest.FromString,
                        response_serializer=external_auth_pb2.CheckResponse.SerializeToString,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                RLS_SERVICE,
                {
                    "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
                        should_rate_limit,
                        request_deserializer=rls_pb2.RateLimitRequest.FromString,
                        response_serializer=rls_pb2.RateLimitResponse.SerializeToString,
                    )
                },
            ),
        ]

    # -- ext_authz ------------------------------------------------------------------------

    async def check(self, request: Any, context: Any = None) -> Any:
        ext = request.attributes.context_extensions
        mode = _MODES.get(str(ext.get(GUARD_CHECK_EXTENSION, "")), REPLAY)
        cert = str(request.attributes.source.certificate)
        if mode == INTROSPECTION:
            ask = Ask(
                INTROSPECTION,
                cert=cert,
                provider=str(ext.get(GUARD_INTROSPECTION_PROVIDER, "")),
                scopes=str(ext.get(GUARD_REQUIRED_SCOPES, "")),
                also_revocation=ext.get(GUARD_ALSO_REVOCATION) == "true",
                headers=request.attributes.request.http.headers,
            )
        else:
            ask = Ask(mode, self._claims(request), cert)
        out = await self.authorize(ask)
        return _check_response(out.decision, out.headers, out.remove, out.metadata)

    def _claims(self, request: Any) -> dict[str, Any] | None:
        """The JWT payload jwt_authn put in the metadata, or None when there is none."""
        meta = request.attributes.metadata_context.filter_metadata
        if JWT_NAMESPACE not in meta:
            return None
        struct = meta[JWT_NAMESPACE]
        if self.config.payload_key not in struct.fields:
            return None
        value = json_value(struct.fields[self.config.payload_key])
        return value if isinstance(value, dict) else None

    # -- rate limit service ---------------------------------------------------------------

    async def should_rate_limit(self, request: Any, context: Any = None) -> Any:
        started = time.perf_counter()
        response = rls_pb2.RateLimitResponse(overall_code=_Code.OK)
        domain = str(request.domain)
        addend = int(request.hits_addend) or 1
        if addend > self.config.max_hits_addend:
            return self._refuse_addend(request, domain, addend, started)
        now = self.clock()
        reasons: list[str] = []
        for descriptor in request.descriptors:
            entries = [(str(e.key), str(e.value)) for e in descriptor.entries]
            status = response.statuses.add(code=_Code.OK)
            limit = self.limits.match(domain, entries)
            if limit is None:
                continue
            status.current_limit.requests_per_unit = limit.requests_per_unit
            status.current_limit.unit = _UNITS[limit.unit]
            window = int(now // limit.seconds)
            reset = (window + 1) * limit.seconds - now
            status.duration_until_reset.FromMilliseconds(max(0, math.ceil(reset * 1000)))
            key = self.config.key_prefix + counter_key(domain, entries, limit, window)
            try:
                count = await self.store.hit(key, addend, math.ceil(reset * 1000) + 1000)
            except StoreUnavailable as e:
                self.metrics.backend_errors.labels(self.store.name, "hit", "unavailable").inc()
                self._backend_failed(str(e))
                if self.config.fail_open:
                    reasons.append("fail_open")
                else:
                    status.code = _Code.OVER_LIMIT
                    response.overall_code = _Code.OVER_LIMIT
                    reasons.append("store_unavailable")
                continue
            self._backend_ok()
            status.limit_remaining = max(0, limit.requests_per_unit - count)
            if count > limit.requests_per_unit:
                status.code = _Code.OVER_LIMIT
                response.overall_code = _Code.OVER_LIMIT
                reasons.append("over_limit")
                self.log.info(
                    "rate limited",
                    domain=domain,
                    descriptor=_entries_text(entries),
                    count=count,
                    limit=f"{limit.requests_per_unit}/{limit.unit}",
                    rule=limit.source,
                )
        over = response.overall_code == _Code.OVER_LIMIT
        result = "over_limit" if over else "ok"
        reason = _pick_reason(reasons, over)
        self.metrics.decisions.labels("ratelimit", result, reason).inc()
        self.metrics.latency.labels("ratelimit").observe(time.perf_counter() - started)
        if reason in ("store_unavailable", "fail_open"):
            self.log.warning("ratelimit " + result, domain=domain, reason=reason)
        return response

    def _refuse_addend(self, request: Any, domain: str, addend: int, started: float) -> Any:
        """A caller asking to count more than ``max_hits_addend`` hits at once: every
        descriptor is OVER_LIMIT and no counter moves (nobody's budget is spent)."""
        response = rls_pb2.RateLimitResponse(overall_code=_Code.OVER_LIMIT)
        for _ in request.descriptors:
            response.statuses.add(code=_Code.OVER_LIMIT)
        self.metrics.decisions.labels("ratelimit", "over_limit", "bad_hits_addend").inc()
        self.metrics.latency.labels("ratelimit").observe(time.perf_counter() - started)
        self.log.warning(
            "ratelimit refused",
            domain=domain,
            reason="bad_hits_addend",
            hits_addend=addend,
            max_hits_addend=self.config.max_hits_addend,
        )
        return response


def _authorized(
    handler: Callable[[Any, Any], Awaitable[Any]], authorize: Callable[[Any], Awaitable[None]]
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def call(request: Any, context: Any) -> Any:
        await authorize(context)
        return await handler(request, context)

    return call


def json_value(value: Any) -> Any:
    """A ``google.protobuf.Value`` as ``json_format.MessageToDict`` gives it (numbers as
    floats, an unset kind as None, ValueError for an infinite or NaN number), without its
    generic machinery: ~25 µs of each Check's CPU went to it."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if math.isinf(number) or math.isnan(number):
            raise ValueError(f"a JSON number cannot be {number}")
        return number
    if kind == "struct_value":
        return {k: json_value(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [json_value(v) for v in value.list_value.values]
    if kind == "bool_value":
        return value.bool_value
    return None  # null_value, or no kind set


def _pick_reason(reasons: list[str], over: bool) -> str:
    for r in ("store_unavailable", "over_limit") if over else ("fail_open",):
        if r in reasons:
            return r
    return "ok"


def _entries_text(entries: list[tuple[str, str]]) -> str:
    return ",".join(f"{k}={v[:64]}" for k, v in entries)


_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CODES = {503: code_pb2.UNAVAILABLE, 401: code_pb2.UNAUTHENTICATED}


def _check_response(
    decision: Decision,
    headers: list[tuple[str, str]] | None = None,
    remove: list[str] | None = None,
    metadata: dict[str, str] | None = None,
) -> Any:
    if decision.allowed:
        # Claims for the upstream replace any copy (the HCM strips client-sent ones first).
        response = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[
                    base_pb2.HeaderValueOption(
                        header=base_pb2.HeaderValue(key=k, value=v), append_action=_OVERWRITE
                    )
                    for k, v in headers or []
                ],
                headers_to_remove=remove or [],
            ),
        )
        if metadata:
            response.dynamic_metadata.update(metadata)
        return response
    code = _CODES.get(decision.status, code_pb2.PERMISSION_DENIED)
    sent = [(REASON_HEADER, decision.reason), ("content-type", "text/plain")]
    challenge = challenge_of(decision)
    if challenge is not None:
        sent.append(("www-authenticate", challenge))
    response = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=code, message=decision.message),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=[
                base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, value=v))
                for k, v in sent
            ],
            body=f"{decision.message}\n",
        ),
    )
    if metadata:
        response.dynamic_metadata.update(metadata)
    return response

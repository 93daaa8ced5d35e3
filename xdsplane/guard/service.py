"""The guard's two gRPC services: ext_authz replay protection and the rate limit service.

``Authorization/Check`` reads the JWT claims that Envoy's jwt_authn filter wrote into
dynamic metadata (``payload_in_metadata``; ext_authz forwards them when configured with
``metadata_context_namespaces: [envoy.filters.http.jwt_authn]``) and accepts each token id
(``jti``, per issuer) once within the token's lifetime. ``RateLimitService/ShouldRateLimit``
counts requests per descriptor in fixed windows, as configured by the limits file.

The store decides nothing: when it cannot answer, ``fail_open`` says whether the request
is let through (logged and counted) or refused (the default).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from xdsplane import logs
from xdsplane.guard.introspect import IntrospectionFailed, Introspector, token_digest
from xdsplane.guard.limits import GuardLimits, counter_key
from xdsplane.guard.opaque import bearer_token, claim_headers, judge
from xdsplane.guard.revoke import Revocations, cert_identity
from xdsplane.guard.store import Store, StoreUnavailable
from xdsplane.names import (
    GUARD_ALSO_REVOCATION,
    GUARD_CHECK_EXTENSION,
    GUARD_CHECK_INTROSPECTION,
    GUARD_CHECK_REVOCATION,
    GUARD_INTROSPECTION_PROVIDER,
    GUARD_REASON_KEY,
    GUARD_REQUIRED_SCOPES,
    JTI_HASH_KEY,
    JWT_FILTER,
    JWT_PAYLOAD_KEY,
)

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"
RLS_SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
JWT_NAMESPACE = JWT_FILTER  # where jwt_authn writes the verified claims
REASON_HEADER = "x-guard-reason"
MAX_JTI_LOG = 64  # characters of a jti shown in logs
TOKEN_HASH_LOG = 12  # hex characters of a token's SHA-256 shown in logs (never the token)

_Code = rls_pb2.RateLimitResponse.Code
_UNITS = {
    "second": rls_pb2.RateLimitResponse.RateLimit.SECOND,
    "minute": rls_pb2.RateLimitResponse.RateLimit.MINUTE,
    "hour": rls_pb2.RateLimitResponse.RateLimit.HOUR,
}


MAX_HITS_ADDEND = 100  # a rate limit request counting more hits at once is refused


@dataclass
class GuardConfig:
    # The longest token lifetime (exp - now) accepted: a token living longer is refused
    # rather than forgotten before it expires. A policy's providers (--policy) raise it to
    # their own max_lifetime.
    max_lifetime: float = 300.0
    clock_skew: float = 60.0  # jwt_authn accepts tokens this long after exp (its default)
    payload_key: str = JWT_PAYLOAD_KEY  # jwt_authn's payload_in_metadata
    fail_open: bool = False  # store down: allow (True) or deny (False)
    key_prefix: str = "xdsplane:guard:"
    max_hits_addend: int = MAX_HITS_ADDEND


class GuardMetrics:
    """The guard's own registry (never the process-global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.decisions = Counter(
            "xdsplane_guard_decisions",
            "Decisions by API (authz, ratelimit), result (allow, deny, over_limit) and reason",
            ["api", "result", "reason"],
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "xdsplane_guard_backend_errors",
            "Calls to the backend that failed, by operation and error",
            ["backend", "op", "error"],
            registry=self.registry,
        )
        self.backend_up = Gauge(
            "xdsplane_guard_backend_up",
            "1 when the last call to the backend succeeded",
            ["backend"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "xdsplane_guard_decision_seconds",
            "Time to decide, by API",
            ["api"],
            registry=self.registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.introspection_calls = Counter(
            "xdsplane_guard_introspection_calls",
            "Calls to an introspection endpoint, by provider and result (active, inactive, "
            "unavailable, http_error, bad_answer)",
            ["provider", "result"],
            registry=self.registry,
        )
        self.introspection_cache = Counter(
            "xdsplane_guard_introspection_cache",
            "Introspection answers looked up in the cache, by provider and result (hit, miss)",
            ["provider", "result"],
            registry=self.registry,
        )
        self.introspection_entries = Gauge(
            "xdsplane_guard_introspection_cache_entries",
            "Introspection answers in the cache, by provider",
            ["provider"],
            registry=self.registry,
        )


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # a short word for metrics and the reason header
    message: str  # one sentence for the body and the log
    status: int = 200  # HTTP status Envoy sends when denied


class GuardService:
    def __init__(
        self,
        store: Store,
        limits: GuardLimits | None,
        config: GuardConfig | None = None,
        metrics: GuardMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.limits = limits or GuardLimits()
        self.config = config or GuardConfig()
        self.metrics = metrics or GuardMetrics()
        self.clock = clock
        self.log = logs.get("xdsplane.guard")
        self.revocations = Revocations(self.config.key_prefix, clock)
        self._backend_down = False
        self.metrics.backend_up.labels(store.name).set(1)
        self.introspectors: dict[str, Introspector] = {}
        self._closing: set[Any] = set()
        # The metrics' children of every Check, looked up once (labels() takes a lock).
        self._authz_latency = self.metrics.latency.labels("authz")
        self._authz_counts: dict[tuple[str, str], Any] = {}

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

    def _backend_failed(self, message: str) -> None:
        # Logged when it goes down, not per request (the decisions are logged anyway).
        self.metrics.backend_up.labels(self.store.name).set(0)
        if not self._backend_down:
            self._backend_down = True
            self.log.warning(
                "backend unavailable",
                backend=self.store.name,
                error=message,
                failing="open" if self.config.fail_open else "closed",
            )

    def _backend_ok(self) -> None:
        self.metrics.backend_up.labels(self.store.name).set(1)
        if self._backend_down:
            self._backend_down = False
            self.log.info("backend recovered", backend=self.store.name)

    # -- ext_authz ------------------------------------------------------------------------

    async def check(self, request: Any, context: Any = None) -> Any:
        started = time.perf_counter()
        ext = request.attributes.context_extensions
        if ext.get(GUARD_CHECK_EXTENSION) == GUARD_CHECK_INTROSPECTION:
            decision, fields, headers = await self.decide_introspection(request)
            # The token is not sent upstream (as jwt_authn's forward: false does for JWTs).
            return self._answer(decision, fields, started, headers, ["authorization"])
        claims = self._claims(request)
        cert = str(request.attributes.source.certificate)
        only_revocation = (
            request.attributes.context_extensions.get(GUARD_CHECK_EXTENSION)
            == GUARD_CHECK_REVOCATION
        )
        if not only_revocation:
            decision, fields = await self._revoked_then_replay(claims, cert)
            return self._answer(decision, fields, started, claims=claims)
        revoked = await self.decide_revoked(claims, cert)
        if revoked is not None:
            decision, fields = revoked
        elif only_revocation:  # a route with revocation_check, no replay_protection
            decision, fields = Decision(True, "not_revoked", "not revoked"), {}
        else:
            decision, fields = await self.decide_replay(claims)
        return self._answer(decision, fields, started, claims=claims)

    async def _revoked_then_replay(
        self, claims: dict[str, Any] | None, cert: str
    ) -> tuple[Decision, dict[str, Any]]:
        """The revocation lookup and the jti claim, sent together (one Redis pipeline: one
        round trip instead of two in a row). A revoked token keeps the answer it had when
        the claim came second: refused as revoked, its jti released again (so that, once
        unrevoked, its first use is still a first use)."""
        lookup, replay = await asyncio.gather(
            self.decide_revoked(claims, cert), self._replay(claims)
        )
        revoked: tuple[Decision, dict[str, Any]] | None = lookup
        decision, fields, claimed = replay
        if revoked is None:
            return decision, fields
        if claimed is not None:
            try:
                await self.store.delete(claimed)
            except StoreUnavailable as e:  # refused all the same; logged
                self.metrics.backend_errors.labels(self.store.name, "release", "unavailable").inc()
                self._backend_failed(str(e))
        return revoked

    def _answer(
        self,
        decision: Decision,
        fields: dict[str, Any],
        started: float,
        headers: list[tuple[str, str]] | None = None,
        remove: list[str] | None = None,
        claims: dict[str, Any] | None = None,
    ) -> Any:
        self._authz_latency.observe(time.perf_counter() - started)
        result = "allow" if decision.allowed else "deny"
        counter = self._authz_counts.get((result, decision.reason))
        if counter is None:
            counter = self.metrics.decisions.labels("authz", result, decision.reason)
            self._authz_counts[(result, decision.reason)] = counter
        counter.inc()
        # Refusals are logged with why (warning); first uses only at debug: one log line per
        # allowed request costs the guard a tenth of its CPU at 1,000 requests/s.
        log = self.log.debug if decision.allowed else self.log.warning
        log("authz " + result, reason=decision.reason, detail=decision.message, **fields)
        metadata = _log_metadata(decision, claims)
        return _check_response(decision, headers or [], remove or [], metadata)

    # -- introspection (RFC 7662) ---------------------------------------------------------

    def introspector(self, name: str) -> Introspector | None:
        """The provider's introspector, made anew (empty cache) when the policy changed it."""
        spec = self.limits.introspection.get(name)
        if spec is None:
            return None
        found = self.introspectors.get(name)
        if found is None or found.spec != spec:
            if found is not None:
                self._close_later(found)
            metrics = self.metrics

            def counted(result: str, provider: str = name) -> None:
                metrics.introspection_calls.labels(provider, result).inc()

            found = self.introspectors[name] = Introspector(spec, self.clock, counted)
        return found

    def _close_later(self, old: Introspector) -> None:
        task = asyncio.ensure_future(old.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for found in self.introspectors.values():
            await found.close()
        self.introspectors.clear()

    async def decide_introspection(
        self, request: Any
    ) -> tuple[Decision, dict[str, Any], list[tuple[str, str]]]:
        """An opaque token: asked of the route's provider (or its cached answer), checked,
        and its chosen claims as headers for the upstream."""
        ext = request.attributes.context_extensions
        name = str(ext.get(GUARD_INTROSPECTION_PROVIDER, ""))
        fields: dict[str, Any] = {"provider": name}
        found = self.introspector(name)
        if found is None:
            return (
                Decision(
                    False,
                    "unknown_provider",
                    "the guard does not know this route's introspection provider",
                    503,
                ),
                fields,
                [],
            )
        token = bearer_token(request.attributes.request.http.headers)
        if token is None:
            return Decision(False, "no_token", "a bearer token is required", 401), fields, []
        fields["token_sha256"] = token_digest(token)[:TOKEN_HASH_LOG]
        try:
            answer = await found.introspect(token)
        except IntrospectionFailed as e:
            fields["error"] = str(e)
            self.metrics.introspection_cache.labels(name, "miss").inc()
            return Decision(False, e.reason, "token introspection failed", 503), fields, []
        finally:
            self.metrics.introspection_entries.labels(name).set(found.entries)
        self.metrics.introspection_cache.labels(name, "hit" if answer.cached else "miss").inc()
        fields["cached"] = answer.cached
        claims = answer.claims
        if claims is None:
            return Decision(False, "inactive_token", "the token is not active", 401), fields, []
        sub = claims.get("sub")
        if isinstance(sub, str):
            fields["sub"] = sub
        required = str(ext.get(GUARD_REQUIRED_SCOPES, "")).split()
        refusal = judge(found.spec, claims, self.clock(), required)
        if refusal is not None:
            if refusal.reason == "insufficient_scope":
                fields["required_scopes"] = " ".join(required)
            return Decision(False, refusal.reason, refusal.message, refusal.status), fields, []
        if ext.get(GUARD_ALSO_REVOCATION) == "true":
            revoked = await self.decide_revoked(claims, str(request.attributes.source.certificate))
            if revoked is not None:
                return revoked[0], {**fields, **revoked[1]}, []
        return Decision(True, "active", "active token"), fields, claim_headers(found.spec, claims)

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

    def token_bounds(self) -> tuple[float, float]:
        """(clock skew, longest lifetime) in seconds: the flags, raised by what the policy's
        JWT providers allow (their clock_skew and max_lifetime)."""
        skew = max(self.config.clock_skew, self.limits.token_clock_skew or 0.0)
        longest = max(self.config.max_lifetime, self.limits.token_max_lifetime or 0.0)
        return skew, longest

    async def decide_revoked(
        self, claims: dict[str, Any] | None, cert_pem: str
    ) -> tuple[Decision, dict[str, Any]] | None:
        """A refusal when the token's jti, its sub or the client certificate is revoked
        (looked up in the file's entries and the store on every call); None otherwise."""
        wanted: list[tuple[str, str]] = []
        fields: dict[str, Any] = {}
        if claims is not None:
            sub, jti = claims.get("sub"), claims.get("jti")
            if isinstance(jti, str) and jti:
                wanted.append(("jti", jti))
                fields["jti"] = jti[:MAX_JTI_LOG]
            if isinstance(sub, str) and sub:
                wanted.append(("sub", sub))
                fields["sub"] = sub
        if cert_pem:
            ident = cert_identity(cert_pem)
            if ident is not None:
                wanted += [("cert_sha256", ident[0]), ("cert_serial", ident[1])]
                fields["cert_sha256"] = ident[0]
        if not wanted:
            return None
        try:
            found = await self.revocations.find(self.store, wanted)
        except StoreUnavailable as e:
            self.metrics.backend_errors.labels(self.store.name, "revoked", "unavailable").inc()
            self._backend_failed(str(e))
            if self.config.fail_open:
                return None
            return Decision(False, "store_unavailable", "revocation store unavailable", 503), fields
        if found is None:
            return None
        word = "cert" if found.kind.startswith("cert") else found.kind
        fields["revocation"] = found.reason
        what = {"jti": "token (jti)", "sub": "subject (sub)"}.get(word, "client certificate")
        return Decision(False, f"revoked_{word}", f"this {what} is revoked", 403), fields

    async def decide_replay(self, claims: dict[str, Any] | None) -> tuple[Decision, dict[str, Any]]:
        """Accept a token id once within its lifetime. Returns the decision and log fields."""
        decision, fields, _claimed = await self._replay(claims)
        return decision, fields

    async def _replay(
        self, claims: dict[str, Any] | None
    ) -> tuple[Decision, dict[str, Any], str | None]:
        """``decide_replay``, and the key this call claimed (None: it claimed none)."""
        decision, fields, key = await self._replay_decision(claims)
        return decision, fields, key if decision.reason == "ok" else None

    async def _replay_decision(
        self, claims: dict[str, Any] | None
    ) -> tuple[Decision, dict[str, Any], str | None]:
        if claims is None:
            return (
                Decision(
                    False,
                    "no_jwt_payload",
                    f"no JWT payload in metadata {JWT_NAMESPACE}.{self.config.payload_key}",
                    403,
                ),
                {},
                None,
            )
        jti = claims.get("jti")
        sub = claims.get("sub")
        iss = claims.get("iss")
        fields: dict[str, Any] = {
            "sub": sub if isinstance(sub, str) else None,
            "jti": jti[:MAX_JTI_LOG] if isinstance(jti, str) else None,
        }
        if not isinstance(jti, str) or not jti:
            return Decision(False, "no_jti", "the token has no jti claim", 403), fields, None
        now = self.clock()
        exp = claims.get("exp")
        if exp is None:
            # Remembered for ever or forgotten while still accepted: neither. The policy's
            # max_lifetime makes jwt_authn refuse such tokens before they get here.
            return Decision(False, "no_exp", "the token has no exp claim", 403), fields, None
        if not isinstance(exp, int | float) or isinstance(exp, bool) or not math.isfinite(exp):
            return Decision(False, "bad_exp", "the token's exp is not a number", 403), fields, None
        skew, longest = self.token_bounds()
        # Remembered until jwt_authn stops accepting it (exp + skew), never less.
        ttl = float(exp) + skew - now
        if ttl <= 0:
            return Decision(False, "expired", "the token has expired", 403), fields, None
        if float(exp) - now > longest + skew:
            return (
                Decision(
                    False,
                    "lifetime_too_long",
                    f"the token expires in more than the guard's max lifetime ({longest:g}s)",
                    403,
                ),
                fields,
                None,
            )
        issuer = iss if isinstance(iss, str) else ""
        digest = hashlib.sha256(f"{issuer}\0{jti}".encode()).hexdigest()
        key = f"{self.config.key_prefix}jti:{digest}"
        fields["ttl_s"] = round(ttl, 3)
        try:
            first = await self.store.claim(key, max(1, math.ceil(ttl * 1000)))
        except StoreUnavailable as e:
            self.metrics.backend_errors.labels(self.store.name, "claim", "unavailable").inc()
            self._backend_failed(str(e))
            if self.config.fail_open:
                allow = Decision(True, "fail_open", "replay store unavailable; failing open")
                return allow, fields, None
            return (
                Decision(False, "store_unavailable", "replay store unavailable", 503),
                fields,
                None,
            )
        self._backend_ok()
        if not first:
            return Decision(False, "replay", "this token (jti) was already used", 403), fields, None
        return Decision(True, "ok", "first use of this jti"), fields, key

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


def jti_hash(jti: str) -> str:
    """What the access log shows of a token's jti: the first 16 hex digits (64 bits) of its
    SHA-256, enough to follow one token across records, not the jti itself."""
    return hashlib.sha256(jti.encode("utf-8")).hexdigest()[:16]


def _log_metadata(decision: Decision, claims: dict[str, Any] | None) -> dict[str, str]:
    """ext_authz dynamic metadata for Envoy's access log (docs/observability.md): the
    decision's reason and, when the token has one, its jti's hash."""
    out = {GUARD_REASON_KEY: decision.reason}
    jti = claims.get("jti") if claims is not None else None
    if isinstance(jti, str) and jti:
        out[JTI_HASH_KEY] = jti_hash(jti)
    return out


_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CODES = {503: code_pb2.UNAVAILABLE, 401: code_pb2.UNAUTHENTICATED}


def _challenge(decision: Decision) -> str | None:
    """RFC 6750's WWW-Authenticate for a refused bearer token."""
    if decision.status == 401:
        if decision.reason == "no_token":
            return 'Bearer realm="xdsplane"'
        return 'Bearer realm="xdsplane", error="invalid_token"'
    if decision.reason == "insufficient_scope":
        return 'Bearer realm="xdsplane", error="insufficient_scope"'
    return None


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
    challenge = _challenge(decision)
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

"""The guard's decision, whatever carried the question: the gRPC ``Check`` (service.py) and
the HTTP/1.1 front (httpfront.py) both turn a request into an ``Ask`` and put it to
``Decider.authorize``.

Replay protection accepts each token id (``jti``, per issuer) once within the token's
lifetime; revocation refuses a revoked jti, sub or client certificate; introspection (gRPC
only: it needs the bearer token and sets headers for the upstream) asks an RFC 7662
endpoint. Every decision is counted, timed and logged here (a refusal at warning, a first
use at debug; a jti is shown truncated, a token only as a hash prefix, never whole) and
returns what Envoy's access log shows of it (``guard_reason``, ``jti_sha256``).

The store decides nothing: when it cannot answer, ``fail_open`` says whether the request
is let through (logged and counted) or refused (the default).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from xdsplane import logs
from xdsplane.guard.introspect import IntrospectionFailed, Introspector, token_digest
from xdsplane.guard.limits import GuardLimits
from xdsplane.guard.opaque import bearer_token, claim_headers, judge
from xdsplane.guard.revoke import Revocations, cert_identity
from xdsplane.guard.store import Store, StoreUnavailable
from xdsplane.names import GUARD_REASON_KEY, JTI_HASH_KEY, JWT_FILTER, JWT_PAYLOAD_KEY

JWT_NAMESPACE = JWT_FILTER  # where jwt_authn writes the verified claims
MAX_JTI_LOG = 64  # characters of a jti shown in logs
TOKEN_HASH_LOG = 12  # hex characters of a token's SHA-256 shown in logs (never the token)

# What a request asks of the guard (the route's mode, set by Envoy, never by a client).
REPLAY = "replay"  # revocation, then the jti's one use (replay_protection)
REVOCATION = "revocation"  # revocation only (revocation_check without replay_protection)
INTROSPECTION = "introspection"  # an opaque token asked of a provider (gRPC only)


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


@dataclass(frozen=True, slots=True)
class Ask:
    """One question, transport-free. ``claims``: the verified JWT payload (None: none);
    ``cert``: the client certificate, PEM (URL-encoded as Envoy sends it), "" when none;
    the rest only for ``INTROSPECTION``: the provider, the route's required scopes
    (space-separated), whether revocation is checked too, the request's headers (the
    bearer token)."""

    mode: str
    claims: dict[str, Any] | None = None
    cert: str = ""
    provider: str = ""
    scopes: str = ""
    also_revocation: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision and what goes with it: headers for the upstream (allowed only), headers
    to remove from the request, and the access log's dynamic metadata."""

    decision: Decision
    headers: list[tuple[str, str]]
    remove: list[str]
    metadata: dict[str, str]


class Decider:
    """The decision core: the store, the limits (with the policy's introspection
    providers), the revocations, the metrics and the log."""

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
        # The metrics' children of every decision, looked up once (labels() takes a lock).
        self._authz_latency = self.metrics.latency.labels("authz")
        self._authz_counts: dict[tuple[str, str], Any] = {}

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

    # -- the decision ---------------------------------------------------------------------

    async def authorize(self, ask: Ask) -> Outcome:
        """Decide ``ask``, count, time and log the decision."""
        started = time.perf_counter()
        if ask.mode == INTROSPECTION:
            decision, fields, headers = await self.decide_introspection(ask)
            # The token is not sent upstream (as jwt_authn's forward: false does for JWTs).
            return self._record(decision, fields, started, None, headers, ["authorization"])
        if ask.mode == REPLAY:
            decision, fields = await self._revoked_then_replay(ask.claims, ask.cert)
        elif ask.mode == REVOCATION:  # a route with revocation_check, no replay_protection
            revoked = await self.decide_revoked(ask.claims, ask.cert)
            if revoked is not None:
                decision, fields = revoked
            else:
                decision, fields = Decision(True, "not_revoked", "not revoked"), {}
        else:  # never set by the translator: refused, not guessed
            decision, fields = Decision(False, "unknown_mode", "unknown check mode", 403), {}
        return self._record(decision, fields, started, ask.claims)

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

    def _record(
        self,
        decision: Decision,
        fields: dict[str, Any],
        started: float,
        claims: dict[str, Any] | None,
        headers: list[tuple[str, str]] | None = None,
        remove: list[str] | None = None,
    ) -> Outcome:
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
        return Outcome(decision, headers or [], remove or [], metadata)

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
        self, ask: Ask
    ) -> tuple[Decision, dict[str, Any], list[tuple[str, str]]]:
        """An opaque token: asked of the route's provider (or its cached answer), checked,
        and its chosen claims as headers for the upstream."""
        name = ask.provider
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
        token = bearer_token(ask.headers)
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
        required = ask.scopes.split()
        refusal = judge(found.spec, claims, self.clock(), required)
        if refusal is not None:
            if refusal.reason == "insufficient_scope":
                fields["required_scopes"] = " ".join(required)
            return Decision(False, refusal.reason, refusal.message, refusal.status), fields, []
        if ask.also_revocation:
            revoked = await self.decide_revoked(claims, ask.cert)
            if revoked is not None:
                return revoked[0], {**fields, **revoked[1]}, []
        return Decision(True, "active", "active token"), fields, claim_headers(found.spec, claims)

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


def challenge_of(decision: Decision) -> str | None:
    """RFC 6750's WWW-Authenticate for a refused bearer token."""
    if decision.status == 401:
        if decision.reason == "no_token":
            return 'Bearer realm="xdsplane"'
        return 'Bearer realm="xdsplane", error="invalid_token"'
    if decision.reason == "insufficient_scope":
        return 'Bearer realm="xdsplane", error="insufficient_scope"'
    return None

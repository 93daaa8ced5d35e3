"""Opaque bearer tokens by introspection (RFC 7662): the guard asks the provider's endpoint.

One ``Introspector`` per provider of the policy (``introspection_providers``): it POSTs
``token`` and ``token_type_hint=access_token`` to the endpoint with HTTP Basic client
authentication (``client_secret_basic``: RFC 6749 2.3.1, id and secret form-encoded), over
TLS verified against the provider's CA (host name included), never following a redirect.

Answers are cached per token (keyed by the token's SHA-256, never the token itself), least
recently used first out past ``max_entries``:

- an active answer until the token's ``exp``, never longer than ``max_ttl``;
- an inactive answer for ``negative_ttl`` (at most 60 s);
- a failure (endpoint down, timeout, non-200, not JSON, ``active`` missing or not a
  boolean) never: each request asks again, and fails closed.

Concurrent requests with one uncached token share one call to the endpoint.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

MAX_ANSWER_BYTES = 64 * 1024  # a larger answer is refused as a bad answer
TOKEN_TYPE_HINT = "access_token"


@dataclass(frozen=True)
class IntrospectionSpec:
    """A provider as the guard uses it: the policy's keys, files read."""

    name: str
    endpoint: str
    client_id: str
    client_secret: str = field(repr=False)
    ca_file: str | None = None  # a PEM bundle (None: http:// on loopback)
    ca_pem: bytes = field(default=b"", repr=False)  # its contents, to notice a new bundle
    issuer: str | None = None
    audiences: tuple[str, ...] | None = None
    forward_claims: tuple[tuple[str, str], ...] = ()
    max_entries: int = 10_000
    max_ttl: float = 60.0
    negative_ttl: float = 5.0
    timeout: float = 1.0


class IntrospectionFailed(Exception):
    """The endpoint gave no usable answer: ``reason`` is a short word, the text says why
    (never the token or the client secret)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Answer:
    claims: dict[str, Any] | None  # None: inactive
    cached: bool


def token_digest(token: str) -> str:
    """The SHA-256 of a token, hex: what the cache keys and the logs show (a prefix)."""
    return hashlib.sha256(token.encode()).hexdigest()


def ssl_context(ca_file: str) -> ssl.SSLContext:
    """Verifies the endpoint's chain against ``ca_file`` only, and its host name."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Introspector:
    def __init__(
        self,
        spec: IntrospectionSpec,
        clock: Callable[[], float] = time.time,
        on_call: Callable[[str], None] | None = None,
    ) -> None:
        self.spec = spec
        self.clock = clock
        self.on_call = on_call or (lambda result: None)
        self._cache: OrderedDict[str, tuple[float, dict[str, Any] | None]] = OrderedDict()
        self._inflight: dict[str, asyncio.Future[dict[str, Any] | None]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ssl = ssl_context(spec.ca_file) if spec.ca_file is not None else None
        user = quote(spec.client_id, safe="")
        secret = quote(spec.client_secret, safe="")
        self._auth = "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()

    def __repr__(self) -> str:
        return f"Introspector({self.spec.name!r}, {self.spec.endpoint!r})"

    @property
    def entries(self) -> int:
        return len(self._cache)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def introspect(self, token: str) -> Answer:
        """The endpoint's claims for ``token`` (None: inactive), from the cache when it has
        a live answer. Raises IntrospectionFailed."""
        key = token_digest(token)
        now = self.clock()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(key)
                return Answer(hit[1], True)
            del self._cache[key]
        pending = self._inflight.get(key)
        if pending is not None:
            return Answer(await asyncio.shield(pending), False)
        future: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            claims = await self._ask(token)
        except IntrospectionFailed as e:
            future.set_exception(e)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            del self._inflight[key]
        future.set_result(claims)
        self._remember(key, claims)
        return Answer(claims, False)

    def _remember(self, key: str, claims: dict[str, Any] | None) -> None:
        now = self.clock()
        if claims is None:
            until = now + self.spec.negative_ttl
        else:
            until = now + self.spec.max_ttl
            exp = claims.get("exp")
            if isinstance(exp, int | float) and not isinstance(exp, bool) and exp == exp:
                until = min(until, float(exp))
        if until <= now:
            return
        self._cache[key] = (until, claims)
        self._cache.move_to_end(key)
        while len(self._cache) > self.spec.max_entries:
            self._cache.popitem(last=False)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # https without a CA of its own (never from a policy): the system's, verified.
                connector=aiohttp.TCPConnector(limit=64, ssl=self._ssl or True),
                # No cookies: nothing the endpoint sets travels with the next token.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def _ask(self, token: str) -> dict[str, Any] | None:
        spec = self.spec
        try:
            async with self._client().post(
                spec.endpoint,
                data={"token": token, "token_type_hint": TOKEN_TYPE_HINT},
                headers={"Authorization": self._auth, "Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=spec.timeout),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                body = await resp.content.read(MAX_ANSWER_BYTES + 1)
        except TimeoutError:
            self.on_call("unavailable")
            raise IntrospectionFailed(
                "introspection_unavailable", f"no answer within {spec.timeout:g}s"
            ) from None
        except aiohttp.ClientConnectorCertificateError as e:
            self.on_call("unavailable")
            raise IntrospectionFailed(
                "introspection_unavailable", f"endpoint certificate refused: {e.certificate_error}"
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            self.on_call("unavailable")
            raise IntrospectionFailed(
                "introspection_unavailable", f"cannot reach the endpoint: {type(e).__name__}"
            ) from None
        if status != 200:
            self.on_call("http_error")
            raise IntrospectionFailed(
                "introspection_failed", f"the endpoint answered HTTP {status}"
            )
        answer = _parse(body)
        self.on_call("active" if answer is not None else "inactive")
        return answer


def _parse(body: bytes) -> dict[str, Any] | None:
    """The claims of an active answer, None for an inactive one; raises IntrospectionFailed
    for anything else."""
    if len(body) > MAX_ANSWER_BYTES:
        raise IntrospectionFailed("introspection_bad_answer", "the answer is too large")
    try:
        data = json.loads(body)
    except ValueError:
        raise IntrospectionFailed("introspection_bad_answer", "the answer is not JSON") from None
    if not isinstance(data, dict):
        raise IntrospectionFailed("introspection_bad_answer", "the answer is not a JSON object")
    active = data.get("active")
    if not isinstance(active, bool):
        raise IntrospectionFailed("introspection_bad_answer", "the answer has no boolean 'active'")
    return data if active else None


def read_secret(path: Path) -> str:
    """The client secret: the file's first line (a trailing newline dropped). Raises
    ValueError naming the file, never its contents."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ValueError(f"cannot read {path}: {reason}") from None
    secret = text[:-1] if text.endswith("\n") else text
    secret = secret[:-1] if secret.endswith("\r") else secret
    if not secret:
        raise ValueError(f"{path} is empty")
    if "\n" in secret:
        raise ValueError(f"{path} holds more than one line")
    return secret


def check_ca(path: str) -> bytes:
    """The CA bundle's bytes, when ``ssl`` can load it; raises ValueError."""
    try:
        data = Path(path).read_bytes()
        ssl_context(path)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or type(e).__name__}") from None
    except ssl.SSLError:
        raise ValueError(f"{path} holds no usable PEM CA certificate") from None
    return data

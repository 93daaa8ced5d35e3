"""Opaque tokens by introspection (RFC 7662, issue #13): the guard asks a REAL endpoint,
Authlib's ``IntrospectionEndpoint`` over TLS (tests/introspection_server.py), caches its
answers within a bound, fails closed, and sends chosen claims upstream.

Attacked: a token the endpoint has revoked (accepted only while cached, never past the
bound), a token without the route's scope, an endpoint that is down, a wrong client
secret (refused, and the secret printed nowhere), a JWT pasted as an opaque token (asked of
the endpoint, never trusted locally), a flood of tokens (the cache stays bounded), an
endpoint certificate from another CA, and plaintext to another host (refused by the policy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import external_auth_pb2
from introspection_server import IntrospectionServer
from test_guard import Clock, allowed, denied, pki_dir

from xdsplane import jwt
from xdsplane.guard.introspect import IntrospectionSpec, token_digest
from xdsplane.guard.limits import GuardLimits
from xdsplane.guard.service import GuardConfig, GuardService
from xdsplane.guard.store import MemoryStore
from xdsplane.names import (
    GUARD_CHECK_EXTENSION,
    GUARD_CHECK_INTROSPECTION,
    GUARD_INTROSPECTION_PROVIDER,
    GUARD_REQUIRED_SCOPES,
)

PROVIDER = "idp-opaque"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """service-ca (trusted) and rogue-ca (not); ``idp`` and ``rogue-idp`` serve 127.0.0.1."""
    root = pki_dir(tmp_path_factory.mktemp("introspection-pki"))
    from xdsplane import pki

    pki.issue(root, "idp", "service-ca", dns=["127.0.0.1"], usage=["server"])
    pki.issue(root, "rogue-idp", "rogue-ca", dns=["127.0.0.1"], usage=["server"])
    return root


@pytest.fixture(scope="module")
def idp(certs: Path) -> Iterator[IntrospectionServer]:
    server = IntrospectionServer(certs / "idp.crt", certs / "idp.key")
    try:
        yield server
    finally:
        server.close()


def spec(server: IntrospectionServer, certs: Path, **over: Any) -> IntrospectionSpec:
    values: dict[str, Any] = {
        "name": PROVIDER,
        "endpoint": server.url,
        "client_id": server.client.client_id,
        "client_secret": server.client.client_secret,
        "ca_file": str(certs / "service-ca.crt"),
        "issuer": "https://idp.example.com",
        "audiences": ("billing",),
        "forward_claims": (("scope", "x-introspected-scope"), ("sub", "x-introspected-sub")),
        "max_entries": 100,
        "max_ttl": 30.0,
        "negative_ttl": 2.0,
        "timeout": 2.0,
    }
    values.update(over)
    return IntrospectionSpec(**values)


def service(s: IntrospectionSpec, clock: Clock | None = None) -> GuardService:
    clock = clock or Clock(time.time())
    limits = GuardLimits(introspection={s.name: s})
    return GuardService(MemoryStore(clock), limits, GuardConfig(), clock=clock)


def request(token: str | None, scopes: str = "", provider: str = PROVIDER) -> Any:
    req = external_auth_pb2.CheckRequest()
    ext = req.attributes.context_extensions
    ext[GUARD_CHECK_EXTENSION] = GUARD_CHECK_INTROSPECTION
    ext[GUARD_INTROSPECTION_PROVIDER] = provider
    if scopes:
        ext[GUARD_REQUIRED_SCOPES] = scopes
    if token is not None:
        req.attributes.request.http.headers["authorization"] = f"Bearer {token}"
    return req


def upstream_headers(resp: Any) -> dict[str, str]:
    return {h.header.key: h.header.value for h in resp.ok_response.headers}


def calls(svc: GuardService, result: str) -> float:
    value = svc.metrics.registry.get_sample_value(
        "xdsplane_guard_introspection_calls_total", {"provider": PROVIDER, "result": result}
    )
    return value or 0.0


# -- the guard against Authlib's endpoint ------------------------------------------------------


async def test_an_active_token_passes_with_its_claims_as_headers(
    idp: IntrospectionServer, certs: Path
) -> None:
    svc = service(spec(idp, certs))
    token = idp.issue("alice", scope="billing:read billing:write")
    resp = await svc.check(request(token, scopes="billing:read"))
    assert allowed(resp), resp
    assert upstream_headers(resp) == {
        "x-introspected-sub": "alice",
        "x-introspected-scope": "billing:read billing:write",
    }
    # the headers replace a client's copy (OVERWRITE_IF_EXISTS_OR_ADD), never append to it
    assert {h.append_action for h in resp.ok_response.headers} == {
        h.OVERWRITE_IF_EXISTS_OR_ADD for h in resp.ok_response.headers
    }
    assert idp.asked().count(token) == 1
    await svc.close()


async def test_no_token_or_an_unknown_one_is_refused_401(
    idp: IntrospectionServer, certs: Path
) -> None:
    svc = service(spec(idp, certs))
    status, reason, _ = denied(await svc.check(request(None)))
    assert (status, reason) == (401, "no_token")
    status, reason, _ = denied(await svc.check(request("made-up-token")))
    assert (status, reason) == (401, "inactive_token")
    # other spellings of the header are not a bearer token
    req = request(None)
    req.attributes.request.http.headers["authorization"] = "Basic YWxpY2U6cHc="
    assert denied(await svc.check(req))[:2] == (401, "no_token")
    await svc.close()


async def test_a_revoked_token_passes_while_cached_then_is_refused_once_the_cache_expires(
    idp: IntrospectionServer, certs: Path
) -> None:
    clock = Clock(time.time())
    svc = service(spec(idp, certs, max_ttl=10.0), clock)
    token = idp.issue("bob", ttl=300)
    assert allowed(await svc.check(request(token)))
    idp.deactivate(token)  # the authorization server revokes it
    clock.now += 9.0  # inside max_ttl: the cached answer stands, the endpoint is not asked
    assert allowed(await svc.check(request(token)))
    assert idp.asked().count(token) == 1
    clock.now += 1.5  # past max_ttl (10 s), though the token's exp is 300 s away
    status, reason, _ = denied(await svc.check(request(token)))
    assert (status, reason) == (401, "inactive_token")
    assert idp.asked().count(token) == 2
    # the inactive answer is cached for negative_ttl (2 s), then asked again
    assert denied(await svc.check(request(token)))[1] == "inactive_token"
    assert idp.asked().count(token) == 2
    clock.now += 2.5
    assert denied(await svc.check(request(token)))[1] == "inactive_token"
    assert idp.asked().count(token) == 3
    await svc.close()


async def test_an_active_answer_is_never_cached_past_the_tokens_exp(
    idp: IntrospectionServer, certs: Path
) -> None:
    clock = Clock(time.time())
    svc = service(spec(idp, certs, max_ttl=60.0), clock)
    token = idp.issue("carol", ttl=5)
    assert allowed(await svc.check(request(token)))
    clock.now += 6.0  # past exp, well inside max_ttl
    status, reason, _ = denied(await svc.check(request(token)))
    assert status == 401 and reason in ("expired", "inactive_token")
    await svc.close()


async def test_a_missing_scope_is_refused_403_with_the_reason(
    idp: IntrospectionServer, certs: Path
) -> None:
    svc = service(spec(idp, certs))
    token = idp.issue("dave", scope="billing:read")
    status, reason, body = denied(
        await svc.check(request(token, scopes="billing:read billing:write"))
    )
    assert (status, reason) == (403, "insufficient_scope")
    assert "billing:write" in body
    # a scope that only starts like the required one is not it
    token = idp.issue("erin", scope="billing:readonly billing:read-all")
    assert denied(await svc.check(request(token, scopes="billing:read")))[1] == "insufficient_scope"
    await svc.close()


async def test_a_wrong_audience_is_403_and_an_unknown_provider_503(
    idp: IntrospectionServer, certs: Path
) -> None:
    svc = service(spec(idp, certs))
    token = idp.issue("frank", audience="payroll")
    assert denied(await svc.check(request(token)))[:2] == (403, "wrong_audience")
    assert denied(await svc.check(request(token, provider="other")))[:2] == (
        503,
        "unknown_provider",
    )
    await svc.close()


async def test_a_jwt_pasted_as_an_opaque_token_is_asked_of_the_endpoint_not_trusted(
    idp: IntrospectionServer, certs: Path
) -> None:
    """A validly signed JWT (the sample's own issuer) is an unknown string to the endpoint:
    the guard never decodes it, and it is refused."""
    token = jwt.sign(jwt.new_key(), jwt.claims("mallory", now=time.time(), ttl=60))
    svc = service(spec(idp, certs))
    assert denied(await svc.check(request(token)))[:2] == (401, "inactive_token")
    assert token in idp.asked()
    await svc.close()


async def test_the_cache_keeps_at_most_max_entries(idp: IntrospectionServer, certs: Path) -> None:
    svc = service(spec(idp, certs, max_entries=2))
    tokens = [idp.issue(f"user-{i}") for i in range(3)]
    for t in tokens:
        assert allowed(await svc.check(request(t)))
    found = svc.introspectors[PROVIDER]
    assert found.entries == 2
    value = svc.metrics.registry.get_sample_value(
        "xdsplane_guard_introspection_cache_entries", {"provider": PROVIDER}
    )
    assert value == 2
    # the least recently used (the first) was dropped: asked again; the last is still cached
    assert allowed(await svc.check(request(tokens[2])))
    assert allowed(await svc.check(request(tokens[0])))
    assert idp.asked().count(tokens[2]) == 1
    assert idp.asked().count(tokens[0]) == 2
    await svc.close()


async def test_concurrent_requests_with_one_token_ask_the_endpoint_once(
    idp: IntrospectionServer, certs: Path
) -> None:
    svc = service(spec(idp, certs))
    token = idp.issue("grace")
    answers = await asyncio.gather(*(svc.check(request(token)) for _ in range(8)))
    assert all(allowed(a) for a in answers)
    assert idp.asked().count(token) == 1
    await svc.close()


async def test_fails_closed_when_the_endpoint_is_down(certs: Path) -> None:
    server = IntrospectionServer(certs / "idp.crt", certs / "idp.key")
    svc = service(spec(server, certs))
    token = server.issue("heidi")
    server.close()  # nothing listens on its port any more
    status, reason, body = denied(await svc.check(request(token)))
    assert (status, reason) == (503, "introspection_unavailable")
    assert token not in body
    assert calls(svc, "unavailable") == 1
    # a failure is never cached: the next request asks again (and fails again)
    assert denied(await svc.check(request(token)))[1] == "introspection_unavailable"
    assert calls(svc, "unavailable") == 2
    await svc.close()


async def test_fails_closed_on_a_timeout(certs: Path) -> None:
    """An endpoint that accepts the connection and never answers: refused after timeout."""

    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()  # reads nothing, answers nothing, until the test ends
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    s = IntrospectionSpec(
        name=PROVIDER,
        endpoint=f"http://127.0.0.1:{port}/introspect",
        client_id="edge",
        client_secret="x",
        timeout=0.3,
    )
    svc = service(s)
    started = time.monotonic()
    status, reason, _ = denied(await svc.check(request("some-token")))
    assert (status, reason) == (503, "introspection_unavailable")
    assert time.monotonic() - started < 5
    await svc.close()
    done.set()
    server.close()
    await server.wait_closed()


async def test_a_wrong_client_secret_is_refused_and_never_printed(
    idp: IntrospectionServer, certs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "wrong-" + idp.client.client_secret
    svc = service(spec(idp, certs, client_secret=wrong))
    token = idp.issue("ivan")
    resp = await svc.check(request(token))
    status, reason, _ = denied(resp)
    assert (status, reason) == (503, "introspection_failed")
    assert calls(svc, "http_error") == 1
    out = capsys.readouterr()
    text = out.out + out.err + str(resp) + repr(svc.introspectors) + repr(svc.limits)
    assert wrong not in text and idp.client.client_secret not in text
    assert token not in text  # the log shows a sha256 prefix at most
    assert token_digest(token)[:12] in out.out + out.err
    await svc.close()


async def test_an_endpoint_certificate_from_another_ca_is_refused(certs: Path) -> None:
    rogue = IntrospectionServer(certs / "rogue-idp.crt", certs / "rogue-idp.key")
    try:
        svc = service(spec(rogue, certs))  # trusts service-ca only
        token = rogue.issue("judy")
        status, reason, _ = denied(await svc.check(request(token)))
        assert (status, reason) == (503, "introspection_unavailable")
        assert rogue.asked() == []  # the handshake failed: neither token nor secret was sent
        await svc.close()
    finally:
        rogue.close()


async def test_an_endpoint_certificate_for_another_name_is_refused(certs: Path) -> None:
    """Signed by the trusted CA, but issued to another host name."""
    from xdsplane import pki

    pki.issue(certs, "other-host", "service-ca", dns=["other.example.com"], usage=["server"])
    server = IntrospectionServer(certs / "other-host.crt", certs / "other-host.key")
    try:
        svc = service(spec(server, certs))
        assert denied(await svc.check(request(server.issue("kate"))))[1] == (
            "introspection_unavailable"
        )
        assert server.asked() == []
        await svc.close()
    finally:
        server.close()


# -- the policy, as the guard reads it -----------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "examples" / "introspection.yaml"


def _example_folder(tmp: Path) -> Path:
    """docs/examples/introspection.yaml at the same depth under ``tmp``, beside a dev PKI in
    tmp/certs (the example's ../../certs) and its client secret file."""
    from xdsplane import pki

    pki.init(tmp / "certs")
    (tmp / "certs" / "introspection-client-secret").write_text("s3cret-Value-9f2\n")
    folder = tmp / "docs" / "examples"
    folder.mkdir(parents=True)
    (folder / "introspection.yaml").write_text(EXAMPLE.read_text())
    return folder


def test_the_docs_example_validates_and_the_guard_reads_its_provider(tmp_path: Path) -> None:
    from test_policy_corpus import run_cli

    from xdsplane.guard.policy import limits_from_policy

    folder = _example_folder(tmp_path)
    done = run_cli("validate", str(folder), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    found = limits_from_policy(folder).introspection["idp-opaque"]
    assert found.client_secret == "s3cret-Value-9f2"  # one line, newline dropped
    assert found.ca_file is not None and found.ca_file.endswith("service-ca.crt")
    assert (found.max_entries, found.max_ttl, found.negative_ttl) == (50000, 30.0, 2.0)
    assert "s3cret" not in repr(found)


def test_a_missing_or_empty_secret_file_is_named_never_shown(tmp_path: Path) -> None:
    from xdsplane.config.errors import ConfigErrors
    from xdsplane.guard.policy import limits_from_policy

    folder = _example_folder(tmp_path)
    secret = tmp_path / "certs" / "introspection-client-secret"
    secret.unlink()
    with pytest.raises(ConfigErrors) as e:
        limits_from_policy(folder)
    text = str(e.value)
    assert "introspection.yaml:" in text and "client_secret_file: cannot read" in text
    assert "../../certs/introspection-client-secret: No such file" in text
    secret.write_text("\n")
    with pytest.raises(ConfigErrors, match="is empty"):
        limits_from_policy(folder)
    secret.write_text("first-Secret-line\nsecond-Secret-line\n")
    with pytest.raises(ConfigErrors) as e:
        limits_from_policy(folder)
    assert "more than one line" in str(e.value)
    assert "Secret-line" not in str(e.value)


async def test_a_changed_provider_gets_a_fresh_cache(idp: IntrospectionServer, certs: Path) -> None:
    """A policy reload that changes the provider (here its cache bound) starts a new cache:
    an answer cached under the old settings is not trusted under the new ones."""
    svc = service(spec(idp, certs))
    token = idp.issue("liam")
    assert allowed(await svc.check(request(token)))
    first = svc.introspectors[PROVIDER]
    idp.deactivate(token)
    svc.limits = GuardLimits(introspection={PROVIDER: spec(idp, certs, max_ttl=5.0)})
    assert denied(await svc.check(request(token)))[1] == "inactive_token"
    assert svc.introspectors[PROVIDER] is not first
    await svc.close()


async def test_with_revocation_check_a_revoked_sub_of_an_active_token_is_refused(
    idp: IntrospectionServer, certs: Path
) -> None:
    from xdsplane.guard import revoke as rv
    from xdsplane.names import GUARD_ALSO_REVOCATION

    clock = Clock(time.time())
    svc = service(spec(idp, certs), clock)
    token = idp.issue("mallory")
    req = request(token)
    assert allowed(await svc.check(req))  # without the check: the endpoint says active
    entry = rv.entry("sub", "mallory", None, "stolen laptop")
    await rv.put(svc.store, svc.config.key_prefix, entry, clock.now)
    req.attributes.context_extensions[GUARD_ALSO_REVOCATION] = "true"
    assert denied(await svc.check(req))[:2] == (403, "revoked_sub")
    await svc.close()

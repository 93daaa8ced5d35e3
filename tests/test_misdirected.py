"""421 comes before everything else (issue #12, item 6): on a TLS listener, a request whose
Host (:authority) is not a domain of the connection's host (SNI) is answered 421 by the
route configuration's ``misdirected`` virtual host, and no check of that host's HCM acts on
it: no JWT check (no 401), no RBAC, no rate limit, and above all no call to the guard,
which could spend the token's one use (jti) or a rate-limit hit.

Envoy runs every HTTP filter of the chain before the router sends a route's
``direct_response``, so the 421 route has to switch each of them off. The end-to-end tests
run the sample as shipped (snapshots/, free ports) with its guard over mutual TLS, a real
Envoy 1.40 and the billing demo service; the guard's own counters
(``xdsplane_guard_decisions_total``, both APIs) show that it was never asked.

On the old translation (a bare 421 route) the billing host's HCM ran jwt_authn, RBAC, both
rate limit filters and ext_authz on the misdirected route: the guard answered 403
(``no_jwt_payload``) instead of 421.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import (
    Envoy,
    ProcessGroup,
    Response,
    XdsServer,
    bearer,
    exchange,
    free_port,
    http_get,
    wait_until,
    xdsplane_argv,
)
from test_guard import guard_tls_args
from test_policy_golden import prepare
from test_sample import sample_copy
from tls_helpers import (
    BILLING,
    STRICT,
    DemoUpstream,
    TlsConnection,
    attach_to_report,
    client_context,
    process_group,
)

from xdsplane import jwt

GOLDEN = Path(__file__).resolve().parent / "golden"
SAMPLE = Path(__file__).resolve().parent.parent / "snapshots"
UNKNOWN = "unknown.example.net"

JWT_FILTER = "envoy.filters.http.jwt_authn"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
RBAC_FILTER = "envoy.filters.http.rbac"
MISSING_CERT_COUNTER = "xdsplane.client_certificate_missing"  # an RBAC with shadow rules only
LOCAL_RATE_LIMIT = "envoy.filters.http.local_ratelimit"
GLOBAL_RATE_LIMIT = "envoy.filters.http.ratelimit"
HARMLESS = {"envoy.filters.http.router", "envoy.filters.http.header_mutation"}
"""Filters that check nothing: the router (it sends the 421) and the claim-header strip."""


# -- the translation: every check filter of the HCM is off on the 421 route ------------------


def _render(folder: Path) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, "-m", "xdsplane", "render", str(folder), "--node", "edge-1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rendered: dict[str, Any] = json.loads(r.stdout)
    return rendered


def _misdirected_checks(rendered: dict[str, Any]) -> list[tuple[str, list[str], dict[str, Any]]]:
    """For each TLS filter chain with a misdirected virtual host: (chain name, its HCM's
    HTTP filters, the 421 route)."""
    routes = {r["name"]: r["resource"] for r in rendered["resources"]["RDS"]["resources"]}
    out = []
    for lst in rendered["resources"]["LDS"]["resources"]:
        for chain in lst["resource"].get("filter_chains", []):
            for f in chain["filters"]:
                hcm = f["typed_config"]
                config = routes[hcm["rds"]["route_config_name"]]
                for vhost in config["virtual_hosts"]:
                    if vhost["name"] != "misdirected":
                        continue
                    (route,) = vhost["routes"]
                    filters = [h["name"] for h in hcm["http_filters"]]
                    out.append((chain["name"], filters, route))
    return out


def _assert_nothing_checks(chain: str, filters: list[str], route: dict[str, Any]) -> None:
    assert route["direct_response"]["status"] == 421, (chain, route)
    assert route["match"] == {"prefix": "/"}, (chain, route)
    per_filter = route.get("typed_per_filter_config", {})
    for name in filters:
        if name in HARMLESS:
            continue
        config = per_filter.get(name)
        if name in (JWT_FILTER, EXT_AUTHZ_FILTER):
            assert config is not None and config.get("disabled") is True, (chain, name, route)
        elif name in (RBAC_FILTER, MISSING_CERT_COUNTER):
            # An RBACPerRoute without `rbac`: Envoy disables the filter on the route.
            assert config is not None and set(config) == {"@type"}, (chain, name, route)
        elif name in (LOCAL_RATE_LIMIT, GLOBAL_RATE_LIMIT):
            # No per-route config and no descriptor: the HCM-level configs limit nothing.
            assert config is None, (chain, name, route)
            assert "rate_limits" not in route, (chain, route)
        else:
            pytest.fail(f"{chain}: filter {name} has no rule here; does it act on the 421?")


@pytest.mark.parametrize("folder", [SAMPLE, GOLDEN / "tls-guard"], ids=["sample", "tls-guard"])
def test_the_421_route_switches_off_every_check_of_its_hcm(folder: Path, tmp_path: Path) -> None:
    if folder == SAMPLE:
        folder, _ = sample_copy(tmp_path)
    else:
        folder, _ = prepare(folder.name, tmp_path)
    found = _misdirected_checks(_render(folder))
    assert found, "no misdirected virtual host rendered"
    # The billing host runs every kind of check: jwt_authn, RBAC, both limits, ext_authz.
    billing = [filters for chain, filters, _ in found if chain == "https/billing"]
    assert billing and {JWT_FILTER, EXT_AUTHZ_FILTER, RBAC_FILTER} <= set(billing[0])
    assert {LOCAL_RATE_LIMIT, GLOBAL_RATE_LIMIT} <= set(billing[0])
    for chain, filters, route in found:
        _assert_nothing_checks(chain, filters, route)


# -- the sample, live: Envoy 1.40, the guard over mTLS -----------------------------------------


@dataclass
class Edge:
    port: int
    certs: Path
    guard_admin: int
    billing: DemoUpstream
    procs: ProcessGroup

    def get(
        self, sni: str, host: str, path: str, token: str | None, cert: str | None = None
    ) -> Response:
        """One GET on a fresh TLS connection with SNI ``sni`` and Host ``host``."""
        conn = TlsConnection(self.port, client_context(self.certs, cert), sni)
        return exchange(conn, path, {"Host": host, **bearer(token)})

    def decisions(self) -> Counter[tuple[str, str, str]]:
        """The guard's decisions so far by (api, result, reason), from its /metrics."""
        text = http_get(self.guard_admin, "/metrics").text
        out: Counter[tuple[str, str, str]] = Counter()
        for line in text.splitlines():
            m = re.fullmatch(r"xdsplane_guard_decisions_total\{(.*)\} (\S+)", line)
            if m is None:
                continue
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[(labels["api"], labels["result"], labels["reason"])] += int(float(m.group(2)))
        return out


def by_api(decisions: Counter[tuple[str, str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for (api, _, _), n in decisions.items():
        out[api] = out.get(api, 0) + n
    return out


# The module's processes serve its Envoy tests, ~20 s together here; 10 minutes covers a
# machine many times slower (start-up included) before the watchdog kills them. Its tests
# are marked envoy: conftest skips (or, in CI, fails) them without Envoy 1.40.
MODULE_SECONDS = 600.0


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    """The sample as shipped (free ports): its guard over mTLS, xdsplane serve, Envoy and
    the billing service; ready once a token reaches billing."""
    root = tmp_path_factory.mktemp("misdirected")
    with process_group(root / "logs", max_seconds=MODULE_SECONDS) as procs:
        folder, ports = sample_copy(root)
        certs = root / "certs"
        billing = DemoUpstream(certs, ports[9443]).start()
        try:
            guard_admin = free_port()
            guard = procs.spawn(
                "guard",
                xdsplane_argv(
                    *("guard", "--address", f"127.0.0.1:{ports[18081]}", "--policy", str(folder)),
                    *("--admin-address", f"127.0.0.1:{guard_admin}", "--log-format", "json"),
                    *guard_tls_args(certs),
                ),
            ).start()
            server = XdsServer(procs, folder).start()
            wait_until(
                lambda: guard.ensure_alive() or http_get(guard_admin, "/healthz").status == 200,
                20,
                what="the guard answers /healthz",
            )
            Envoy(procs, root, "edge-1", server.xds_address).start()
            found = Edge(ports[8443], certs, guard_admin, billing, procs)
            wait_until(
                lambda: (
                    found.get(
                        BILLING, BILLING, "/billing/invoices", jwt.token(certs, "alice")
                    ).status
                    == 200
                ),
                30,
                what="the sample edge serves /billing/ with a token (through the guard)",
            )
            yield found
        finally:
            billing.stop()


@pytest.fixture(autouse=True)
def _report_logs(request: pytest.FixtureRequest) -> None:
    if "edge" in request.fixturenames:
        attach_to_report(request, request.getfixturevalue("edge").procs)


# (SNI, Host) on the billing connection, whose HCM runs every check: the request names the
# other host, an unknown name, or a name Envoy does not take for the connection's host.
MISDIRECTED = {
    "billing->strict": (BILLING, STRICT),
    "billing->strict:port": (BILLING, f"{STRICT}:8443"),
    "billing->unknown": (BILLING, UNKNOWN),
    "billing->sub-domain": (BILLING, f"x.{BILLING}"),
}
# The other way round: the strict connection (client certificate required).
FROM_STRICT = {
    "strict->billing": (STRICT, BILLING),
    "strict->unknown": (STRICT, UNKNOWN),
}
# Paths of every kind of route: the token route (JWT, rate limits, replay protection), the
# admin route (RBAC: client certificate), a direct response, a path the 400 route refuses.
PATHS = ["/billing/invoices", "/billing/admin/users", "/healthz", "/billing/invoices;x=1", "/"]


def _spends_nothing(edge: Edge, case: str, sni: str, host: str) -> None:
    """A valid token on a request for another host: 421 on every path, whatever the route
    of the right host would check; the guard is never asked (no Check, no rate-limit call),
    and the token then still works exactly once on its host (its jti was not spent)."""
    cert = "alice"  # the strict host requires a client certificate; billing accepts one
    # A subject of its own: the rate limits count per subject, from a full budget.
    token = jwt.token(edge.certs, f"misdirected-{case}")
    before = edge.decisions()
    reached = len(edge.billing.received)
    for path in PATHS:
        answer = edge.get(sni, host, path, token, cert)
        assert answer.status == 421, (case, path, answer)
        assert b"misdirected request" in answer.body, (case, path, answer)
    assert edge.decisions() == before, "the guard was asked about a misdirected request"
    assert len(edge.billing.received) == reached, "a misdirected request reached billing"

    # The same token on its host: first use allowed (one Check, one rate-limit call), then
    # a replay refused: the misdirected requests spent neither its jti nor budget.
    first = edge.get(BILLING, BILLING, "/billing/invoices", token, cert)
    assert first.status == 200, first
    # This Envoy's bucket for the subject: this request is its first hit.
    assert first.headers["x-ratelimit-limit"] == "60", first.headers
    assert first.headers["x-ratelimit-remaining"] == "59", first.headers
    after = edge.decisions()
    # The guard: exactly this request's two calls (first use of the jti, one hit).
    spent = after - before
    assert spent[("authz", "allow", "ok")] == 1, spent
    assert by_api(spent) == {"authz": 1, "ratelimit": 1}, spent
    replay = edge.get(BILLING, BILLING, "/billing/invoices", token, cert)
    assert replay.status == 403, replay
    assert (edge.decisions() - after)[("authz", "deny", "replay")] == 1


@pytest.mark.envoy
@pytest.mark.parametrize("case", MISDIRECTED)
def test_a_misdirected_request_is_421_and_spends_nothing(edge: Edge, case: str) -> None:
    _spends_nothing(edge, case, *MISDIRECTED[case])


@pytest.mark.envoy
@pytest.mark.parametrize("case", FROM_STRICT)
def test_the_strict_connection_answers_421_too(edge: Edge, case: str) -> None:
    """The same promise on the strict host's connection. Its HCM runs no check in the
    sample, so this one held on the old translation too: it keeps the billing host's
    checks (and its token's one use) out of reach from there."""
    _spends_nothing(edge, case, *FROM_STRICT[case])


@pytest.mark.envoy
def test_a_misdirected_http2_request_is_421(edge: Edge, tmp_path: Path) -> None:
    """HTTP/2, as a browser reusing a connection for another name it covers: the
    :authority of a request on the billing connection names the strict host. curl sends
    the Host header as :authority."""
    curl = shutil.which("curl")
    if (
        curl is None
        or "HTTP2"
        not in subprocess.run(
            [curl, "-V"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    ):
        pytest.skip("no curl with HTTP/2")
    token = jwt.token(edge.certs, "misdirected-h2")
    headers = tmp_path / "headers"  # the token stays off the command line
    headers.write_text(f"Authorization: Bearer {token}\nHost: {STRICT}\n")
    url = f"https://{BILLING}:{edge.port}/billing/invoices"
    before = edge.decisions()
    r = subprocess.run(
        [
            *(curl, "-sS", "--http2", "-o", "/dev/null", "-w", "%{http_version} %{http_code}"),
            *("--cacert", str(edge.certs / "service-ca.crt")),
            *("--resolve", f"{BILLING}:{edge.port}:127.0.0.1", "-H", f"@{headers}", url),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "2 421", r.stdout
    assert edge.decisions() == before
    assert edge.get(BILLING, BILLING, "/billing/invoices", token).status == 200


@pytest.mark.envoy
@pytest.mark.parametrize(
    "token", [None, "not-a-jwt", "e30.e30.e30"], ids=["no-token", "garbage", "unsigned"]
)
@pytest.mark.parametrize("case", ["billing->strict", "billing->unknown"])
def test_a_misdirected_request_without_a_valid_token_is_421_not_401(
    edge: Edge, case: str, token: str | None
) -> None:
    """No token or a bad one: still 421 (jwt_authn does not run, so no 401), on the token
    route itself, and the guard is not asked (the old translation answered its 403)."""
    sni, host = MISDIRECTED[case]
    before = edge.decisions()
    reached = len(edge.billing.received)
    for cert in (None, "alice"):
        answer = edge.get(sni, host, "/billing/invoices", token, cert)
        assert answer.status == 421, (case, cert, answer)
    assert edge.decisions() == before
    assert len(edge.billing.received) == reached
    # The right host still checks: no token is 401 there.
    assert edge.get(BILLING, BILLING, "/billing/invoices", token).status == 401

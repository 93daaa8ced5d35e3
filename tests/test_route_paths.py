"""Route path matching as the upstream reads paths (issue #11, item 5): the translation.

What Envoy does with each spelling is tested end to end on the sample
(tests/test_sample.py) and the TLS edge (tests/test_tls_e2e.py); here, the rules that decide
the RouteMatch: path_prefix, case_sensitive, the default widening of protected routes, and
the host's path_parameters.
"""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import json_format
from pydantic import ValidationError

from xdsplane.policy.model import Host
from xdsplane.policy.translate import routes


def host(*specs: dict[str, Any], **extra: Any) -> Host:
    return Host.model_validate(
        {"name": "h", "domains": ["h.example.com"], "routes": list(specs), **extra}
    )


def matches(h: Host) -> list[dict[str, Any]]:
    """The RouteMatch of each route of the host's virtual host, as JSON, in order."""
    vhost = routes.virtual_host(h, jwt_filter=True, ext_authz=True)
    return [
        json_format.MessageToDict(r.match, preserving_proto_field_name=True) for r in vhost.routes
    ]


UP = {"upstream": "app"}
CERT = {"require_client_certificate": True}


def test_path_prefix_is_envoys_segment_aware_prefix() -> None:
    h = host({"path_prefix": "/billing/admin", **UP}, path_parameters="allow")
    assert matches(h) == [{"path_separated_prefix": "/billing/admin"}]


@pytest.mark.parametrize("bad", ["/billing/admin/", "/", "/a?b", "/a#b", "billing"])
def test_a_path_prefix_envoy_would_refuse_is_an_error(bad: str) -> None:
    with pytest.raises(ValidationError, match="path_prefix"):
        host({"path_prefix": bad, **UP})


def test_case_sensitive_false_matches_any_case() -> None:
    h = host({"prefix": "/a/", "case_sensitive": False, **UP}, path_parameters="allow")
    assert matches(h) == [{"prefix": "/a/", "case_sensitive": False}]
    h = host({"regex": "/a/[0-9]+", "case_sensitive": False, **UP}, path_parameters="allow")
    assert matches(h) == [{"safe_regex": {"regex": "(?i)/a/[0-9]+"}}]


def test_a_protected_route_that_asks_at_least_what_follows_matches_widely() -> None:
    """/admin/ asks a certificate, / asks nothing: /ADMIN/x and /admin may only gain checks."""
    h = host({"prefix": "/admin/", **CERT, **UP}, {"prefix": "/", **UP}, path_parameters="allow")
    assert matches(h)[0] == {"path_separated_prefix": "/admin", "case_sensitive": False}
    assert matches(h)[1] == {"prefix": "/"}  # asks nothing: as written


@pytest.mark.parametrize(
    "first, later",
    [
        ({"jwt_optional": "idp"}, {"jwt": "idp"}),  # /OPEN/x would skip the token
        ({"rate_limit": {"requests": 5, "per": "1s"}}, {"jwt": "idp"}),
        (CERT, {"jwt": "idp"}),  # the sample's case: incomparable, say it explicitly
        ({"jwt": "idp"}, {"jwt": "idp", "replay_protection": True}),
        ({"allow_client_sans": ["spiffe://x/*"]}, {"allow_client_sans": ["spiffe://x/a"]}),
    ],
)
def test_no_widening_when_a_later_route_asks_something_else(
    first: dict[str, Any], later: dict[str, Any]
) -> None:
    h = host({"prefix": "/a/", **first, **UP}, {"prefix": "/", **later, **UP})
    assert matches(h)[1] == {"prefix": "/a/"}


def test_case_sensitive_true_keeps_a_protected_route_as_written_in_case() -> None:
    h = host({"prefix": "/admin/", "case_sensitive": True, **CERT, **UP}, path_parameters="allow")
    assert matches(h) == [{"path_separated_prefix": "/admin"}]


def test_a_prefix_rewrite_keeps_the_prefix_exact() -> None:
    """prefix_rewrite replaces what was matched: /api/ -> /v2/ must not become /v2//x."""
    h = host(
        {"prefix": "/api/", "rewrite": {"prefix": "/v2/"}, **CERT, **UP}, path_parameters="allow"
    )
    assert matches(h) == [{"prefix": "/api/", "case_sensitive": False}]


def test_path_parameters_are_refused_first_with_no_filter_acting() -> None:
    h = host({"prefix": "/", "jwt": "idp", "replay_protection": True, **UP})
    vhost = routes.virtual_host(h, jwt_filter=True, ext_authz=True)
    first = json_format.MessageToDict(vhost.routes[0], preserving_proto_field_name=True)
    assert first["name"] == "h/(path-parameters)"
    assert first["match"] == {"safe_regex": {"regex": ".*(;|%3[Bb]).*"}}
    assert first["direct_response"]["status"] == 400
    per_filter = first["typed_per_filter_config"]
    # No token needed for the 400, and none spent at the guard.
    assert per_filter["envoy.filters.http.jwt_authn"]["disabled"] is True
    assert per_filter["envoy.filters.http.ext_authz"]["disabled"] is True
    assert len(vhost.routes) == 2


def test_path_parameters_allow_adds_no_route() -> None:
    h = host({"prefix": "/", **UP}, path_parameters="allow")
    assert [r.name for r in routes.virtual_host(h).routes] == ["h/route-0"]


def test_a_match_with_a_semicolon_needs_path_parameters_allow() -> None:
    with pytest.raises(ValidationError, match="path_parameters: allow"):
        host({"path": "/a;b", **UP})
    host({"path": "/a;b", **UP}, path_parameters="allow")

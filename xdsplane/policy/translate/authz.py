"""Per-route access rules, checked at L7 by Envoy's RBAC HTTP filter.

What a route asks of a request (``require_client_certificate``, ``allow_client_sans`` and
``access``) becomes one RBACPerRoute of the single ``envoy.filters.http.rbac`` filter in the
route's HCM (after jwt_authn, so JWT claims are in dynamic metadata; before the router). The
filter itself has no rules: a route without any says nothing and everything passes.

**One DENY engine per route.** An RBAC config has a single action, and ``access`` needs both
"refuse what a deny rule matches" and "refuse what no allow rule matches". Rather than two
filter instances (two per-route configs to keep in step, and two filters writing the same
dynamic-metadata namespace) or the matcher API (no ``mtls_authenticated`` principal, and
ordered matchers where a policy map is enough), every reason to refuse is one policy of a
DENY engine:

- ``client-certificate``: with ``require_client_certificate``, not (a validated client
  certificate [with a SAN matching ``allow_client_sans``]); with ``allow_client_sans``
  alone, a validated client certificate with no SAN matching (a request without a
  certificate is not refused by it: the two keys are the two questions Envoy's TLS asks
  too, whether a certificate is required and which ones are accepted);
- ``deny-N``: deny rule N of ``access`` matches;
- ``no-allow-rule`` (``default: deny``): not (any allow rule matches).

A policy matches when its principal does; every condition is written as a Principal (RBAC
principals can test headers, ``url_path``, dynamic metadata and the peer address too), so
"not any allow rule" is one ``not_id``. Deny beats allow by construction. When Envoy
refuses, the matched policy's name is in the response details
(``rbac_access_denied_matched_policy[deny-0]``) and in the dynamic metadata
``envoy.filters.http.rbac`` / ``enforced_effective_policy_id``. When several match, Envoy
reports the first by name (its policies are a sorted map): the names are chosen so that
``client-certificate`` comes first and an explicit ``deny-N`` before ``no-allow-rule``.

**Shadow.** With ``access.shadow`` the access policies go to ``shadow_rules`` instead of
``rules`` (the client-certificate policy stays enforced): Envoy evaluates them, never
refuses, and writes ``shadow_engine_result`` (``allowed``/``denied``) and
``shadow_effective_policy_id`` into the same namespace, which the access log shows.

``Principal.authenticated`` is not used: with no ``principal_name`` it matches every TLS
connection, with or without a certificate; ``mtls_authenticated`` requires a validated one.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import address_pb2, extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.rbac.principals.mtls_authenticated.v3 import mtls_authenticated_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2
from envoy.type.matcher.v3 import (
    metadata_pb2,
    number_pb2,
    path_pb2,
    regex_pb2,
    string_pb2,
    value_pb2,
)
from google.protobuf import wrappers_pb2

from xdsplane.policy.model import Access, AccessRule, ClaimValue, Host, Route
from xdsplane.policy.translate.common import pack
from xdsplane.policy.translate.jwt import FILTER as JWT_FILTER
from xdsplane.policy.translate.jwt import PAYLOAD_KEY

RBAC_FILTER = "envoy.filters.http.rbac"
POLICY = "client-certificate"
DEFAULT_DENY = "no-allow-rule"
METADATA_NAMESPACE = RBAC_FILTER
"""Where Envoy's RBAC filter writes its decisions (dynamic metadata)."""


def metadata_operator(key: str) -> str:
    """The access log operator for one key of the RBAC filter's dynamic metadata."""
    return f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{key})%"


def needs_rbac(hosts: Iterable[Host]) -> bool:
    """Does any route of the HCM serving ``hosts`` carry RBAC rules?"""
    return any(
        r.require_client_certificate or r.allow_client_sans or r.access is not None
        for h in hosts
        for r in h.routes
    )


def glob_regex(glob: str) -> str:
    return "^" + ".*".join(re.escape(part) for part in glob.split("*")) + "$"


def _or(ids: list[Any]) -> Any:
    return ids[0] if len(ids) == 1 else rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ids))


def _and(ids: list[Any]) -> Any:
    return ids[0] if len(ids) == 1 else rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=ids))


def _not(principal: Any) -> Any:
    return rbac_pb2.Principal(not_id=principal)


def _mtls(config: Any) -> Any:
    return rbac_pb2.Principal(
        custom=extension_pb2.TypedExtensionConfig(
            name="envoy.rbac.principals.mtls_authenticated", typed_config=pack(config)
        )
    )


def _sans(globs: list[str]) -> Any:
    """A validated client certificate with a SAN (URI if the glob has ://, else DNS)
    matching one of ``globs``."""
    ids = []
    for glob in globs:
        kind = (
            common_pb2.SubjectAltNameMatcher.URI
            if "://" in glob
            else common_pb2.SubjectAltNameMatcher.DNS
        )
        matcher = common_pb2.SubjectAltNameMatcher(
            san_type=kind,
            matcher=string_pb2.StringMatcher(
                safe_regex=regex_pb2.RegexMatcher(regex=glob_regex(glob))
            ),
        )
        ids.append(_mtls(mtls_authenticated_pb2.Config(san_matcher=matcher)))
    return _or(ids)


def _certificate(route: Route) -> Any:
    if not route.allow_client_sans:
        return _mtls(mtls_authenticated_pb2.Config(any_validated_client_certificate=True))
    return _sans(route.allow_client_sans)


def _value(value: ClaimValue) -> Any:
    if isinstance(value, bool):
        return value_pb2.ValueMatcher(bool_match=value)
    if isinstance(value, int):  # JSON numbers are doubles in the payload's Struct
        return value_pb2.ValueMatcher(double_match=number_pb2.DoubleMatcher(exact=float(value)))
    return value_pb2.ValueMatcher(string_match=string_pb2.StringMatcher(exact=value))


def _claim(claim: str, wanted: ClaimValue | list[ClaimValue]) -> Any:
    """The verified token's ``claim`` equals one of ``wanted``, or is a list holding one."""
    path = [
        metadata_pb2.MetadataMatcher.PathSegment(key=PAYLOAD_KEY),
        metadata_pb2.MetadataMatcher.PathSegment(key=claim),
    ]
    ids = []
    for value in wanted if isinstance(wanted, list) else [wanted]:
        for matcher in (
            _value(value),
            value_pb2.ValueMatcher(list_match=value_pb2.ListMatcher(one_of=_value(value))),
        ):
            ids.append(
                rbac_pb2.Principal(
                    metadata=metadata_pb2.MetadataMatcher(
                        filter=JWT_FILTER, path=path, value=matcher
                    )
                )
            )
    return _or(ids)


def _source(cidr: str) -> Any:
    network = ipaddress.ip_network(cidr)
    return rbac_pb2.Principal(
        direct_remote_ip=address_pb2.CidrRange(
            address_prefix=str(network.network_address),
            prefix_len=wrappers_pb2.UInt32Value(value=network.prefixlen),
        )
    )


def _method(method: str) -> Any:
    return rbac_pb2.Principal(
        header=rc.HeaderMatcher(name=":method", string_match=string_pb2.StringMatcher(exact=method))
    )


def _path(glob: str, ignore_case: bool = False) -> Any:
    """``*`` matches any run of characters; none: exact; one at the end: prefix.
    ``ignore_case``: any case matches (RE2's ``(?i)`` for a regex)."""
    if "*" not in glob:
        matcher = string_pb2.StringMatcher(exact=glob, ignore_case=ignore_case)
    elif glob.endswith("*") and "*" not in glob[:-1]:
        matcher = string_pb2.StringMatcher(prefix=glob[:-1], ignore_case=ignore_case)
    else:
        pattern = glob_regex(glob)
        regex = regex_pb2.RegexMatcher(regex=f"(?i){pattern}" if ignore_case else pattern)
        matcher = string_pb2.StringMatcher(safe_regex=regex)
    return rbac_pb2.Principal(url_path=path_pb2.PathMatcher(path=matcher))


def rule_principal(rule: AccessRule, deny: bool = False) -> Any:
    """Every given key of ``rule`` matches; within a list, any entry. A ``deny`` rule's
    paths match in any case (/ADMIN/x is refused like /admin/x: an upstream may read them
    as one); an allow rule's only as written (allowing fewer spellings)."""
    parts = []
    if rule.client_sans is not None:
        parts.append(_sans(rule.client_sans))
    if rule.jwt_claims is not None:
        parts.extend(_claim(c, v) for c, v in sorted(rule.jwt_claims.items()))
    if rule.sources is not None:
        parts.append(_or([_source(s) for s in rule.sources]))
    if rule.methods is not None:
        parts.append(_or([_method(m) for m in sorted(set(rule.methods))]))
    if rule.paths is not None:
        parts.append(_or([_path(p, ignore_case=deny) for p in rule.paths]))
    return _and(parts)


def _policy(principal: Any) -> Any:
    return rbac_pb2.Policy(permissions=[rbac_pb2.Permission(any=True)], principals=[principal])


def access_policies(access: Access) -> dict[str, Any]:
    """The DENY policies of ``access``: ``deny-N`` per deny rule, ``no-allow-rule``."""
    out = {f"deny-{i}": _policy(rule_principal(r, deny=True)) for i, r in enumerate(access.deny)}
    if access.default == "deny":
        if access.allow:
            out[DEFAULT_DENY] = _policy(_not(_or([rule_principal(r) for r in access.allow])))
        else:
            out[DEFAULT_DENY] = _policy(rbac_pb2.Principal(any=True))
    return out


def per_route(route: Route) -> Any | None:
    """The RBACPerRoute for a route, or None when it asks nothing of the request."""
    enforced: dict[str, Any] = {}
    shadow: dict[str, Any] = {}
    if route.require_client_certificate:
        enforced[POLICY] = _policy(_not(_certificate(route)))
    elif route.allow_client_sans:
        presented = _mtls(mtls_authenticated_pb2.Config(any_validated_client_certificate=True))
        enforced[POLICY] = _policy(_and([presented, _not(_sans(route.allow_client_sans))]))
    if route.access is not None:
        (shadow if route.access.shadow else enforced).update(access_policies(route.access))
    if not enforced and not shadow:
        return None
    config = rbac_filter_pb2.RBAC()
    if enforced:
        config.rules.CopyFrom(rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY, policies=enforced))
    if shadow:
        config.shadow_rules.CopyFrom(rbac_pb2.RBAC(action=rbac_pb2.RBAC.DENY, policies=shadow))
    return rbac_filter_pb2.RBACPerRoute(rbac=config)


# The shadow-only RBAC filter that counts requests without a client certificate on optional
# hosts (listeners.py builds it; routes.py switches it off on the 421 route).
CERTIFICATE_MISSING = "client_certificate_missing"
CERTIFICATE_MISSING_FILTER = f"xdsplane.{CERTIFICATE_MISSING}"


def disabled() -> Any:
    """An RBACPerRoute without ``rbac``: Envoy disables the filter on the route, whatever
    the HCM-level configuration says."""
    return rbac_filter_pb2.RBACPerRoute()


def filter_config() -> Any:
    """The HCM-level RBAC filter: no rules (allows all) until a route says otherwise."""
    return rbac_filter_pb2.RBAC()

"""What a policy change weakens: two access matrices compared (``diff --fail-on-weaken``).

Routes are compared as an attacker meets them, by the requests they take, not by name:
for every path the old or new routes of a host name (each match's own value, a path under
it, its bare form, its upper-case spelling), with and without the headers and with each
method a route asks for, the route Envoy picks (the first that matches) in the old policy is
compared with the one it picks in the new. So a route renamed while its check is dropped, a
route moved above a protected one, or a match widened over it, all show as the protected
path now reaching a route that asks less. Routes that keep their name are compared directly
too (a regex route, whose paths cannot be listed). Hosts are paired by the domains they
serve, listeners by name (else address).

A request that found no route before (404) and finds one now is a new route, not a
weakening; one that found a route and now finds none is refused, not weaker.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from xdsplane.policy.matrix import Jwt, Limit, RouteAccess, UpstreamTlsInfo
from xdsplane.policy.model import duration_seconds
from xdsplane.policy.reach import HostRoutes, probes
from xdsplane.policy.translate.authz import POLICY as CERTIFICATE_POLICY

_CERT_RANK = {"off": 0, "optional": 1, "required": 2}
_TLS_RANK = {"1.0": 0, "1.1": 1, "1.2": 2, "1.3": 3}


@dataclass(frozen=True, slots=True)
class Weakening:
    listener: str
    host: str
    route: str  # "" for the host or listener itself
    what: str
    request: str = ""  # the request that shows it, e.g. "GET /admin (now reaches route x)"

    def line(self) -> str:
        where = f"listener {self.listener}, host {self.host}"
        if self.route:
            where += f", route {self.route}"
        return f"{where}: {self.request + ': ' if self.request else ''}{self.what}"


def glob_covers(wide: str, narrow: str) -> bool:
    """Does every name ``narrow`` matches also match ``wide`` ('*' any run)? A sufficient
    test: ``narrow`` read literally matches ``wide``, each of its '*' inside one of wide's."""
    pattern = ".*".join(re.escape(p) for p in wide.split("*"))
    return re.fullmatch(pattern, narrow, flags=re.DOTALL) is not None


def _rate(limit: Limit) -> float:
    return limit.requests / duration_seconds(limit.per)


def _limit(label: str, old: Limit | None, new: Limit | None) -> list[str]:
    if old is None:
        return []
    if new is None:
        return [f"{label} removed (was {old.requests}/{old.per} by {old.by})"]
    if _rate(new) > _rate(old) * (1 + 1e-9):
        return [f"{label} loosened: {old.requests}/{old.per} -> {new.requests}/{new.per}"]
    return []


def _jwt(old: Jwt | None, new: Jwt | None) -> list[str]:
    if old is None:
        return []
    if new is None:
        return [f"JWT ({old.provider}) removed" + ("" if old.required else ", was optional")]
    out = []
    if old.required and not new.required:
        out.append(f"JWT made optional ({new.provider}): a request without a token passes")
    if new.issuer != old.issuer:
        out.append(f"JWT issuer changed: {old.issuer} -> {new.issuer}")
    wider = sorted(set(new.audiences) - set(old.audiences))
    if wider:
        out.append(f"JWT audiences widened: + {', '.join(wider)}")
    if old.max_lifetime is not None and (
        new.max_lifetime is None
        or duration_seconds(new.max_lifetime) > duration_seconds(old.max_lifetime)
    ):
        out.append(f"JWT max_lifetime raised: {old.max_lifetime} -> {new.max_lifetime or 'none'}")
    return out


def _sans(old: Sequence[str], new: Sequence[str]) -> list[str]:
    if not old:
        return []
    if not new:
        return ["SAN allow-list removed: any validated client certificate passes"]
    wider = [n for n in new if not any(glob_covers(o, n) for o in old)]
    return [f"SAN list widened: {', '.join(wider)}"] if wider else []


def _rbac(old: RouteAccess, new: RouteAccess) -> list[str]:
    o, n = old.rbac, new.rbac
    o_rules = [p for p in (o.enforced if o else ()) if p != CERTIFICATE_POLICY]
    if not o_rules:
        return []
    n_rules = [p for p in (n.enforced if n else ()) if p != CERTIFICATE_POLICY]
    if not n_rules:
        if n is not None and n.shadow:
            return ["access rules moved to shadow (logged, not enforced)"]
        return ["access rules removed"]
    assert o is not None and n is not None
    out = []
    if o.default == "deny" and n.default != "deny":
        out.append("access default turned to allow")
    out += [f"deny rule removed: {t}" for t in o.deny if t not in n.deny]
    if n.default == "deny":
        out += [f"allow rule added: {t}" for t in n.allow if t not in o.allow]
    return out


def _upstream_tls(old: UpstreamTlsInfo | None, new: UpstreamTlsInfo | None) -> list[str]:
    if old is None:
        return []
    if new is None:
        return ["upstream TLS removed: plaintext to the upstream"]
    out = []
    if old.mtls and not new.mtls:
        out.append("upstream mutual TLS removed (no client certificate)")
    if old.subject_alt_names and not new.subject_alt_names:
        out.append("upstream SAN pinning removed")
    elif set(new.subject_alt_names) - set(old.subject_alt_names):
        added = sorted(set(new.subject_alt_names) - set(old.subject_alt_names))
        out.append(f"upstream SANs widened: + {', '.join(added)}")
    if _TLS_RANK[new.min_version] < _TLS_RANK[old.min_version]:
        out.append(f"upstream min_version lowered: {old.min_version} -> {new.min_version}")
    if new.allow_legacy_tls and not old.allow_legacy_tls:
        out.append("upstream allow_legacy_tls turned on")
    return out


def compare_routes(old: RouteAccess, new: RouteAccess) -> list[str]:
    """What ``new`` asks less than ``old`` (of a request that reached ``old`` before)."""
    out = []
    if old.certificate_required and not new.certificate_required:
        by = "require_client_certificate removed" if old.require_client_certificate else ""
        out.append("client certificate no longer required" + (f" ({by})" if by else ""))
    # a SAN list checks presented certificates whether or not one is required
    out += _sans(old.client_sans, new.client_sans)
    out += _jwt(old.jwt, new.jwt)
    if old.introspection is not None and new.introspection is None:
        out.append(f"token introspection ({old.introspection}) removed")
    elif old.introspection is not None and new.introspection != old.introspection:
        out.append(f"introspection provider changed: {old.introspection} -> {new.introspection}")
    dropped = sorted(set(old.require_scopes) - set(new.require_scopes))
    if dropped and new.introspection is not None:
        out.append(f"required scopes removed: {', '.join(dropped)}")
    if old.replay_protection and not new.replay_protection:
        out.append("replay protection removed")
    elif old.revocation_check and not new.revocation_check:
        out.append("revocation check removed")
    if old.guard_fail_open is False and new.guard_fail_open:
        out.append("the guard now fails open (unreachable guard: requests pass)")
    out += _limit("local rate limit", old.rate_limit, new.rate_limit)
    out += _limit("global rate limit", old.global_rate_limit, new.global_rate_limit)
    out += _rbac(old, new)
    if old.direct_response is not None and old.direct_response >= 400 and new.upstream:
        out.append(f"now reaches upstream {new.upstream} (was refused: {old.direct_response})")
    if old.upstream is not None and new.upstream is not None:
        out += _upstream_tls(old.upstream_tls, new.upstream_tls)
    return out


def _host_changes(old: RouteAccess, new: RouteAccess) -> list[str]:
    out = []
    if _CERT_RANK[new.client_certificate] < _CERT_RANK[old.client_certificate]:
        out.append(
            f"client_certificate lowered: {old.client_certificate} -> {new.client_certificate}"
        )
    if old.tls is not None and new.tls is None:
        out.append("TLS removed: the host is served over plain HTTP")
    elif old.tls is not None and new.tls is not None:
        o_min, n_min = old.tls.split("-")[0], new.tls.split("-")[0]
        if _TLS_RANK[n_min] < _TLS_RANK[o_min]:
            out.append(f"min_version lowered: {o_min} -> {n_min}")
        if new.allow_legacy_tls and not old.allow_legacy_tls:
            out.append("allow_legacy_tls turned on")
    if old.path_parameters == "reject" and new.path_parameters == "allow":
        out.append("path_parameters: reject -> allow (';' paths reach the routes)")
    return out


def _protected(r: RouteAccess) -> bool:
    return bool(
        r.certificate_required
        or r.jwt
        or r.introspection
        or r.revocation_check
        or r.rate_limit
        or r.global_rate_limit
        or (r.rbac and r.rbac.enforced)
    )


def _fewer_spellings(old: RouteAccess, new: RouteAccess) -> list[str]:
    if not _protected(old) or old.match is None or new.match is None:
        return []
    out = []
    if not old.match.case_sensitive and new.match.case_sensitive:
        out.append(
            "case_sensitive: the route now matches its path only as written; other "
            "spellings (upper case) no longer get its checks"
        )
    o, n = old.match, new.match
    if o.kind == "path_prefix" and n.kind == "prefix" and n.value.rstrip("/") == o.value:
        out.append(f"the route no longer covers the bare path {old.match.value}")
    return out


def _host_routes(
    old_rows: Sequence[RouteAccess], new_rows: Sequence[RouteAccess]
) -> Iterable[tuple[RouteAccess, str, str]]:
    """(old route, request, finding) for one host pair."""
    by_name = {r.route: r for r in new_rows}
    for o in old_rows:
        n = by_name.get(o.route)
        if n is not None and n != o:
            for what in compare_routes(o, n) + _fewer_spellings(o, n):
                yield o, "", what
    methods = sorted(
        {"GET"} | {m for r in (*old_rows, *new_rows) if r.match for m in r.match.methods}
    )
    paths = sorted({p for r in (*old_rows, *new_rows) if r.match for p in probes(r.match)})
    old_index, new_index = HostRoutes(old_rows), HostRoutes(new_rows)
    for path in paths:
        for method in methods:
            for headers in (False, True):
                was = old_index.first(path, method, headers)
                now = new_index.first(path, method, headers)
                if was is None or now is None or was == now:
                    continue
                for what in compare_routes(was, now):
                    note = "" if now.route == was.route else f" (now reaches route {now.route})"
                    yield was, f"{method} {path}{note}", what


def _serving(rows_by_host: dict[str, list[RouteAccess]], domain: str) -> str | None:
    """The host that serves ``domain``: exact name, else the longest *.suffix, else '*'."""
    hosts = {d: h for h, rows in rows_by_host.items() for d in rows[0].domains}
    if domain in hosts:
        return hosts[domain]
    suffixes = [d for d in hosts if d.startswith("*.") and domain.endswith(d[1:])]
    if suffixes:
        return hosts[max(suffixes, key=len)]
    return hosts.get("*")


def _by(rows: Iterable[RouteAccess], key: str) -> dict[str, list[RouteAccess]]:
    out: dict[str, list[RouteAccess]] = {}
    for r in rows:
        out.setdefault(getattr(r, key), []).append(r)
    return out


def weakenings(old: Sequence[RouteAccess], new: Sequence[RouteAccess]) -> list[Weakening]:
    """Every way ``new`` lets a request through with less than ``old`` asked of it."""
    found: dict[tuple[str, str, str, str], Weakening] = {}

    def add(lst: str, host: str, route: str, what: str, request: str = "") -> None:
        """One finding per route and what: the first request that shows it."""
        found.setdefault((lst, host, route, what), Weakening(lst, host, route, what, request))

    old_l, new_l = _by(old, "listener"), _by(new, "listener")
    new_by_address = {rows[0].address: rows for rows in new_l.values()}
    for name, o_rows in old_l.items():
        n_rows = new_l.get(name) or new_by_address.get(o_rows[0].address)
        if not n_rows:
            continue
        if o_rows[0].redirect and not n_rows[0].redirect:
            if n_rows[0].tls is None:
                add(name, "*", "", "no longer redirects to HTTPS: plain HTTP requests reach routes")
            continue
        if n_rows[0].redirect:  # it serves no route now
            continue
        o_hosts, n_hosts = _by(o_rows, "host"), _by(n_rows, "host")
        seen: set[tuple[str, str]] = set()
        for host, rows in o_hosts.items():
            for domain in rows[0].domains:
                n_host = _serving(n_hosts, domain) if n_hosts else None
                if n_host is None or (host, n_host) in seen:
                    continue
                seen.add((host, n_host))
                if rows == n_hosts[n_host]:
                    continue
                for what in _host_changes(rows[0], n_hosts[n_host][0]):
                    add(name, host, "", what)
                for o, request, what in _host_routes(rows, n_hosts[n_host]):
                    add(name, host, o.route, what, request)
    return list(found.values())

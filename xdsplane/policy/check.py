"""Cross-references of a merged policy: what pydantic cannot see from one file alone."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from xdsplane.config.errors import ConfigError
from xdsplane.names import GUARD_CLUSTER, JWKS_CLUSTER_PREFIX
from xdsplane.policy.merge import GroupPolicy, Origin
from xdsplane.policy.model import Route, split_host_port

_ANY_HOSTS = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))


UseKey = tuple[int, tuple[str | int, ...]]


def use_key(origin: Origin) -> UseKey:
    """Identifies a definition across node groups: its document and its keys."""
    return (id(origin.doc), origin.keys)


@dataclass
class Usage:
    """Which secret and upstream definitions something refers to."""

    secrets: set[UseKey] = field(default_factory=set)
    upstreams: set[UseKey] = field(default_factory=set)
    jwt_providers: set[UseKey] = field(default_factory=set)


def _access_errors(
    route: Route, origin: Origin, keys: tuple[str | int, ...], host: str, asks_certs: bool
) -> list[ConfigError]:
    """What a route's ``access`` rules need from the route and its host."""
    assert route.access is not None
    errors = []
    has_jwt = route.jwt is not None or route.jwt_optional is not None
    for kind in ("allow", "deny"):
        for i, rule in enumerate(getattr(route.access, kind)):
            if rule.jwt_claims is not None and not has_jwt:
                errors.append(
                    ConfigError(
                        origin.key(*keys, kind, i, "jwt_claims"),
                        "jwt_claims: the route verifies no token (add jwt: or jwt_optional: "
                        "with a provider)",
                    )
                )
            if rule.client_sans is not None and not asks_certs:
                errors.append(
                    ConfigError(
                        origin.key(*keys, kind, i, "client_sans"),
                        f"client_sans: host {host!r} does not ask for client certificates "
                        "(set client_certificate: optional or required, and client_ca)",
                    )
                )
    return errors


class _Addresses:
    """Listener addresses seen so far, indexed by port and IP version, so that finding the
    ones a new address conflicts with (the same IP, or either is 0.0.0.0 / ::) costs the
    conflicts found, not the number of listeners: thousands of listeners check in
    milliseconds."""

    def __init__(self) -> None:
        self.count = 0
        # (port, IP version) -> IP -> [(order, listener name, origin)]
        self.by_ip: dict[tuple[int, int], dict[Any, list[tuple[int, str, Origin]]]] = {}

    def conflicts(self, name: str, origin: Origin, address: str) -> list[tuple[str, Origin]]:
        """The earlier listeners ``address`` conflicts with, in order; then remember it."""
        host, port = split_host_port(address)
        ip = ipaddress.ip_address(host)
        ips = self.by_ip.setdefault((port, ip.version), {})
        if ip in _ANY_HOSTS:
            found = [e for entries in ips.values() for e in entries]
        else:
            found = ips.get(ip, []) + [e for a in _ANY_HOSTS for e in ips.get(a, [])]
        self.count += 1
        ips.setdefault(ip, []).append((self.count, name, origin))
        return [(n, o) for _, n, o in sorted(found, key=lambda e: e[0])]


def check_policy(policy: GroupPolicy, scope: str = "") -> tuple[list[ConfigError], Usage]:
    """``scope`` names the node group when a folder has several: a file without ``nodes``
    is checked in each group, and a name it refers to may be missing in only some."""
    errors: list[ConfigError] = []
    usage = Usage()
    where = f" for nodes {scope}" if scope else ""

    def secret(name: str | None, kind: str, origin: Origin, *keys: str | int) -> None:
        if name is None:
            return
        part = policy.secrets.get(name)
        if part is None:
            known = ", ".join(sorted(policy.secrets)) or "none defined"
            errors.append(
                ConfigError(origin.at(*keys), f"no secret named {name!r}{where} (secrets: {known})")
            )
            return
        usage.secrets.add(use_key(part.origin))
        is_cert = part.value.is_certificate
        if kind == "certificate" and not is_cert:
            errors.append(
                ConfigError(
                    origin.at(*keys),
                    f"secret {name!r} is a CA bundle; a certificate with private_key is needed",
                )
            )
        if kind == "ca" and is_cert:
            errors.append(
                ConfigError(
                    origin.at(*keys),
                    f"secret {name!r} is a certificate; a CA bundle (ca:) is needed",
                )
            )

    addresses = _Addresses()
    no_lifetime: set[str] = set()  # providers already reported for lacking max_lifetime
    for lname, lpart in policy.listeners.items():
        listener, lo = lpart.value, lpart.origin
        conflicts = addresses.conflicts(lname, lo, listener.address)
        if conflicts:
            # One error per listener, naming the first it conflicts with: a thousand
            # listeners on 0.0.0.0:8080 are a thousand errors, not half a million.
            other, oo = conflicts[0]
            at = oo.at("address")
            more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            errors.append(
                ConfigError(
                    lo.at("address"),
                    f"listener {lname!r} address {listener.address} conflicts with listener "
                    f"{other!r} at {at.path}:{at.line}{more}",
                )
            )
        seen_hosts: dict[str, int] = {}
        seen_domains: dict[str, str] = {}
        for hi, h in enumerate(listener.hosts):
            hkeys: tuple[str | int, ...] = ("hosts", hi)
            if h.name in seen_hosts:
                errors.append(
                    ConfigError(
                        lo.at(*hkeys, "name"),
                        f"duplicate host name {h.name!r} in listener {lname!r}",
                    )
                )
            seen_hosts[h.name] = hi
            for di, d in enumerate(h.domains):
                key = d.lower()
                if key in seen_domains:
                    errors.append(
                        ConfigError(
                            lo.at(*hkeys, "domains", di),
                            f"domain {d!r} is already served by host {seen_domains[key]!r} "
                            f"of listener {lname!r}",
                        )
                    )
                seen_domains.setdefault(key, h.name)
            if listener.tls is not None:
                if h.certificate is None:
                    errors.append(
                        ConfigError(
                            lo.at(*hkeys),
                            f"host {h.name!r} is on TLS listener {lname!r}: it needs certificate",
                        )
                    )
                secret(h.certificate, "certificate", lo, *hkeys, "certificate")
                secret(h.client_ca, "ca", lo, *hkeys, "client_ca")
            else:
                for key in ("certificate", "client_ca"):
                    if getattr(h, key) is not None:
                        errors.append(
                            ConfigError(
                                lo.key(*hkeys, key),
                                f"{key}: listener {lname!r} has no tls, so its hosts take no "
                                "certificates (add tls: {} to the listener)",
                            )
                        )
                if h.client_certificate != "off":
                    errors.append(
                        ConfigError(
                            lo.key(*hkeys, "client_certificate"),
                            f"client_certificate: listener {lname!r} has no tls",
                        )
                    )
            route_names: set[str] = set()
            for ri, r in enumerate(h.routes):
                rname = r.name or f"route-{ri}"
                if rname in route_names:
                    errors.append(
                        ConfigError(
                            lo.at(*hkeys, "routes", ri),
                            f"duplicate route name {rname!r} in host {h.name!r}",
                        )
                    )
                route_names.add(rname)
                wants_cert = r.require_client_certificate or r.allow_client_sans
                if wants_cert and (listener.tls is None or h.client_certificate == "off"):
                    key = (
                        "allow_client_sans" if r.allow_client_sans else "require_client_certificate"
                    )
                    errors.append(
                        ConfigError(
                            lo.key(*hkeys, "routes", ri, key),
                            f"{key}: host {h.name!r} does not ask for client certificates "
                            "(set client_certificate: optional or required, and client_ca)",
                        )
                    )
                if r.access is not None:
                    errors.extend(
                        _access_errors(
                            r,
                            lo,
                            (*hkeys, "routes", ri, "access"),
                            h.name,
                            listener.tls is not None and h.client_certificate != "off",
                        )
                    )
                for key in ("jwt", "jwt_optional"):
                    provider = getattr(r, key)
                    if provider is None:
                        continue
                    ppart = policy.jwt_providers.get(provider)
                    if ppart is None:
                        known = ", ".join(sorted(policy.jwt_providers)) or "none defined"
                        errors.append(
                            ConfigError(
                                lo.at(*hkeys, "routes", ri, key),
                                f"no jwt provider named {provider!r}{where} "
                                f"(jwt_providers: {known})",
                            )
                        )
                    else:
                        usage.jwt_providers.add(use_key(ppart.origin))
                if r.replay_protection and r.jwt is None:
                    errors.append(
                        ConfigError(
                            lo.key(*hkeys, "routes", ri, "replay_protection"),
                            "replay_protection needs jwt: on the route (the guard reads the "
                            "verified token's jti)",
                        )
                    )
                if r.replay_protection and r.jwt is not None:
                    ppart = policy.jwt_providers.get(r.jwt)
                    if (
                        ppart is not None
                        and ppart.value.max_lifetime is None
                        and r.jwt not in no_lifetime
                    ):
                        no_lifetime.add(r.jwt)
                        at = lo.key(*hkeys, "routes", ri, "replay_protection")
                        errors.append(
                            ConfigError(
                                ppart.origin.key(),
                                f"jwt provider {r.jwt!r} needs max_lifetime: route "
                                f"{lname}/{h.name}/{rname} ({at.path}:{at.line}) has "
                                "replay_protection (the guard remembers a token until its "
                                "exp; without max_lifetime a token may live for ever)",
                            )
                        )
                if r.replay_protection and policy.guard is None:
                    errors.append(
                        ConfigError(
                            lo.key(*hkeys, "routes", ri, "replay_protection"),
                            f"replay_protection needs a guard{where} "
                            "(add guard: {address: HOST:PORT} at the top level)",
                        )
                    )
                if r.global_rate_limit is not None and policy.guard is None:
                    errors.append(
                        ConfigError(
                            lo.key(*hkeys, "routes", ri, "global_rate_limit"),
                            f"global_rate_limit needs a guard{where} "
                            "(add guard: {address: HOST:PORT} at the top level)",
                        )
                    )
                for key in ("rate_limit", "global_rate_limit"):
                    limit = getattr(r, key)
                    if limit is None:
                        continue
                    if limit.by == "jwt_sub" and r.jwt is None and r.jwt_optional is None:
                        errors.append(
                            ConfigError(
                                lo.at(*hkeys, "routes", ri, key, "by"),
                                f"{key} by jwt_sub needs jwt: (or jwt_optional:) on the route",
                            )
                        )
                    no_certs = listener.tls is None or h.client_certificate == "off"
                    if limit.by == "client_certificate" and no_certs:
                        errors.append(
                            ConfigError(
                                lo.at(*hkeys, "routes", ri, key, "by"),
                                f"{key} by client_certificate: host {h.name!r} does not ask "
                                "for client certificates (set client_certificate: optional or "
                                "required, and client_ca)",
                            )
                        )
                if r.upstream is not None:
                    part = policy.upstreams.get(r.upstream)
                    if part is None:
                        known = ", ".join(sorted(policy.upstreams)) or "none defined"
                        errors.append(
                            ConfigError(
                                lo.at(*hkeys, "routes", ri, "upstream"),
                                f"no upstream named {r.upstream!r}{where} (upstreams: {known})",
                            )
                        )
                    else:
                        usage.upstreams.add(use_key(part.origin))

    if policy.guard is not None and policy.guard.value.tls is not None:
        gtls, go = policy.guard.value.tls, policy.guard.origin
        secret(gtls.ca, "ca", go, "tls", "ca")
        secret(gtls.certificate, "certificate", go, "tls", "certificate")
        if gtls.certificate is None:
            errors.append(
                ConfigError(
                    go.key("tls"),
                    "guard.tls needs certificate: the guard serves only callers with a client "
                    "certificate (xdsplane certs init writes guard-client.crt/.key)",
                )
            )
    if policy.guard is not None and GUARD_CLUSTER in policy.upstreams:
        errors.append(
            ConfigError(
                policy.upstreams[GUARD_CLUSTER].origin.key(),
                f"upstream name {GUARD_CLUSTER!r} is taken by the guard's cluster",
            )
        )
    for name, ppart in policy.jwt_providers.items():
        if ppart.value.jwks_uri is None:
            continue
        secret(ppart.value.ca, "ca", ppart.origin, "ca")
        cluster = JWKS_CLUSTER_PREFIX + name
        if cluster in policy.upstreams:
            at = policy.upstreams[cluster].origin.key()
            errors.append(
                ConfigError(
                    ppart.origin.at("jwks_uri"),
                    f"jwt provider {name!r} fetches its jwks_uri through cluster {cluster!r}, "
                    f"but upstream {cluster!r} ({at.path}:{at.line}) has that name",
                )
            )
    for name, upart in policy.upstreams.items():
        tls = upart.value.tls
        if tls is not None:
            secret(tls.ca, "ca", upart.origin, "tls", "ca")
            secret(tls.certificate, "certificate", upart.origin, "tls", "certificate")
        del name
    return errors, usage

"""The checks of one host of a listener and its routes, recorded to be kept.

A host's checks read the host, its listener's name and whether the listener has TLS, and
some entries of the group's tables (secrets, upstreams, JWT and introspection providers,
the guard). What they find is recorded with places relative to the host (``Rel``), so a
result stays right where the host moved in its file, with the names each looked up: what
``check_cache.py`` needs to keep the results from one check to the next and find
those an edit makes stale. ``check.py`` puts the results together in the order of a full
check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from xdsplane.config.errors import ConfigError, Location
from xdsplane.policy.merge import GroupPolicy, Origin
from xdsplane.policy.model import Host, Listener, Route

# The tables a host's checks look names up in.
TABLES = ("secrets", "upstreams", "jwt_providers", "introspection_providers")


@dataclass(frozen=True, slots=True)
class Rel:
    """A place relative to a host: ``key`` (the key's line) or the value's."""

    key: bool
    keys: tuple[str | int, ...]

    def locate(self, origin: Origin, hkeys: tuple[str | int, ...]) -> Location:
        """The place in the file, the host being at ``hkeys`` under ``origin``."""
        if self.key:
            return origin.key(*hkeys, *self.keys)
        return origin.at(*hkeys, *self.keys)


@dataclass(frozen=True, slots=True)
class Replay:
    """A replay-protected route whose JWT provider may lack ``max_lifetime``: reported
    once per provider over the group, so decided when the results are put together."""

    provider: str
    where: Rel  # the route's replay_protection
    route: str  # lname/host/route


@dataclass(slots=True)
class HostResult:
    """What one host's checks found, in order, and what they read of the group."""

    items: list[tuple[Rel, str] | Replay] = field(default_factory=list)
    refs: dict[str, set[str]] = field(default_factory=lambda: {t: set() for t in TABLES})
    found: dict[str, set[str]] = field(default_factory=lambda: {t: set() for t in TABLES})
    # tables whose list of names an error quotes ("upstreams: a, b")
    lists: set[str] = field(default_factory=set)
    guard: bool = False  # read the guard (whether there is one, fail_open, its place)
    live: bool = True  # False once dropped from the cache (``HostChecks._forget``)


class _Host:
    """A host's place for the checks: ``at``/``key`` give places relative to it."""

    def at(self, *keys: str | int) -> Rel:
        return Rel(False, keys)

    def key(self, *keys: str | int) -> Rel:
        return Rel(True, keys)


HOST_PLACE = _Host()


@dataclass(frozen=True, slots=True)
class _At:
    """A route's place: its listener, its host, and the keys that lead to it from the host."""

    lname: str
    listener: Listener
    host: Host
    keys: tuple[str | int, ...]

    @property
    def asks_certs(self) -> bool:
        """Does the route's host ask for client certificates?"""
        return self.listener.tls is not None and self.host.client_certificate != "off"

    def at(self, *keys: str | int) -> Rel:
        return Rel(False, (*self.keys, *keys))

    def key(self, *keys: str | int) -> Rel:
        return Rel(True, (*self.keys, *keys))


class HostCheck:
    """One host's checks (what ``check.py`` did inline before, message for message)."""

    def __init__(self, policy: GroupPolicy, where: str) -> None:
        self.policy = policy
        self.where = where
        self.out = HostResult()

    def error(self, place: Rel, message: str) -> None:
        self.out.items.append((place, message))

    def get(self, table: str, name: str) -> Any:
        """The part named ``name`` in ``table``, or None; remembered as read."""
        self.out.refs[table].add(name)
        part = getattr(self.policy, table).get(name)
        if part is not None:
            self.out.found[table].add(name)
        return part

    def known(self, table: str) -> str:
        """The names of ``table``, as an error about a missing one quotes them."""
        self.out.lists.add(table)
        return ", ".join(sorted(getattr(self.policy, table))) or "none defined"

    def guard(self) -> Any:
        self.out.guard = True
        return self.policy.guard

    def secret(self, name: str | None, kind: str, place: Rel) -> None:
        """``name`` must be a secret of the group, of ``kind`` certificate or ca."""
        if name is None:
            return
        part = self.get("secrets", name)
        if part is None:
            known = self.known("secrets")
            self.error(place, f"no secret named {name!r}{self.where} (secrets: {known})")
            return
        is_cert = part.value.is_certificate
        if kind == "certificate" and not is_cert:
            self.error(
                place, f"secret {name!r} is a CA bundle; a certificate with private_key is needed"
            )
        if kind == "ca" and is_cert:
            self.error(place, f"secret {name!r} is a certificate; a CA bundle (ca:) is needed")

    def host(self, lname: str, listener: Listener, h: Host) -> HostResult:
        self.host_tls(lname, listener, h)
        route_names: set[str] = set()
        for ri, r in enumerate(h.routes):
            rname = r.name or f"route-{ri}"
            if rname in route_names:
                self.error(
                    HOST_PLACE.at("routes", ri),
                    f"duplicate route name {rname!r} in host {h.name!r}",
                )
            route_names.add(rname)
            self.route(_At(lname, listener, h, ("routes", ri)), r, rname)
        return self.out

    def host_tls(self, lname: str, listener: Listener, h: Host) -> None:
        """A host of a TLS listener needs a certificate; one of a plain listener takes none."""
        if listener.tls is not None:
            if h.certificate is None:
                self.error(
                    HOST_PLACE.at(),
                    f"host {h.name!r} is on TLS listener {lname!r}: it needs certificate",
                )
            self.secret(h.certificate, "certificate", HOST_PLACE.at("certificate"))
            self.secret(h.client_ca, "ca", HOST_PLACE.at("client_ca"))
            part = self.get("secrets", h.certificate or "")
            if (
                h.ocsp == "must_staple"
                and part is not None
                and part.value.is_certificate
                and part.value.ocsp_staple is None
            ):
                self.error(
                    HOST_PLACE.at("ocsp"),
                    f"ocsp: must_staple, but secret {h.certificate!r} has no ocsp_staple "
                    "(Envoy would refuse the listener)",
                )
            return
        for key in ("certificate", "client_ca", "ocsp"):
            if getattr(h, key) is not None:
                self.error(
                    HOST_PLACE.key(key),
                    f"{key}: listener {lname!r} has no tls, so its hosts take no "
                    "certificates (add tls: {} to the listener)",
                )
        if h.client_certificate != "off":
            self.error(
                HOST_PLACE.key("client_certificate"),
                f"client_certificate: listener {lname!r} has no tls",
            )

    def route(self, at: _At, r: Route, rname: str) -> None:
        self.route_certificates(at, r)
        self.route_jwt(at, r, rname)
        self.route_limits(at, r)
        if r.upstream is not None:
            part = self.get("upstreams", r.upstream)
            if part is None:
                known = self.known("upstreams")
                self.error(
                    at.at("upstream"),
                    f"no upstream named {r.upstream!r}{self.where} (upstreams: {known})",
                )
            elif part.value.lb == "ring_hash":
                self.error(
                    at.at("upstream"),
                    f"upstream {r.upstream!r} balances by ring_hash, which needs a hash "
                    "policy that Envoy routes here cannot give (it would act as random): "
                    "ring_hash is for gRPC services (hash:)",
                )

    def route_certificates(self, at: _At, r: Route) -> None:
        """What a route asks of client certificates, its host must ask for."""
        wants_cert = r.require_client_certificate or r.allow_client_sans
        if wants_cert and not at.asks_certs:
            key = "allow_client_sans" if r.allow_client_sans else "require_client_certificate"
            self.error(
                at.key(key),
                f"{key}: host {at.host.name!r} does not ask for client certificates "
                "(set client_certificate: optional or required, and client_ca)",
            )
        if r.access is not None:
            self.access(at, r)

    def access(self, at: _At, r: Route) -> None:
        """What a route's ``access`` rules need from the route and its host."""
        assert r.access is not None
        has_jwt = r.jwt is not None or r.jwt_optional is not None
        for kind in ("allow", "deny"):
            for i, rule in enumerate(getattr(r.access, kind)):
                if rule.jwt_claims is not None and not has_jwt:
                    also = (
                        "; an introspected token's claims are not seen by access rules, which "
                        "run before the guard: use require_scopes"
                        if r.introspection is not None
                        else ""
                    )
                    self.error(
                        at.key("access", kind, i, "jwt_claims"),
                        "jwt_claims: the route verifies no token (add jwt: or jwt_optional: "
                        f"with a provider){also}",
                    )
                if rule.client_sans is not None and not at.asks_certs:
                    self.error(
                        at.key("access", kind, i, "client_sans"),
                        f"client_sans: host {at.host.name!r} does not ask for client "
                        "certificates (set client_certificate: optional or required, and "
                        "client_ca)",
                    )

    def route_jwt(self, at: _At, r: Route, rname: str) -> None:
        """The providers a route names exist; replay protection has a token and a guard."""
        for key in ("jwt", "jwt_optional"):
            provider = getattr(r, key)
            if provider is None:
                continue
            if self.get("jwt_providers", provider) is None:
                known = self.known("jwt_providers")
                self.error(
                    at.at(key),
                    f"no jwt provider named {provider!r}{self.where} (jwt_providers: {known})",
                )
        self.route_introspection(at, r)
        if r.revocation_check and self.guard() is None:
            self.error(
                at.key("revocation_check"),
                f"revocation_check needs a guard{self.where} "
                "(add guard: {address: HOST:PORT} at the top level)",
            )
        if not r.replay_protection:
            return
        if r.jwt is None:
            self.error(
                at.key("replay_protection"),
                "replay_protection needs jwt: on the route (the guard reads the "
                "verified token's jti)",
            )
        else:
            # Whether the provider lacks max_lifetime, and was not reported yet, is decided
            # when the results are put together (check.py): the provider is looked up then.
            self.out.items.append(
                Replay(r.jwt, at.key("replay_protection"), f"{at.lname}/{at.host.name}/{rname}")
            )
        if self.guard() is None:
            self.error(
                at.key("replay_protection"),
                f"replay_protection needs a guard{self.where} "
                "(add guard: {address: HOST:PORT} at the top level)",
            )

    def route_introspection(self, at: _At, r: Route) -> None:
        """The provider exists and a guard asks it, in time for Envoy."""
        if r.introspection is None:
            return
        if self.get("introspection_providers", r.introspection) is None:
            known = self.known("introspection_providers")
            self.error(
                at.at("introspection"),
                f"no introspection provider named {r.introspection!r}{self.where} "
                f"(introspection_providers: {known})",
            )
        guard = self.guard()
        if guard is None:
            self.error(
                at.key("introspection"),
                f"introspection needs a guard{self.where} (the guard asks the endpoint; add "
                "guard: {address: HOST:PORT} at the top level)",
            )
        elif guard.value.transport == "http":
            where = guard.origin.at("transport")
            self.error(
                at.key("introspection"),
                f"introspection needs guard.transport: grpc{self.where} ({where.path}:"
                f"{where.line}): the guard's HTTP front does not serve introspection (it "
                "reads the bearer token and sets the upstream's claim headers, built over "
                "gRPC only); use transport: grpc (the default) in a policy with "
                "introspection routes",
            )
        elif guard.value.fail_open:
            where = guard.origin.at("fail_open")
            self.error(
                at.key("introspection"),
                f"introspection needs guard.fail_open: false{self.where} ({where.path}:"
                f"{where.line}): with fail_open an unreachable guard would let requests "
                "through without their token being checked",
            )

    def route_limits(self, at: _At, r: Route) -> None:
        """A global limit needs the guard; a limit by identity needs that identity."""
        if r.global_rate_limit is not None and self.guard() is None:
            self.error(
                at.key("global_rate_limit"),
                f"global_rate_limit needs a guard{self.where} "
                "(add guard: {address: HOST:PORT} at the top level)",
            )
        for key in ("rate_limit", "global_rate_limit"):
            limit = getattr(r, key)
            if limit is None:
                continue
            if limit.by == "jwt_sub" and r.jwt is None and r.jwt_optional is None:
                self.error(
                    at.at(key, "by"),
                    f"{key} by jwt_sub needs jwt: (or jwt_optional:) on the route",
                )
            if limit.by == "client_certificate" and not at.asks_certs:
                self.error(
                    at.at(key, "by"),
                    f"{key} by client_certificate: host {at.host.name!r} does not ask "
                    "for client certificates (set client_certificate: optional or "
                    "required, and client_ca)",
                )


HostKey = tuple[str, str, bool]  # the host's JSON, its listener's name, listener has TLS

# One host of a listener: what the listener's own checks found at it (a duplicate name, a
# domain already served), relative to the host, and the host's own result.
Segment = tuple[list[tuple[Rel, str]], HostResult]


def no_lifetime(
    policy: GroupPolicy, item: Replay, origin: Origin, hkeys: tuple[str | int, ...]
) -> ConfigError:
    """The error for a replay-protected route whose provider lacks max_lifetime."""
    ppart = policy.jwt_providers[item.provider]
    where = item.where.locate(origin, hkeys)
    return ConfigError(
        ppart.origin.key(),
        f"jwt provider {item.provider!r} needs max_lifetime: route "
        f"{item.route} ({where.path}:{where.line}) has "
        "replay_protection (the guard remembers a token until its "
        "exp; without max_lifetime a token may live for ever)",
    )

"""Cross-references of a merged policy: what pydantic cannot see from one file alone."""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from xdsplane.config.errors import ConfigError, Location
from xdsplane.loopback import is_loopback
from xdsplane.names import GUARD_CLUSTER, JWKS_CLUSTER_PREFIX, OTLP_CLUSTER, grpc_server_listener
from xdsplane.policy.check_cache import Checked, HostChecks, host_segments
from xdsplane.policy.check_hosts import Replay, no_lifetime
from xdsplane.policy.grpc_check import check_grpc
from xdsplane.policy.merge import GroupPolicy, Origin, Part, UseKey
from xdsplane.policy.model import Listener, split_host_port

_ANY_HOSTS = (ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::"))


def use_key(origin: Origin) -> UseKey:
    """Identifies a definition across node groups: its document and its keys."""
    return (id(origin.doc), origin.keys)


@dataclass
class Usage:
    """Which secret and upstream definitions something refers to."""

    secrets: set[UseKey] = field(default_factory=set)
    upstreams: set[UseKey] = field(default_factory=set)
    jwt_providers: set[UseKey] = field(default_factory=set)
    introspection_providers: set[UseKey] = field(default_factory=set)


@functools.lru_cache(maxsize=4096)
def _ip_port(address: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """A listener's address, parsed once (every check goes over every listener)."""
    host, port = split_host_port(address)
    return ipaddress.ip_address(host), port


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
        ip, port = _ip_port(address)
        ips = self.by_ip.setdefault((port, ip.version), {})
        if ip in _ANY_HOSTS:
            found = [e for entries in ips.values() for e in entries]
        else:
            found = ips.get(ip, []) + [e for a in _ANY_HOSTS for e in ips.get(a, [])]
        self.count += 1
        ips.setdefault(ip, []).append((self.count, name, origin))
        return [(n, o) for _, n, o in sorted(found, key=lambda e: e[0])]


def check_policy(
    policy: GroupPolicy, scope: str = "", hosts: HostChecks | None = None
) -> tuple[list[ConfigError], Usage]:
    """``scope`` names the node group when a folder has several: a file without ``nodes``
    is checked in each group, and a name it refers to may be missing in only some.

    ``hosts``, kept by the caller from one check of the group to the next, lets the checks
    of hosts and routes that did not change, nor what they refer to, be reused: the errors
    are the same, in the same order, as a check without it."""
    where = f" for nodes {scope}" if scope else ""
    if hosts is not None:
        hosts.invalidate(policy, where)
    check = _Checker(policy, where, hosts)
    for lname, lpart in policy.listeners.items():
        check.listener(lname, lpart)
    check.listeners_used()
    if hosts is not None:
        hosts.sweep()
    check.guard()
    check.otlp()
    check.jwt_providers()
    check.introspection_providers()
    check.grpc_services()
    check.upstreams()
    check.grpc_servers()
    return check.errors, check.usage


class _Checker:
    """One group's checks; errors come in the order of the policy (listener by listener,
    host by host, route by route), then the guard, the JWT providers, the upstreams."""

    def __init__(self, policy: GroupPolicy, where: str, hosts: HostChecks | None = None) -> None:
        self.policy = policy
        self.where = where
        self.hosts = hosts
        self.found: list[dict[str, set[str]]] = []  # per listener: table -> names found
        self.errors: list[ConfigError] = []
        self.usage = Usage()
        self.addresses = _Addresses()
        # providers already reported for lacking max_lifetime
        self.no_lifetime: set[str] = set()
        self.grpc_used: set[str] = set()  # upstreams gRPC services use (checked there)

    def error(self, location: Location, message: str) -> None:
        self.errors.append(ConfigError(location, message))

    def secret(self, name: str | None, kind: str, origin: Origin, *keys: str | int) -> None:
        """``name`` must be a secret of the group, of ``kind`` certificate or ca."""
        if name is None:
            return
        part = self.policy.secrets.get(name)
        if part is None:
            known = ", ".join(sorted(self.policy.secrets)) or "none defined"
            self.error(origin.at(*keys), f"no secret named {name!r}{self.where} (secrets: {known})")
            return
        self.usage.secrets.add(use_key(part.origin))
        is_cert = part.value.is_certificate
        if kind == "certificate" and not is_cert:
            self.error(
                origin.at(*keys),
                f"secret {name!r} is a CA bundle; a certificate with private_key is needed",
            )
        if kind == "ca" and is_cert:
            self.error(
                origin.at(*keys), f"secret {name!r} is a certificate; a CA bundle (ca:) is needed"
            )

    # -- listeners, hosts, routes ----------------------------------------------------------

    def listener(self, lname: str, lpart: Part[Listener]) -> None:
        listener, lo = lpart.value, lpart.origin
        conflicts = self.addresses.conflicts(lname, lo, listener.address)
        if conflicts:
            # One error per listener, naming the first it conflicts with: a thousand
            # listeners on 0.0.0.0:8080 are a thousand errors, not half a million.
            other, oo = conflicts[0]
            at = oo.at("address")
            more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
            self.error(
                lo.at("address"),
                f"listener {lname!r} address {listener.address} conflicts with listener "
                f"{other!r} at {at.path}:{at.line}{more}",
            )
        if self.hosts is not None:
            checked = self.hosts.listener(self.policy, lname, listener)
        else:
            checked = Checked.of(host_segments(self.policy, self.where, lname, listener, None))
        self.found.append(checked.found)
        if checked.quiet:
            return  # (nothing to report at any host: no walk over them)
        for hi, (local, result) in enumerate(checked.segments):
            hkeys: tuple[str | int, ...] = ("hosts", hi)
            for place, message in local:
                self.error(place.locate(lo, hkeys), message)
            for item in result.items:
                if isinstance(item, Replay):
                    ppart = self.policy.jwt_providers.get(item.provider)
                    if (
                        ppart is not None
                        and ppart.value.max_lifetime is None
                        and item.provider not in self.no_lifetime
                    ):
                        self.no_lifetime.add(item.provider)
                        self.errors.append(no_lifetime(self.policy, item, lo, hkeys))
                else:
                    self.error(item[0].locate(lo, hkeys), item[1])

    def listeners_used(self) -> None:
        """What the listeners' hosts and routes use, by the names their checks found."""
        for table, used in (
            ("secrets", self.usage.secrets),
            ("upstreams", self.usage.upstreams),
            ("jwt_providers", self.usage.jwt_providers),
            ("introspection_providers", self.usage.introspection_providers),
        ):
            names: set[str] = set().union(*(found[table] for found in self.found))
            if not names:
                continue
            parts = getattr(self.policy, table)
            if self.hosts is not None:
                used |= self.hosts.tables.use_keys(table, names, parts)
            else:
                used.update((id(parts[n].origin.doc), parts[n].origin.keys) for n in names)

    # -- the rest of the group -------------------------------------------------------------

    def guard(self) -> None:
        guard = self.policy.guard
        if guard is not None and guard.value.tls is not None:
            gtls, go = guard.value.tls, guard.origin
            self.secret(gtls.ca, "ca", go, "tls", "ca")
            self.secret(gtls.certificate, "certificate", go, "tls", "certificate")
            if gtls.certificate is None:
                self.error(
                    go.key("tls"),
                    "guard.tls needs certificate: the guard serves only callers with a client "
                    "certificate (xdsplane certs init writes guard-client.crt/.key)",
                )
        if guard is not None and GUARD_CLUSTER in self.policy.upstreams:
            self.error(
                self.policy.upstreams[GUARD_CLUSTER].origin.key(),
                f"upstream name {GUARD_CLUSTER!r} is taken by the guard's cluster",
            )

    def otlp(self) -> None:
        """TLS secrets exist; plaintext only to a loopback collector: the records carry
        who called (client SANs, JWT sub), which must not leave the host in clear."""
        log = self.policy.access_log
        if log is None or log.value.otlp is None:
            return
        otlp, lo = log.value.otlp, log.origin
        if otlp.tls is not None:
            self.secret(otlp.tls.ca, "ca", lo, "otlp", "tls", "ca")
            self.secret(otlp.tls.certificate, "certificate", lo, "otlp", "tls", "certificate")
        else:
            host, _ = split_host_port(otlp.address)
            if not is_loopback(host):
                self.error(
                    lo.at("otlp", "address"),
                    f"access_log.otlp sends to {otlp.address} without TLS: the records "
                    "carry client identities (certificate SANs, JWT sub) and must not leave "
                    "this host in plaintext; add otlp.tls (ca, sni, subject_alt_names) or "
                    "use a collector on 127.0.0.1",
                )
        if OTLP_CLUSTER in self.policy.upstreams:
            self.error(
                self.policy.upstreams[OTLP_CLUSTER].origin.key(),
                f"upstream name {OTLP_CLUSTER!r} is taken by the OTLP collector's cluster",
            )

    def jwt_providers(self) -> None:
        for name, ppart in self.policy.jwt_providers.items():
            if ppart.value.jwks_uri is None:
                continue
            self.secret(ppart.value.ca, "ca", ppart.origin, "ca")
            cluster = JWKS_CLUSTER_PREFIX + name
            if cluster in self.policy.upstreams:
                at = self.policy.upstreams[cluster].origin.key()
                self.error(
                    ppart.origin.at("jwks_uri"),
                    f"jwt provider {name!r} fetches its jwks_uri through cluster {cluster!r}, "
                    f"but upstream {cluster!r} ({at.path}:{at.line}) has that name",
                )

    def introspection_providers(self) -> None:
        for ppart in self.policy.introspection_providers.values():
            self.secret(ppart.value.ca, "ca", ppart.origin, "ca")

    def grpc_servers(self) -> None:
        """The secrets of each gRPC server (certificate providers for gRPC: no OCSP staple,
        no CRL), one server per address, and no Envoy listener in the same node group."""
        addresses: dict[str, str] = {}
        for name, part in self.policy.grpc_servers.items():
            spec, origin = part.value, part.origin
            if spec.address in addresses:
                self.error(
                    origin.at("address"),
                    f"gRPC server {name!r} has the address of gRPC server "
                    f"{addresses[spec.address]!r}: both would be the Listener "
                    f"{grpc_server_listener(spec.address)!r}",
                )
            addresses.setdefault(spec.address, name)
            self.secret(spec.certificate, "certificate", origin, "certificate")
            self.secret(spec.client_ca, "ca", origin, "client_ca")
            cert = self.policy.secrets.get(spec.certificate)
            if cert is not None and cert.value.ocsp_staple is not None:
                self.error(
                    origin.at("certificate"),
                    f"secret {spec.certificate!r} has ocsp_staple: gRPC servers do not staple "
                    "OCSP responses (use a secret without it)",
                )
            ca = self.policy.secrets.get(spec.client_ca or "")
            if ca is not None and ca.value.crl is not None:
                self.error(
                    origin.at("client_ca"),
                    f"secret {spec.client_ca!r} has a crl: gRPC's file_watcher certificate "
                    "provider reads no CRL, so a revoked client certificate would pass (use "
                    "a CA secret without crl)",
                )
            if self.policy.listeners:
                other = next(iter(self.policy.listeners.values())).origin.at()
                self.error(
                    origin.key(),
                    f"gRPC server {name!r} is in a node group with Envoy listeners (first at "
                    f"{other.path}:{other.line}){self.where}: Envoys would be sent its "
                    "Listener and bind its address; give the files different nodes:",
                )

    def grpc_services(self) -> None:
        if not self.policy.grpc_services:
            return
        envoy = {
            n for n, p in self.policy.upstreams.items() if use_key(p.origin) in self.usage.upstreams
        }
        errors, used = check_grpc(self.policy, self.where, envoy, self.secret)
        self.errors += errors
        self.grpc_used = used
        for name in used:
            self.usage.upstreams.add(use_key(self.policy.upstreams[name].origin))

    def upstreams(self) -> None:
        """Each upstream's own checks; kept (check_tables.py) while what they read is the
        very same: the upstreams, the secrets, which upstreams gRPC uses, the scope."""
        memo = self.hosts.tables if self.hosts is not None else None
        if memo is not None:
            kept = memo.upstreams(self.policy, self.where, self.grpc_used)
            if kept is not None:
                self.errors += kept[0]
                self.usage.secrets |= kept[1]
                return
        start, outer = len(self.errors), self.usage.secrets
        mine: set[UseKey] = set()  # the secrets these checks use, to keep
        self.usage.secrets = mine
        try:
            self._each_upstream()
        finally:
            outer |= mine
            self.usage.secrets = outer
        if memo is not None:
            memo.keep_upstreams(self.policy, self.where, self.grpc_used, self.errors[start:], mine)

    def _each_upstream(self) -> None:
        for name, upart in self.policy.upstreams.items():
            seen: dict[tuple[str, str, str], int] = {}
            for j, loc in enumerate(upart.value.localities or ()):
                if loc.key() in seen:
                    self.error(
                        upart.origin.at("localities", j),
                        f"upstream {name!r}: locality {loc.label()} is given twice (first as "
                        f"localities[{seen[loc.key()]}]): merge their endpoints",
                    )
                seen.setdefault(loc.key(), j)
            tls = upart.value.tls
            if tls is not None and name not in self.grpc_used:
                self.secret(tls.ca, "ca", upart.origin, "tls", "ca")
                self.secret(tls.certificate, "certificate", upart.origin, "tls", "certificate")

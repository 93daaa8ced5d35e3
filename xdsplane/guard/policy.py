"""Rate limits from a policy folder (``xdsplane guard --policy DIR``).

Every route with ``global_rate_limit: {requests, per, by}`` becomes a rule in the domain
``xdsplane``: key ``route`` with the route's id as value (``<listener>/<host>/<route>``),
then the identity's key without a value (one counter per identity), limited to ``requests``
per second, minute or hour. That is the descriptor Envoy sends for the route (see
``xdsplane.policy.translate.ratelimit``), so the guard and every Envoy read the same files.

The folder goes through the control plane's own pipeline (``xdsplane.pipeline.load_policy``:
every file, each node group merged and checked; secret files are not read): its errors
name ``path:line:column``, word for word as ``validate`` says them. The same
route id in two node groups must carry the same limit.
"""

from __future__ import annotations

from pathlib import Path

from xdsplane.config.errors import ConfigError, ConfigErrors, Location
from xdsplane.guard.introspect import IntrospectionSpec, check_ca, read_secret
from xdsplane.guard.limits import GuardLimits, Limit, Rule
from xdsplane.names import RATE_LIMIT_DOMAIN as DOMAIN
from xdsplane.names import RATE_LIMIT_KEYS as KEYS
from xdsplane.names import ROUTE_KEY, route_id
from xdsplane.pipeline import load_policy
from xdsplane.policy.merge import GroupPolicy, Part
from xdsplane.policy.model import IntrospectionProvider, duration_seconds


def limits_from_policy(folder: Path) -> GuardLimits:
    """The global rate limits of the policy in ``folder``; raises ConfigErrors."""
    # FileBusy (a file still being written) reaches the caller: reload.py retries it.
    groups, errors = load_policy(folder)
    rules: dict[tuple[str, str | None], Rule] = {}
    lifetimes: list[float] = []
    skews: list[float] = []
    seen: dict[str, tuple[tuple[int, str, str], Location]] = {}
    introspection: dict[str, tuple[IntrospectionSpec, Location]] = {}
    for group in groups:
        policy = group.policy
        for name, ipart in sorted(policy.introspection_providers.items()):
            ispec = _introspection_spec(name, ipart, policy, errors)
            if ispec is None:
                continue
            where = ipart.origin.key()
            if name in introspection and introspection[name][0] != ispec:
                at = introspection[name][1]
                errors.append(
                    ConfigError(
                        where,
                        f"introspection provider {name!r} is defined otherwise at "
                        f"{at.path}:{at.line} (the guard asks one endpoint per name)",
                    )
                )
            introspection.setdefault(name, (ispec, where))
        for ppart in policy.jwt_providers.values():
            provider = ppart.value
            skews.append(duration_seconds(provider.clock_skew))
            if provider.max_lifetime is not None:
                lifetimes.append(duration_seconds(provider.max_lifetime))
        for lname, lpart in sorted(policy.listeners.items()):
            for hi, host in enumerate(lpart.value.hosts):
                for ri, route in enumerate(host.routes):
                    limit = route.global_rate_limit
                    if limit is None:
                        continue
                    ident = route_id(lname, host.name, route.name or f"route-{ri}")
                    where = lpart.origin.key("hosts", hi, "routes", ri, "global_rate_limit")
                    spec = (limit.requests, limit.unit, KEYS[limit.by])
                    if ident in seen:
                        first, at = seen[ident]
                        if first != spec:
                            errors.append(
                                ConfigError(
                                    where,
                                    f"route {ident} has another global_rate_limit at "
                                    f"{at.path}:{at.line} (one route id, one limit)",
                                )
                            )
                        continue
                    seen[ident] = (spec, where)
                    key = KEYS[limit.by]
                    source = f"{where.path}:{where.line}"
                    child = Rule(key, None, Limit(limit.requests, limit.unit, source))
                    rules[(ROUTE_KEY, ident)] = Rule(ROUTE_KEY, ident, None, {(key, None): child})
    if errors:
        raise ConfigErrors(list(dict.fromkeys(errors)))
    out = GuardLimits(
        token_max_lifetime=max(lifetimes, default=None),
        token_clock_skew=max(skews, default=None),
        introspection={n: found for n, (found, _) in introspection.items()},
    )
    if rules:
        out.domains[DOMAIN] = rules
    return out


def combine(file_limits: GuardLimits, policy_limits: GuardLimits, policy: Path) -> GuardLimits:
    """The limits file's domains and the policy's; the policy's domain may not be in both."""
    if DOMAIN in file_limits.domains and DOMAIN in policy_limits.domains:
        raise ConfigErrors(
            [
                ConfigError(
                    Location(str(policy)),
                    f"domain {DOMAIN!r} comes from the policy; the --limits file may not "
                    "define it too",
                )
            ]
        )
    return GuardLimits(
        {**file_limits.domains, **policy_limits.domains},
        policy_limits.token_max_lifetime,
        policy_limits.token_clock_skew,
        policy_limits.introspection,
    )


def _introspection_spec(
    name: str, part: Part[IntrospectionProvider], policy: GroupPolicy, errors: list[ConfigError]
) -> IntrospectionSpec | None:
    """The provider with its client secret file and CA bundle read; None (errors added,
    naming the file, never the secret) when one cannot be."""
    p = part.value
    try:
        secret = read_secret(Path(_resolve(part.origin.folder, p.client_secret_file)))
    except ValueError as e:
        errors.append(
            ConfigError(
                part.origin.at("client_secret_file"),
                f"introspection provider {name!r}: client_secret_file: {e}",
            )
        )
        return None
    ca_file, ca_pem = None, b""
    if p.ca is not None:
        spart = policy.secrets.get(p.ca)
        if spart is None or spart.value.ca is None:
            return None  # the policy check has said so
        ca_file = _resolve(spart.origin.folder, spart.value.ca)
        try:
            ca_pem = check_ca(ca_file)
        except ValueError as e:
            errors.append(
                ConfigError(part.origin.at("ca"), f"introspection provider {name!r}: ca: {e}")
            )
            return None
    cache = p.cache_bounds
    return IntrospectionSpec(
        name=name,
        endpoint=p.endpoint,
        client_id=p.client_id,
        client_secret=secret,
        ca_file=ca_file,
        ca_pem=ca_pem,
        issuer=p.issuer,
        audiences=tuple(p.audiences) if p.audiences is not None else None,
        forward_claims=tuple(sorted(p.forward_claims.items())),
        max_entries=cache.max_entries,
        max_ttl=duration_seconds(cache.max_ttl),
        negative_ttl=duration_seconds(cache.negative_ttl),
        timeout=duration_seconds(p.timeout),
    )


def _resolve(folder: Path, path: str) -> str:
    """A policy path, relative to its file's folder (as the control plane reads them)."""
    return path if Path(path).is_absolute() else str(folder / path)

"""Parsed documents -> a SnapshotSet: group by nodes, merge, check, translate, check again.

Pure but for ``read``, the function the caller gives to fetch the files secrets name (the
loader passes one that never serves a half-written file).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import replace

from xdsplane import jwt as jwtkeys
from xdsplane import tlsfiles
from xdsplane.config.errors import ConfigError, ConfigErrors, Location
from xdsplane.config.stableread import FileBusy
from xdsplane.pipeline.groups import merge_and_check, node_groups, scope_of
from xdsplane.pipeline.incremental import GroupState, rebuild
from xdsplane.pipeline.refs import Ref, check_snapshot, references
from xdsplane.pipeline.translations import TranslationCache
from xdsplane.pipeline.units import Unit
from xdsplane.policy.check import Usage, use_key
from xdsplane.policy.check_cache import HostChecks
from xdsplane.policy.merge import GroupPolicy, Origin, Part
from xdsplane.policy.translate.secrets import paths, resolve
from xdsplane.snapshot import NodeGroup, Resource, Snapshot, SnapshotSet
from xdsplane.tlsfiles import CertSummary
from xdsplane.types import ResourceType

Reader = Callable[[str], bytes]
RefsOf = Callable[[Resource], tuple[Ref, ...]]


class Staples:
    """What the OCSP staple checks found besides errors: warnings, and the secrets whose
    expired staple is left out of what is served."""

    def __init__(self) -> None:
        self.warnings: list[ConfigError] = []
        self.expired: set[str] = set()


def _read_secret_files(
    policy: GroupPolicy,
    read: Reader,
    errors: list[ConfigError],
    certs: dict[str, CertSummary],
    staples: Staples | None = None,
) -> dict[str, bytes]:
    """Read and check every file the secrets name; fill ``certs`` with what was found."""
    staples = staples if staples is not None else Staples()
    files: dict[str, bytes] = {}
    for name, part in sorted(policy.secrets.items()):
        wanted = paths(part.value, part.origin.folder)
        ok = True
        for field, path in wanted.items():
            if path in files:
                continue
            try:
                files[path] = read(path)
            except OSError as e:
                reason = e.strerror or str(e)
                errors.append(
                    ConfigError(part.origin.at(field), f"{field}: cannot read {path}: {reason}")
                )
                ok = False
        if not ok:
            continue
        try:
            if part.value.is_certificate:
                cert = wanted["certificate"]
                summary = tlsfiles.check_certificate(
                    name, cert, files[cert], files[wanted["private_key"]]
                )
                if "ocsp_staple" in wanted:
                    summary = _check_staple(
                        policy, name, part.origin, wanted, files, errors, staples, summary
                    )
                certs[name] = summary
            else:
                ca = wanted["ca"]
                crl = files[wanted["crl"]] if "crl" in wanted else None
                summaries = tlsfiles.check_ca(name, ca, files[ca], crl)
                certs[name] = summaries[0]
        except tlsfiles.KeyMismatch as e:
            if _just_written(*wanted.values()):
                # A rotation writes the key, then the certificate: seen half-way, try again.
                raise FileBusy(f"{name}: certificate and key are being replaced") from None
            errors.append(ConfigError(part.origin.key(), f"secret {name!r}: {e}"))
        except tlsfiles.TlsFileError as e:
            errors.append(ConfigError(part.origin.key(), f"secret {name!r}: {e}"))
    return files


def _must_staple(policy: GroupPolicy, secret: str) -> list[str]:
    """The hosts with ``ocsp: must_staple`` whose certificate is ``secret``."""
    return [
        h.name
        for lpart in policy.listeners.values()
        for h in lpart.value.hosts
        if h.certificate == secret and h.ocsp == "must_staple"
    ]


def _check_staple(
    policy: GroupPolicy,
    name: str,
    origin: Origin,
    wanted: dict[str, str],
    files: dict[str, bytes],
    errors: list[ConfigError],
    staples: Staples,
    summary: CertSummary,
) -> CertSummary:
    """A certificate secret's OCSP staple must be for it, signed by its issuer, current.

    A staple that is right but for its nextUpdate having passed does not stop the load
    unless a host has ``ocsp: must_staple``: the secret is served without it (Envoy staples
    no expired response under ``lenient``, and fails every handshake of one under
    ``strict``), with a warning, so that the edge keeps serving and other edits still load
    (docs/policy.md#ocsp-stapling). Returns ``summary`` with the staple's nextUpdate."""
    issuer = wanted.get("ocsp_issuer")
    try:
        next_update = tlsfiles.check_ocsp(
            wanted["ocsp_staple"],
            files[wanted["ocsp_staple"]],
            files[wanted["certificate"]],
            files[issuer] if issuer is not None else None,
        )
        return replace(summary, ocsp_next_update=next_update, ocsp_stapled=True)
    except tlsfiles.StapleExpired as e:
        hosts = _must_staple(policy, name)
        if hosts:
            errors.append(
                ConfigError(
                    origin.at("ocsp_staple"),
                    f"secret {name!r}: {e}; host {hosts[0]!r} has ocsp: must_staple, so it "
                    "cannot be served without a current one: write one (xdsplane certs ocsp, "
                    "or your responder's renewal)",
                )
            )
        else:
            staples.expired.add(name)
            staples.warnings.append(
                ConfigError(
                    origin.at("ocsp_staple"),
                    f"secret {name!r}: {e}; served without a staple until a current one is "
                    "written (xdsplane certs ocsp, or your responder's renewal)",
                )
            )
        return replace(summary, ocsp_next_update=e.next_update, ocsp_stapled=False)
    except tlsfiles.StapleMismatch as e:
        if _just_written(wanted["ocsp_staple"], wanted["certificate"]):
            # A rotation writes the certificate, then its new staple: seen half-way, try again.
            raise FileBusy(f"{name}: certificate and OCSP staple are being replaced") from None
        errors.append(ConfigError(origin.at("ocsp_staple"), f"secret {name!r}: {e}"))
    except tlsfiles.TlsFileError as e:
        errors.append(ConfigError(origin.at("ocsp_staple"), f"secret {name!r}: {e}"))
    return summary


def _read_jwks_files(
    policy: GroupPolicy, read: Reader, errors: list[ConfigError]
) -> dict[str, bytes]:
    """Read and check the JWKS file of every JWT provider (through ``read``: watched)."""
    files: dict[str, bytes] = {}
    for name, part in sorted(policy.jwt_providers.items()):
        if part.value.jwks_file is None:
            continue  # jwks_uri: Envoy fetches the key set itself
        path = resolve(part.origin.folder, part.value.jwks_file)
        if path in files:
            continue
        try:
            data = read(path)
        except OSError as e:
            reason = e.strerror or str(e)
            errors.append(
                ConfigError(part.origin.at("jwks_file"), f"jwks_file: cannot read {path}: {reason}")
            )
            continue
        try:
            jwtkeys.check_jwks(data)
        except ValueError as e:
            errors.append(
                ConfigError(part.origin.at("jwks_file"), f"jwt provider {name!r}: {path}: {e}")
            )
            continue
        files[path] = data
    return files


SETTLE_SECONDS = 2.0


def _just_written(*paths: str) -> bool:
    """Did any of these files change in the last SETTLE_SECONDS (a writer may not be done)?"""
    now = time.time()
    for p in paths:
        try:
            if now - os.stat(p).st_mtime < SETTLE_SECONDS:
                return True
        except OSError:
            continue
    return False


def _check_domains(
    policy: GroupPolicy, certs: dict[str, CertSummary], errors: list[ConfigError]
) -> None:
    """Each TLS host's certificate must cover every one of its domains."""
    if not certs:
        return  # no certificate read: nothing to cover (and no walk over every host)
    for lpart in policy.listeners.values():
        for hi, host in enumerate(lpart.value.hosts):
            summary = certs.get(host.certificate or "")
            if summary is None or summary.is_ca:
                continue  # a CA named as a certificate is reported by check_policy
            for di, domain in enumerate(host.domains):
                if domain != "*" and not tlsfiles.covers(summary.dns, domain):
                    sans = ", ".join(summary.dns) or "none"
                    errors.append(
                        ConfigError(
                            lpart.origin.at("hosts", hi, "domains", di),
                            f"domain {domain!r} is not covered by the certificate of secret "
                            f"{host.certificate!r} ({summary.path}; DNS SANs: {sans})",
                        )
                    )


def build(
    units: list[Unit],
    read: Reader,
    refs_of: RefsOf = references,
    translations: TranslationCache | None = None,
    previous: SnapshotSet | None = None,
    states: dict[str, GroupState] | None = None,
    checks: dict[str, HostChecks] | None = None,
) -> SnapshotSet:
    """Raises ConfigErrors with every problem found, or returns what is to be served.

    ``states`` (kept by the caller across loads, replaced only by a load that succeeds)
    lets each group be rebuilt from its last good build (``incremental.py``); ``checks``
    (kept by the caller across loads, good or not) each group's host checks.
    """
    plan = node_groups(units)
    after: dict[str, GroupState] = {}
    cache = translations if translations is not None else TranslationCache()
    errors: list[ConfigError] = []
    groups: list[NodeGroup] = []
    used = Usage()
    certs: dict[str, CertSummary] = {}
    staples = Staples()
    for group in plan:
        before = previous.group(group.name) if previous is not None else None
        state = states.get(group.name) if states is not None else None
        hosts = checks.get(group.name) if checks is not None else None
        if checks is not None and hosts is None:
            hosts = checks[group.name] = HostChecks()
        built, usage, policy = _build_group(
            group.units,
            scope_of(group, plan),
            read,
            refs_of,
            errors,
            certs,
            cache,
            before,
            state,
            staples,
            hosts,
        )
        used.secrets |= usage.secrets
        used.upstreams |= usage.upstreams
        used.jwt_providers |= usage.jwt_providers
        used.introspection_providers |= usage.introspection_providers
        if built is not None:
            after[group.name] = built
            groups.append(NodeGroup(group.name, group.nodes, built.snapshot, policy))
    if checks is not None:
        for gone in checks.keys() - {g.name for g in plan}:
            del checks[gone]
    if not errors:
        errors.extend(_unused(units, used))
    if errors:
        raise ConfigErrors(list(dict.fromkeys(errors)))
    cache.sweep()
    if states is not None:
        states.clear()
        states.update(after)
    summaries = tuple(sorted(certs.values(), key=lambda c: (c.secret, c.path)))
    warnings = tuple(dict.fromkeys([*(w for u in units for w in u.warnings), *staples.warnings]))
    return SnapshotSet(tuple(groups), summaries, warnings)


def _build_group(
    units: list[Unit],
    scope: str,
    read: Reader,
    refs_of: RefsOf,
    errors: list[ConfigError],
    certs: dict[str, CertSummary],
    cache: TranslationCache,
    previous: Snapshot | None = None,
    state: GroupState | None = None,
    staples: Staples | None = None,
    hosts: HostChecks | None = None,
) -> tuple[GroupState | None, Usage, GroupPolicy | None]:
    before = len(errors)
    policy, usage, problems = merge_and_check(units, scope, hosts)
    errors.extend(problems)
    staples = staples if staples is not None else Staples()
    files = _read_secret_files(policy, read, errors, certs, staples)
    for name in staples.expired & set(policy.secrets):
        # Served without its expired staple (see _check_staple).
        spart = policy.secrets[name]
        bare = spart.value.model_copy(update={"ocsp_staple": None, "ocsp_issuer": None})
        policy.secrets[name] = Part(bare, spart.origin)
    files.update(_read_jwks_files(policy, read, errors))
    _check_domains(policy, certs, errors)
    if len(errors) > before:
        return None, usage, None
    translated = cache.translate(policy, files)
    for u in units:
        _count_raw_uses(policy, u.resources, refs_of, usage)
    if state is not None and state.scope == scope:
        rebuilt = rebuild(state, units, translated, refs_of)
        if rebuilt is not None:
            return rebuilt, usage, policy
    resources = list(translated)
    for u in units:
        resources.extend(u.resources)
    merged = _merge_resources(resources, scope, errors)
    snapshot = Snapshot.build(merged.values(), previous)
    if len(errors) == before:
        errors.extend(check_snapshot(snapshot, scope, refs_of))
    if len(errors) > before:
        return None, usage, None
    return GroupState(scope, tuple(units), tuple(translated), snapshot), usage, policy


def _count_raw_uses(
    policy: GroupPolicy, raw: tuple[Resource, ...], refs_of: RefsOf, usage: Usage
) -> None:
    """An upstream or secret that only a raw resource refers to is used all the same."""
    if not (policy.upstreams or policy.secrets):
        return
    for r in raw:
        for ref_type, name, _ in refs_of(r):
            if ref_type is ResourceType.CLUSTER and name in policy.upstreams:
                usage.upstreams.add(use_key(policy.upstreams[name].origin))
            elif ref_type is ResourceType.SECRET and name in policy.secrets:
                usage.secrets.add(use_key(policy.secrets[name].origin))


def _merge_resources(
    resources: list[Resource], scope: str, errors: list[ConfigError]
) -> dict[tuple[ResourceType, str], Resource]:
    by_key: dict[tuple[ResourceType, str], Resource] = {}
    for r in resources:
        key = (r.type, r.name)
        first = by_key.get(key)
        if first is not None:
            where = f" (for nodes {scope})" if scope else ""
            errors.append(
                ConfigError(
                    Location.parse(r.source),
                    f"duplicate {r.type.short} name {r.name!r}, first defined at "
                    f"{first.source}{where}",
                )
            )
            continue
        by_key[key] = r
    return by_key


def _unused(units: list[Unit], used: Usage) -> list[ConfigError]:
    errors = []
    kinds = (
        ("secrets", used.secrets, "secret {!r} is not used by any host or upstream"),
        ("upstreams", used.upstreams, "upstream {!r} is not used by any route"),
        ("jwt_providers", used.jwt_providers, "jwt provider {!r} is not used by any route"),
        (
            "introspection_providers",
            used.introspection_providers,
            "introspection provider {!r} is not used by any route",
        ),
    )
    for u in units:
        if not u.parts:
            continue  # a raw file: no definitions to be unused
        defined = u.fragment.parts().defined  # the use keys of its definitions, made once
        doc = id(u.doc)
        for key, seen, message in kinds:
            if defined[key] <= seen:
                continue  # (every one used: found in C)
            for name in getattr(u.policy, key):
                if (doc, (key, name)) not in seen:
                    origin = Origin(u.doc, (key, name))
                    errors.append(ConfigError(origin.key(), message.format(name)))
    return errors

"""The TLS floor for PCI: no TLS below 1.2, no cipher suite without forward secrecy or AEAD.

Checked per policy document (a listener's or upstream's ``tls`` is in one document). A
``tls`` with ``allow_legacy_tls: true`` may go below the floor: each thing it lets through
is a warning (``validate`` prints it, ``serve`` logs it at every load), never silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xdsplane.config import yamlsrc
from xdsplane.config.errors import ConfigError
from xdsplane.config.yamlsrc import Document
from xdsplane.policy import ciphers
from xdsplane.policy.model import PolicyFile, Tls, TlsVersion, UpstreamTls

LEGACY_VERSIONS: tuple[TlsVersion, ...] = ("1.0", "1.1")
ALLOW = "allow_legacy_tls"


@dataclass
class Findings:
    errors: list[ConfigError] = field(default_factory=list)
    warnings: list[ConfigError] = field(default_factory=list)


def check(doc: Document, policy: PolicyFile) -> Findings:
    found = Findings()
    for li, listener in enumerate(policy.listeners):
        if listener.tls is not None:
            what = f"listener {listener.name!r}"
            _check_tls(doc, ("listeners", li, "tls"), listener.tls, what, found)
    for name, upstream in policy.upstreams.items():
        if upstream.tls is not None:
            what = f"upstream {name!r}"
            _check_tls(doc, ("upstreams", name, "tls"), upstream.tls, what, found)
    _check_san_lists(doc, policy, found)
    return found


def _check_san_lists(doc: Document, policy: PolicyFile, found: Findings) -> None:
    """``allow_client_sans`` without ``require_client_certificate`` on an optional host
    checks only the certificates clients present: said at every load, never silent."""
    for li, listener in enumerate(policy.listeners):
        for hi, host in enumerate(listener.hosts):
            if host.client_certificate != "optional":
                continue
            for ri, route in enumerate(host.routes):
                if route.allow_client_sans and not route.require_client_certificate:
                    keys = ("listeners", li, "hosts", hi, "routes", ri, "allow_client_sans")
                    found.warnings.append(
                        ConfigError(
                            doc.locate_key(keys),
                            f"route {route.name or ri!r} of optional host {host.name!r}: "
                            "allow_client_sans checks the certificates clients present, "
                            "and a request without one passes; add "
                            "require_client_certificate: true to refuse it",
                        )
                    )


def _check_tls(
    doc: Document,
    keys: tuple[str | int, ...],
    tls: Tls | UpstreamTls,
    what: str,
    found: Findings,
) -> None:
    allowed = tls.allow_legacy_tls
    # A version below 1.2 shows in min_version (max_version below 1.2 implies it).
    if tls.min_version in LEGACY_VERSIONS:
        where = doc.locate((*keys, "min_version"))
        if allowed:
            found.warnings.append(
                ConfigError(
                    where,
                    f"{what} accepts TLS {tls.min_version} (min_version {tls.min_version}, "
                    f"allowed by {ALLOW}: true); PCI DSS needs TLS 1.2 or later",
                )
            )
        else:
            found.errors.append(
                ConfigError(
                    where,
                    f"min_version {tls.min_version}: {what} would accept TLS below 1.2, which "
                    f"PCI DSS forbids; use 1.2 or 1.3 (or set {ALLOW}: true to allow it anyway)",
                )
            )
    suites = tls.cipher_suites if isinstance(tls, Tls) else None
    for i, entry in enumerate(suites or ()):
        where = doc.locate((*keys, "cipher_suites", i))
        for suite in ciphers.legacy(entry):
            shown = suite.name if suite.name == entry else f"{suite.name} (in {entry!r})"
            if allowed:
                message = (
                    f"{what} offers cipher suite {shown}, which has {suite.weakness()} "
                    f"(allowed by {ALLOW}: true)"
                )
                found.warnings.append(ConfigError(where, message))
            else:
                message = (
                    f"cipher_suites: {shown} has {suite.weakness()}; use suites with ECDHE "
                    f"and GCM or CHACHA20-POLY1305 (or set {ALLOW}: true to allow it anyway)"
                )
                found.errors.append(ConfigError(where, message))
    if allowed and not _uses_legacy(tls):
        found.warnings.append(
            ConfigError(
                doc.locate_key((*keys, ALLOW)),
                f"{what}: {ALLOW} is true but nothing here needs it; remove it",
            )
        )


def _uses_legacy(tls: Tls | UpstreamTls) -> bool:
    if tls.min_version in LEGACY_VERSIONS:
        return True
    suites = tls.cipher_suites if isinstance(tls, Tls) else None
    return any(ciphers.legacy(entry) for entry in suites or ())


# -- raw resources (the escape hatch) ----------------------------------------------------------

_VERSION_KEYS = {
    "tls_minimum_protocol_version": "tls_minimum_protocol_version",
    "tlsMinimumProtocolVersion": "tls_minimum_protocol_version",
    "tls_maximum_protocol_version": "tls_maximum_protocol_version",
    "tlsMaximumProtocolVersion": "tls_maximum_protocol_version",
}
_CIPHER_KEYS = ("cipher_suites", "cipherSuites")
# Envoy's TlsParameters.TlsProtocol below 1.2, by name and by number (proto JSON takes both).
_LEGACY_PROTOCOLS = {"TLSv1_0": "1.0", "TLSv1_1": "1.1", 1: "1.0", 2: "1.1"}
_RAW_FIX = (
    "raw resources cannot go below the TLS floor; write it as a policy listener or "
    "upstream with tls.allow_legacy_tls: true"
)


def check_raw(doc: Document, items: object, keys: tuple[str | int, ...]) -> list[ConfigError]:
    """The TLS floor in raw resources: TlsParameters anywhere in them (a Listener's filter
    chains, a Cluster's transport socket, inside typed_config), found by key. There is no
    allow_legacy_tls for raw resources."""
    errors: list[ConfigError] = []
    # ``items`` is part of ``doc.value``: what the parse noted in all of it covers it.
    noted = doc.noted(_WATCHED)
    if _suspect(items) if noted is None else any(_suspicious(k, v) for k, v in noted):
        _walk_raw(doc, items, keys, errors)
    return errors


_WATCHED = frozenset(_VERSION_KEYS) | frozenset(_CIPHER_KEYS)
yamlsrc.note_keys(_WATCHED)


def _suspicious(key: str, value: object) -> bool:
    """Would ``_walk_raw`` report something about this key and value (or look closer)?"""
    if key in _CIPHER_KEYS:
        return isinstance(value, list)
    return (
        isinstance(value, str | int) and not isinstance(value, bool) and value in _LEGACY_PROTOCOLS
    )


def _suspect(value: object) -> bool:
    """Could ``_walk_raw`` find anything in ``value``: a version key with a legacy value or
    a list of cipher suites? Walked without paths (most raw files have nothing to report,
    and the walk building each value's path was ~10 % of a cold load); ``_walk_raw`` then
    walks again, with paths, only if so."""
    todo = [value]
    pop, push = todo.pop, todo.append
    while todo:
        v = pop()
        if isinstance(v, list):
            todo.extend([x for x in v if isinstance(x, dict | list)])
            continue
        if not isinstance(v, dict):
            continue
        for k, x in v.items():
            if k in _WATCHED and _suspicious(k, x):
                return True
            if isinstance(x, dict | list):
                push(x)
    return False


def _walk_raw(
    doc: Document, value: object, keys: tuple[str | int, ...], errors: list[ConfigError]
) -> None:
    if isinstance(value, list):
        for i, v in enumerate(value):
            _walk_raw(doc, v, (*keys, i), errors)
        return
    if not isinstance(value, dict):
        return
    for k, v in value.items():
        if k not in _VERSION_KEYS and k not in _CIPHER_KEYS:
            if isinstance(v, dict | list):  # nothing else holds TlsParameters
                _walk_raw(doc, v, (*keys, k), errors)
            continue
        here = (*keys, k)
        legacy = isinstance(v, str | int) and not isinstance(v, bool) and v in _LEGACY_PROTOCOLS
        if k in _VERSION_KEYS and legacy:
            errors.append(
                ConfigError(
                    doc.locate(here),
                    f"{_VERSION_KEYS[k]}: {v} allows TLS {_LEGACY_PROTOCOLS[v]}, below 1.2, "
                    f"which PCI DSS forbids; {_RAW_FIX}",
                )
            )
        elif k in _CIPHER_KEYS and isinstance(v, list):
            for i, entry in enumerate(v):
                if not isinstance(entry, str):
                    continue  # the proto parser reports it
                where = doc.locate((*here, i))
                try:
                    ciphers.check_name(entry)
                except ValueError as e:
                    errors.append(ConfigError(where, str(e)))
                    continue
                for suite in ciphers.legacy(entry):
                    errors.append(
                        ConfigError(
                            where, f"cipher_suites: {suite.name} has {suite.weakness()}; {_RAW_FIX}"
                        )
                    )
        else:
            _walk_raw(doc, v, here, errors)

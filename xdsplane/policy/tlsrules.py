"""The TLS floor for PCI: no TLS below 1.2, no cipher suite without forward secrecy or AEAD.

Checked per policy document (a listener's or upstream's ``tls`` is in one document). A
``tls`` with ``allow_legacy_tls: true`` may go below the floor: each thing it lets through
is a warning (``validate`` prints it, ``serve`` logs it at every load), never silent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    return found


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

"""The TLS 1.2 cipher suites Envoy (BoringSSL) knows, and which of them PCI allows.

A suite is legacy when its key exchange has no forward secrecy (static RSA or plain PSK:
whoever gets the private key later reads every recorded session) or when it is not AEAD
(CBC with HMAC: the Lucky13 and padding-oracle family). Legacy suites need the listener's
``allow_legacy_tls: true``.

The names are BoringSSL's (OpenSSL-style) and their IANA names, which BoringSSL accepts
too; checked against Envoy 1.40, which refuses the others (``AES128-SHA256``, DHE, RC4...).
TLS 1.3 suites are not configurable in Envoy: BoringSSL always offers its three.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Suite:
    name: str  # BoringSSL's name
    iana: str
    forward_secrecy: bool
    aead: bool

    @property
    def legacy(self) -> bool:
        return not (self.forward_secrecy and self.aead)

    def weakness(self) -> str:
        """Why the suite is legacy ('' when it is not)."""
        missing = []
        if not self.forward_secrecy:
            missing.append("forward secrecy (static key exchange, no ECDHE)")
        if not self.aead:
            missing.append("AEAD (CBC mode)")
        return " and ".join(f"no {m}" for m in missing)


SUITES = (
    Suite("ECDHE-ECDSA-AES128-GCM-SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", True, True),
    Suite("ECDHE-RSA-AES128-GCM-SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", True, True),
    Suite("ECDHE-ECDSA-AES256-GCM-SHA384", "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", True, True),
    Suite("ECDHE-RSA-AES256-GCM-SHA384", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384", True, True),
    Suite(
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        True,
        True,
    ),
    Suite("ECDHE-RSA-CHACHA20-POLY1305", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256", True, True),
    Suite("ECDHE-PSK-CHACHA20-POLY1305", "TLS_ECDHE_PSK_WITH_CHACHA20_POLY1305_SHA256", True, True),
    # Forward secrecy, but CBC.
    Suite("ECDHE-ECDSA-AES128-SHA", "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA", True, False),
    Suite("ECDHE-ECDSA-AES256-SHA", "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA", True, False),
    Suite("ECDHE-RSA-AES128-SHA", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", True, False),
    Suite("ECDHE-RSA-AES256-SHA", "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA", True, False),
    Suite("ECDHE-ECDSA-AES128-SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256", True, False),
    Suite("ECDHE-RSA-AES128-SHA256", "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256", True, False),
    Suite("ECDHE-PSK-AES128-CBC-SHA", "TLS_ECDHE_PSK_WITH_AES_128_CBC_SHA", True, False),
    Suite("ECDHE-PSK-AES256-CBC-SHA", "TLS_ECDHE_PSK_WITH_AES_256_CBC_SHA", True, False),
    # Static RSA or PSK key exchange: no forward secrecy.
    Suite("AES128-GCM-SHA256", "TLS_RSA_WITH_AES_128_GCM_SHA256", False, True),
    Suite("AES256-GCM-SHA384", "TLS_RSA_WITH_AES_256_GCM_SHA384", False, True),
    Suite("AES128-SHA", "TLS_RSA_WITH_AES_128_CBC_SHA", False, False),
    Suite("AES256-SHA", "TLS_RSA_WITH_AES_256_CBC_SHA", False, False),
    Suite("DES-CBC3-SHA", "TLS_RSA_WITH_3DES_EDE_CBC_SHA", False, False),
    Suite("PSK-AES128-CBC-SHA", "TLS_PSK_WITH_AES_128_CBC_SHA", False, False),
    Suite("PSK-AES256-CBC-SHA", "TLS_PSK_WITH_AES_256_CBC_SHA", False, False),
)
BY_NAME = {s.name: s for s in SUITES} | {s.iana: s for s in SUITES}
TLS13 = ("TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256")


def members(value: str) -> list[str]:
    """The names in one ``cipher_suites`` entry: itself, or those of a group ``[A|B]``."""
    if value.startswith("[") and value.endswith("]"):
        return value[1:-1].split("|")
    return [value]


def check_name(value: str) -> None:
    """Raise ValueError unless every name in ``value`` is a suite Envoy knows."""
    if not value:
        raise ValueError("cipher_suites: an empty cipher suite name")
    for name in members(value):
        if name in BY_NAME:
            continue
        if name in TLS13:
            raise ValueError(
                f"cipher_suites: {name!r} is a TLS 1.3 suite; TLS 1.3 suites are not "
                "configurable in Envoy (cipher_suites applies to TLS 1.2 and below)"
            )
        close = [s.name for s in SUITES if s.name.lower() == name.lower()]
        if close:
            hint = f"; did you mean {close[0]!r}?"
        elif ":" in name:
            hint = " (one suite per list entry)"
        else:
            hint = (
                " (a BoringSSL name such as ECDHE-ECDSA-AES128-GCM-SHA256; OpenSSL rules "
                "such as ALL or HIGH are not accepted; see docs/policy.md)"
            )
        raise ValueError(f"cipher_suites: unknown cipher suite {_shown(name)}{hint}")


def _shown(name: str) -> str:
    """The name as written, unless it cannot be a name: a pasted PEM block or a long value
    (the longest suite name has 45 characters) is not echoed."""
    if "-----BEGIN" in name or "PRIVATE KEY" in name:
        return f"(a PEM block, {len(name)} characters, not shown)"
    if len(name) > 64:
        return f"{name[:32]!r}... ({len(name)} characters)"
    return repr(name)


def legacy(value: str) -> list[Suite]:
    """The legacy suites in one ``cipher_suites`` entry (its names already checked)."""
    return [BY_NAME[n] for n in members(value) if n in BY_NAME and BY_NAME[n].legacy]

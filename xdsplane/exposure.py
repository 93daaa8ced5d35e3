"""Which listen addresses stay on this host, and what serving plaintext off it gives away.

``xdsplane serve`` refuses to listen without TLS on anything but a loopback address unless
``--insecure`` is given: the xDS port carries every secret it serves (private keys
included), and a plaintext client can claim any node's id. The admin server is plain HTTP
(/status, /metrics), so it follows the same rule.

Loopback is exactly: an IPv4 address in 127.0.0.0/8, the IPv6 address ``::1`` and the name
``localhost`` (any case). Everything else is off the host, including the wildcards
``0.0.0.0`` and ``::``, other spellings of an address (``127.1``, ``0x7f000001``,
``::ffff:127.0.0.1``, ``::1%lo``) and any other host name: what is not plainly loopback
is treated as reachable from outside.
"""

from __future__ import annotations

from xdsplane.bootstrap import split_address
from xdsplane.loopback import is_loopback

__all__ = ["is_loopback", "serve_exposure"]


def serve_exposure(xds_address: str, xds_tls: bool, admin_address: str) -> list[str]:
    """What `serve` would expose without TLS off this host: one sentence per listener,
    empty when everything plaintext is on loopback. Raises ValueError on a bad address."""
    reasons = []
    xds_host, _ = split_address(xds_address)
    if not xds_tls and not is_loopback(xds_host):
        reasons.append(
            f"xDS is plaintext on a non-loopback address (--xds-address {xds_address}): "
            "anyone who reaches it reads every secret it serves, private keys included, and "
            "can claim any node's id; serve it over mTLS (--tls-cert, --tls-key, --client-ca)"
        )
    admin_host, _ = split_address(admin_address)
    if not is_loopback(admin_host):
        reasons.append(
            f"the admin server is plain HTTP on a non-loopback address (--admin-address "
            f"{admin_address}): anyone who reaches it reads /status and /metrics; bind it to "
            "127.0.0.1 and reach it through a tunnel or a proxy with TLS"
        )
    return reasons

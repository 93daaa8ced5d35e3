"""What counts as this host: the loopback rule of ``exposure.py``, in a leaf so that the
policy checks (a plaintext OTLP collector off the host is refused) share it.

Loopback is exactly: an IPv4 address in 127.0.0.0/8, the IPv6 address ``::1`` and the name
``localhost`` (any case). Everything else is off the host, including the wildcards
``0.0.0.0`` and ``::``, other spellings of an address (``127.1``, ``0x7f000001``,
``::ffff:127.0.0.1``, ``::1%lo``) and any other host name.
"""

from __future__ import annotations

import ipaddress

_LOOPBACK_V4 = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")


def is_loopback(host: str) -> bool:
    """True only for 127.0.0.0/8, ``::1`` and ``localhost`` (see the module docstring)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return ip in _LOOPBACK_V4
    return ip == _LOOPBACK_V6  # a zone (::1%lo) or a mapped address does not compare equal

"""The guard's mTLS: its server certificate (hot-reloaded) and who may call it.

``xdsplane guard --tls-cert --tls-key --client-ca --client-san SAN...`` serves both gRPC APIs
over TLS and requires a client certificate that chains to ``--client-ca`` (checked by the
TLS handshake: no certificate, or one of another CA, never gets a call through) and carries
one of the ``--client-san`` values (checked on every call, from gRPC's auth context: a
certificate of the same CA issued to someone else, e.g. an edge's server certificate, gets
PERMISSION_DENIED and a log line). A value with ``://`` is matched against the certificate's
URI SANs, any other against its DNS SANs; exactly, no wildcards.

The files are those of ``xdsplane serve`` and reuse its loader (``xdstls.XdsTls``): checked at
startup, reloaded when they change or on SIGHUP, the last good ones kept when new ones do not
check out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from xdsplane import logs
from xdsplane.xds_identity import PeerIdentity, from_pem
from xdsplane.xdstls import XdsTls

CACHE_SIZE = 256  # distinct client certificates whose verdict is remembered


class _Renamed:
    """A logger whose events say ``guard tls`` where the shared loader says ``xds tls``."""

    def __init__(self, log: Any) -> None:
        self._log = log

    def __getattr__(self, level: str) -> Callable[..., Any]:
        method = getattr(self._log, level)

        def emit(event: str, *args: Any, **kwargs: Any) -> Any:
            return method(event.replace("xds tls", "guard tls"), *args, **kwargs)

        return emit


class GuardTls(XdsTls):
    """The guard's certificate, key and client CA; see ``xdstls.XdsTls``."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        super().__init__(cert, key, ca)
        self.log = _Renamed(logs.get("xdsplane.guard"))


class CallerCheck:
    """Refuses a call whose client certificate carries none of the allowed SANs."""

    def __init__(self, sans: Iterable[str], registry: CollectorRegistry | None = None) -> None:
        allowed = list(sans)
        self.uris = frozenset(s for s in allowed if "://" in s)
        self.dns = frozenset(s for s in allowed if "://" not in s)
        self.allowed = tuple(allowed)
        self.log = logs.get("xdsplane.guard")
        self._verdicts: dict[bytes, tuple[bool, PeerIdentity | None]] = {}
        self.refused = Counter(
            "xdsplane_guard_callers_refused",
            "gRPC calls and HTTP front connections refused because the client certificate "
            "is missing or names none of the --client-san values, by reason",
            ["reason"],
            registry=registry,
        )

    def _judge(self, pem: bytes) -> tuple[bool, PeerIdentity | None]:
        found = self._verdicts.get(pem)
        if found is not None:
            return found
        try:
            identity: PeerIdentity | None = from_pem(pem)
        except ValueError:
            identity = None
        ok = identity is not None and bool(
            self.uris.intersection(identity.uris) or self.dns.intersection(identity.dns)
        )
        if len(self._verdicts) >= CACHE_SIZE:
            self._verdicts.clear()
        self._verdicts[pem] = (ok, identity)
        return ok, identity

    async def __call__(self, context: Any) -> None:
        """Return when the caller may be served; otherwise abort the call (raises)."""
        pems = context.auth_context().get("x509_pem_cert", ())
        if not pems:
            self._refuse(context, "no_client_certificate", None)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate is required")
        ok, identity = self._judge(bytes(pems[0]))
        if not ok:
            self._refuse(context, "client_san", identity)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "the client certificate names none of the SANs this guard serves",
            )

    def allows_der(self, der: bytes, peer: str) -> bool:
        """The HTTP front's check of a connection's client certificate (DER): False (and a
        log line) when it names none of the SANs."""
        import ssl

        ok, identity = self._judge(ssl.DER_cert_to_PEM_cert(der).encode())
        if not ok:
            self._refused(peer, "client_san", identity)
        return ok

    def _refuse(self, context: Any, reason: str, identity: PeerIdentity | None) -> None:
        self._refused(context.peer(), reason, identity)

    def _refused(self, peer: str, reason: str, identity: PeerIdentity | None) -> None:
        self.refused.labels(reason).inc()
        self.log.warning(
            "guard caller refused",
            reason=reason,
            peer=peer,
            subject=identity.subject if identity is not None else None,
            sans=identity.sans() if identity is not None else [],
            allowed=list(self.allowed),
        )

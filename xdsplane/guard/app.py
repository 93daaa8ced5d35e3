"""``xdsplane guard``: the gRPC server (ext_authz + rate limit service) and its admin HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from xdsplane import logs
from xdsplane.bootstrap import split_address
from xdsplane.config.errors import ConfigErrors
from xdsplane.config.loader import list_files
from xdsplane.guard.limits import Limits, load_limits
from xdsplane.guard.policy import combine, limits_from_policy
from xdsplane.guard.service import GuardConfig, GuardMetrics, GuardService
from xdsplane.guard.store import MemoryStore, RedisStore, Store


@dataclass
class GuardOptions:
    address: str = "127.0.0.1:18081"
    admin_address: str = "127.0.0.1:19081"
    limits: Path | None = None
    policy: Path | None = None  # a policy folder: its routes' global_rate_limit
    policy_poll_seconds: float = 0.5
    redis: str | None = None  # redis://host:port/db; None: in memory
    config: GuardConfig = field(default_factory=GuardConfig)
    grace_seconds: float = 2.0


class GuardStartupError(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def make_store(opts: GuardOptions, metrics: GuardMetrics) -> Store:
    if opts.redis is None:
        return MemoryStore()
    if not opts.redis.startswith(("redis://", "rediss://", "unix://")):
        raise GuardStartupError([f"--redis {opts.redis}: expected redis://HOST:PORT/DB"])

    def on_error(op: str, error: str) -> None:
        metrics.backend_errors.labels("redis", op, error).inc()

    return RedisStore(opts.redis, on_error=on_error)


def admin_app(service: GuardService, opts: GuardOptions) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(service.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        # Liveness: the process serves. The backend's state is shown, not judged: a guard
        # restart would not bring Redis back, and fail-open/closed already decides.
        body = {
            "status": "ok",
            "backend": service.store.name,
            "backend_up": service.store.up(),
            "fail_open": service.config.fail_open,
            "limits": str(opts.limits) if opts.limits else None,
            "policy": str(opts.policy) if opts.policy else None,
            "domains": sorted(service.limits.domains),
            "rules": service.limits.rule_count(),
        }
        return web.Response(text=json.dumps(body) + "\n", content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


def load_all(opts: GuardOptions) -> Limits:
    """The limits file's and the policy's limits; raises ConfigErrors."""
    limits = load_limits(opts.limits) if opts.limits is not None else Limits()
    if opts.policy is not None:
        limits = combine(limits, limits_from_policy(opts.policy), opts.policy)
    return limits


def _fingerprint(folder: Path) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    for path in list_files(folder):
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class LimitsReloader:
    """Reloads the limits when the policy folder changes (polled) and on SIGHUP; a folder
    with errors is logged and the last good limits stay."""

    def __init__(self, opts: GuardOptions, service: GuardService) -> None:
        self.opts = opts
        self.service = service
        self.log = logs.get("xdsplane.guard")
        self.failures = 0
        self.reloads = 0

    def reload(self, why: str) -> bool:
        try:
            limits = load_all(self.opts)
        except ConfigErrors as e:
            self.failures += 1
            self.log.error(
                "limits not reloaded; keeping the last good ones",
                why=why,
                errors=[str(x) for x in e.errors],
            )
            return False
        except Exception as e:  # a bug of ours must not stop the guard
            self.failures += 1
            self.log.error("limits not reloaded", why=why, error=f"{type(e).__name__}: {e}")
            return False
        self.service.limits = limits
        self.reloads += 1
        self.log.info("limits reloaded", why=why, rules=limits.rule_count())
        return True

    async def watch(self, stop: asyncio.Event) -> None:
        folder = self.opts.policy
        if folder is None:
            return
        seen = _fingerprint(folder)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.opts.policy_poll_seconds)
            now = await asyncio.to_thread(_fingerprint, folder)
            if now != seen:
                seen = now
                await asyncio.to_thread(self.reload, "change")


async def run(opts: GuardOptions) -> None:
    log = logs.get("xdsplane.guard")
    try:
        limits = load_all(opts)
    except ConfigErrors as e:
        raise GuardStartupError([str(x) for x in e.errors]) from None
    metrics = GuardMetrics()
    store = make_store(opts, metrics)
    service = GuardService(store, limits, opts.config, metrics)

    try:
        host, port = split_address(opts.address)
        admin_host, admin_port = split_address(opts.admin_address)
    except ValueError as e:
        raise GuardStartupError([str(e)]) from None
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(tuple(service.handlers()))
    bound = server.add_insecure_port(f"{_bracket(host)}:{port}")
    if bound == 0:
        raise GuardStartupError([f"cannot listen for gRPC on {opts.address}"])
    runner = web.AppRunner(admin_app(service, opts), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, admin_host, admin_port).start()
    except OSError as e:
        await runner.cleanup()
        raise GuardStartupError([f"cannot listen for admin on {opts.admin_address}: {e}"]) from None
    await server.start()
    log.info(
        "guard serving",
        grpc=f"{host}:{bound}",
        admin=opts.admin_address,
        backend=store.name,
        redis=opts.redis,
        fail_open=opts.config.fail_open,
        max_lifetime=opts.config.max_lifetime,
        limits=str(opts.limits) if opts.limits else None,
        policy=str(opts.policy) if opts.policy else None,
        rules=limits.rule_count(),
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloader = LimitsReloader(opts, service)
    loop.add_signal_handler(
        signal.SIGHUP, lambda: loop.run_in_executor(None, reloader.reload, "SIGHUP")
    )
    watcher = asyncio.create_task(reloader.watch(stop))
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        log.info("guard stopping")
        await server.stop(opts.grace_seconds)
        await runner.cleanup()
        await store.close()
        log.info("guard stopped")

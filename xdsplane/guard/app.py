"""``xdsplane guard``: the gRPC server (ext_authz + rate limit service), the optional HTTP/1.1
ext_authz front (``--http-address``, httpfront.py) and the admin HTTP."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from xdsplane import logs
from xdsplane.adminhttp import protect
from xdsplane.bootstrap import split_address
from xdsplane.config.errors import ConfigErrors
from xdsplane.exposure import is_loopback
from xdsplane.guard.httpfront import Front, server_context
from xdsplane.guard.reloaders import LimitsReloader, RevocationsReloader, load_all
from xdsplane.guard.service import GuardConfig, GuardMetrics, GuardService
from xdsplane.guard.store import MemoryStore, RedisStore, Store, StoreAuthError, redact_url
from xdsplane.guard.tls import CallerCheck, GuardTls
from xdsplane.guard.workers import worker_metric
from xdsplane.reload import Refused, ReloadState, retry_busy
from xdsplane.tlsflags import all_or_none


@dataclass
class GuardOptions:
    address: str = "127.0.0.1:18081"
    admin_address: str = "127.0.0.1:19081"
    limits: Path | None = None
    policy: Path | None = None  # a policy folder: its routes' global_rate_limit (watched)
    redis: str | None = None  # redis://host:port/db; None: in memory
    redis_password_file: Path | None = None  # the Redis password, read from this file
    config: GuardConfig = field(default_factory=GuardConfig)
    grace_seconds: float = 2.0
    # mTLS for both gRPC APIs: the server's certificate and key, the CA client certificates
    # must chain to, and the SANs (URI with ://, else DNS) a caller's certificate must carry.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    client_sans: tuple[str, ...] = ()
    # A watched YAML/JSON list of revocations (xdsplane revoke --file), beside the store's.
    revocations: Path | None = None
    # Plaintext gRPC, and the admin HTTP on a non-loopback address, are refused without it.
    insecure: bool = False
    # --workers: this process is worker K of several sharing --address (guard/workers.py).
    worker: int | None = None
    # The HTTP/1.1 ext_authz front (guard.transport: http), beside gRPC; None: not served.
    # The same TLS as gRPC (--tls-cert...), the same SO_REUSEPORT among --workers.
    http_address: str | None = None


class GuardStartupError(Exception):
    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def read_password(path: Path) -> str:
    """The password in ``path`` (one line; a trailing newline is not part of it)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GuardStartupError([f"--redis-password-file {path}: {e.strerror or e}"]) from None
    text = data.decode("utf-8", errors="strict").rstrip("\r\n") if data else ""
    if not text or "\n" in text:
        raise GuardStartupError(
            [f"--redis-password-file {path}: expected one line holding the password"]
        )
    return text


def make_store(opts: GuardOptions, metrics: GuardMetrics) -> Store:
    if opts.redis is None:
        if opts.redis_password_file is not None:
            raise GuardStartupError(["--redis-password-file needs --redis"])
        return MemoryStore()
    shown = redact_url(opts.redis)
    if not opts.redis.startswith(("redis://", "rediss://", "unix://")):
        raise GuardStartupError([f"--redis {shown}: expected redis://HOST:PORT/DB"])
    password = None
    if opts.redis_password_file is not None:
        if shown != opts.redis:
            raise GuardStartupError(
                [f"--redis {shown} holds a password: give it there or in --redis-password-file"]
            )
        try:
            password = read_password(opts.redis_password_file)
        except UnicodeDecodeError:
            raise GuardStartupError(
                [f"--redis-password-file {opts.redis_password_file}: not UTF-8 text"]
            ) from None

    def on_error(op: str, error: str) -> None:
        metrics.backend_errors.labels("redis", op, error).inc()

    return RedisStore(opts.redis, on_error=on_error, password=password)


def guard_tls(opts: GuardOptions) -> GuardTls | None:
    """The gRPC side's mTLS files, checked; None: plaintext (only with --insecure)."""
    files = {"--tls-cert": opts.tls_cert, "--tls-key": opts.tls_key, "--client-ca": opts.client_ca}
    try:
        given = all_or_none(files)
    except ValueError as e:
        raise GuardStartupError([str(e)]) from None
    if not given:
        if opts.client_sans:
            raise GuardStartupError(["--client-san needs --tls-cert, --tls-key and --client-ca"])
        if not opts.insecure:
            raise GuardStartupError(
                [
                    "the guard's gRPC would accept any caller in plaintext: give --tls-cert, "
                    "--tls-key, --client-ca and --client-san (mTLS), or --insecure"
                ]
            )
        return None
    if not opts.client_sans:
        raise GuardStartupError(
            ["--client-san is required with --client-ca: the SAN(s) Envoy's certificate carries"]
        )
    cert, key, ca = opts.tls_cert, opts.tls_key, opts.client_ca
    assert cert is not None and key is not None and ca is not None
    try:  # files being written at startup are read again (reload.retry_busy)
        return retry_busy(lambda: GuardTls(cert, key, ca))
    except Refused as e:
        raise GuardStartupError(e.errors) from None


def _reload_json(state: ReloadState) -> dict[str, object]:
    return {
        "loaded_at": state.loaded_at,
        "attempts": state.attempts,
        "successes": state.successes,
        "failures": state.failures,
        "failed_at": state.failed_at,
        "errors": list(state.errors),
    }


def admin_app(
    service: GuardService,
    opts: GuardOptions,
    reload: ReloadState | None = None,
    revocations: ReloadState | None = None,
    serving: asyncio.Event | None = None,
) -> web.Application:
    """``serving``: set once the gRPC port is served; until then both endpoints answer 503
    (the admin port is bound first, so that a taken one fails before the gRPC port is
    joined, and a 200 from /healthz or /metrics means the gRPC port is served)."""

    def starting() -> web.Response | None:
        if serving is None or serving.is_set():
            return None
        body = '{"status": "starting"}\n'
        return web.Response(status=503, text=body, content_type="application/json")

    async def metrics(_: web.Request) -> web.Response:
        if (early := starting()) is not None:
            return early
        body = generate_latest(service.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        if (early := starting()) is not None:
            return early
        # Liveness: the process serves. The backend's state is shown, not judged: a guard
        # restart would not bring Redis back, and fail-open/closed already decides.
        body: dict[str, object] = {
            "status": "ok",
            "grpc": "plaintext" if opts.tls_cert is None else "mtls",
            "http": opts.http_address,
            "insecure": opts.insecure,
            "backend": service.store.name,
            "backend_up": service.store.up(),
            "fail_open": service.config.fail_open,
            "limits": str(opts.limits) if opts.limits else None,
            "policy": str(opts.policy) if opts.policy else None,
            "domains": sorted(service.limits.domains),
            "rules": service.limits.rule_count(),
            # Endpoints and client ids only: never the client secret.
            "introspection": {
                name: {"endpoint": spec.endpoint, "client_id": spec.client_id}
                for name, spec in sorted(service.limits.introspection.items())
            },
        }
        if reload is not None:  # the limits' reloads (xdsplane.reload), as serve's /status
            body["limits_reload"] = _reload_json(reload)
        if revocations is not None:  # --revocations FILE
            body["revocations"] = str(opts.revocations)
            body["revocations_file_entries"] = len(service.revocations.from_file)
            body["revocations_reload"] = _reload_json(revocations)
        return web.Response(text=json.dumps(body) + "\n", content_type="application/json")

    # The same Host check (DNS rebinding) and security headers as serve's admin server.
    app = protect(web.Application())
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


def _grpc_server(
    opts: GuardOptions, service: GuardService, caller_check: CallerCheck | None
) -> grpc.aio.Server:
    # SO_REUSEPORT only among --workers: a second guard cannot share a port by mistake.
    reuse = 1 if opts.worker is not None else 0
    server = grpc.aio.server(options=[("grpc.so_reuseport", reuse)])
    server.add_generic_rpc_handlers(tuple(service.handlers(caller_check)))
    return server


async def _http_server(
    opts: GuardOptions, front: Front, context: ssl.SSLContext | None
) -> tuple[asyncio.Server, str]:
    """The HTTP front, bound and listening: the server and its address (HOST:PORT)."""
    assert opts.http_address is not None
    try:
        host, port = split_address(opts.http_address)
    except ValueError as e:
        raise GuardStartupError([f"--http-address: {e}"]) from None
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(
            front.protocol,
            host,
            port,
            ssl=context,
            reuse_port=opts.worker is not None,  # SO_REUSEPORT only among --workers
        )
    except OSError as e:
        raise GuardStartupError([f"cannot listen for HTTP on {opts.http_address}: {e}"]) from None
    bound = server.sockets[0].getsockname()[1]
    return server, f"{host}:{bound}"


async def _tls_follow(tls: GuardTls, context: ssl.SSLContext, stop: asyncio.Event) -> None:
    """The HTTP front's certificate follows the gRPC side's reloads (checked every second):
    new connections get the new certificate and key; a new client CA is added (a CA
    removed stays trusted by the HTTP front until the guard restarts)."""
    digest = tls.current.digest
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if tls.current.digest == digest:
            continue
        digest = tls.current.digest
        try:
            context.load_cert_chain(str(tls.cert), str(tls.key))
            context.load_verify_locations(str(tls.ca))
        except (OSError, ssl.SSLError) as e:
            logs.get("xdsplane.guard").warning("guard http tls not reloaded", error=str(e))


def _bind(server: grpc.aio.Server, address: str, host: str, port: int, tls: GuardTls | None) -> int:
    """Bind (and listen on) the gRPC port; the port bound."""
    try:  # grpcio raises RuntimeError when the port is taken
        if tls is not None:
            bound = server.add_secure_port(f"{_bracket(host)}:{port}", tls.credentials())
        else:
            bound = server.add_insecure_port(f"{_bracket(host)}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise GuardStartupError([f"cannot listen for gRPC on {address}"])
    return int(bound)


async def run(opts: GuardOptions) -> None:
    log = logs.get("xdsplane.guard")
    try:
        limits = retry_busy(lambda: load_all(opts.limits, opts.policy))
    except ConfigErrors as e:
        raise GuardStartupError([str(x) for x in e.errors]) from None
    except Refused as e:  # still being written after the busy budget
        raise GuardStartupError(e.errors) from None
    try:
        host, port = split_address(opts.address)
        admin_host, admin_port = split_address(opts.admin_address)
    except ValueError as e:
        raise GuardStartupError([str(e)]) from None
    if not opts.insecure and not is_loopback(admin_host):
        raise GuardStartupError(
            [
                f"--admin-address {opts.admin_address}: the admin HTTP (/metrics, /healthz) is "
                "plaintext and unauthenticated: keep it on loopback, or pass --insecure"
            ]
        )
    tls = guard_tls(opts)
    metrics = GuardMetrics()
    store = make_store(opts, metrics)
    if isinstance(store, RedisStore):
        try:
            await store.check_auth()
        except StoreAuthError as e:
            await store.close()
            hint = f" (--redis-password-file {opts.redis_password_file})"
            raise GuardStartupError(
                [str(e) + (hint if opts.redis_password_file else " (no password given)")]
            ) from None
    service = GuardService(store, limits, opts.config, metrics)
    caller_check = None
    if tls is not None:
        caller_check = CallerCheck(opts.client_sans, metrics.registry)

    if opts.worker is not None:
        worker_metric(metrics.registry, opts.worker)
    reloader = LimitsReloader(opts.limits, opts.policy, service)
    revoker: RevocationsReloader | None = None
    if opts.revocations is not None:
        revoker = RevocationsReloader(opts.revocations, service)
        try:
            service.revocations.set_file(retry_busy(revoker.load))
        except Refused as e:
            await store.close()
            raise GuardStartupError(e.errors) from None
        revoker.state.loaded, revoker.state.loaded_at = True, time.time()
    reloader.state.loaded, reloader.state.loaded_at = True, time.time()  # the startup load
    serving = asyncio.Event()
    runner = web.AppRunner(
        admin_app(service, opts, reloader.state, revoker.state if revoker else None, serving),
        access_log=None,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, admin_host, admin_port).start()
    except OSError as e:
        await runner.cleanup()
        await store.close()
        raise GuardStartupError([f"cannot listen for admin on {opts.admin_address}: {e}"]) from None
    # The gRPC port is bound last, once nothing else can fail, and served at once. A bound
    # socket listens: among --workers the kernel hands it new connections from then on, and
    # a worker that failed after binding would close it with those connections queued
    # (each reset). Binding last keeps a failing restart out of the SO_REUSEPORT group.
    server = _grpc_server(opts, service, caller_check)
    front: Front | None = None
    http: asyncio.Server | None = None
    http_bound: str | None = None
    context: ssl.SSLContext | None = None
    try:
        if opts.http_address is not None:
            front = Front(
                service,
                metrics.registry,
                caller_check.allows_der if caller_check is not None else None,
            )
            if tls is not None:
                context = server_context(str(tls.cert), str(tls.key), str(tls.ca))
            http, http_bound = await _http_server(opts, front, context)
        bound = _bind(server, opts.address, host, port, tls)
    except GuardStartupError:
        if http is not None:
            http.close()
        await runner.cleanup()
        await store.close()
        raise
    await server.start()
    serving.set()
    if opts.insecure:
        log.warning(
            "guard running with --insecure",
            grpc="plaintext: any caller that reaches it is served" if tls is None else "mtls",
            admin=opts.admin_address,
        )
    if tls is not None:
        tls.log_loaded("guard tls loaded", client_sans=list(opts.client_sans))
    skew, longest = service.token_bounds()
    log.info(
        "guard serving",
        grpc=f"{host}:{bound}",
        http=http_bound,
        tls="mtls" if tls is not None else "plaintext",
        admin=opts.admin_address,
        backend=store.name,
        redis=redact_url(opts.redis) if opts.redis else None,
        clock_skew=skew,
        fail_open=opts.config.fail_open,
        max_lifetime=longest,
        limits=str(opts.limits) if opts.limits else None,
        policy=str(opts.policy) if opts.policy else None,
        revocations=str(opts.revocations) if opts.revocations else None,
        rules=limits.rule_count(),
        worker=opts.worker,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    pending: set[asyncio.Future[Any]] = set()

    def on_sighup() -> None:
        tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(reloader.reload("SIGHUP"))]
        if tls is not None:
            tasks.append(asyncio.ensure_future(tls.reload("SIGHUP")))
        if revoker is not None:
            tasks.append(asyncio.ensure_future(revoker.reload("SIGHUP")))
        for t in tasks:
            pending.add(t)
            t.add_done_callback(pending.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    watchers = [asyncio.create_task(reloader.watch(stop))]
    if tls is not None:
        watchers.append(asyncio.create_task(tls.run(stop)))
    if revoker is not None:
        watchers.append(asyncio.create_task(revoker.watch(stop)))
    if front is not None:
        watchers.append(asyncio.create_task(front.sweeping(stop)))
    if tls is not None and context is not None:
        watchers.append(asyncio.create_task(_tls_follow(tls, context, stop)))
    try:
        await stop.wait()
    finally:
        for w in watchers:
            w.cancel()
        log.info("guard stopping")
        if http is not None:
            http.close()
        await server.stop(opts.grace_seconds)
        await runner.cleanup()
        await service.close()
        await store.close()
        log.info("guard stopped")

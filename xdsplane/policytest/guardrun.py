"""The guard of the run: ``xdsplane guard``'s service (replay protection, global rate limits
from the same policy folder) with a memory store, served over gRPC from a thread, and over
its HTTP front too when the policy's guard has ``transport: http``.

Over mutual TLS when the policy's guard cluster speaks TLS: the guard's certificate is one
of the run's CA naming what the cluster checks, and it admits only the certificate Envoy
presents there (its stand-in's URI SANs), as ``xdsplane guard --client-san`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc

from xdsplane.config.errors import ConfigErrors
from xdsplane.guard.httpfront import Front, server_context
from xdsplane.guard.policy import limits_from_policy
from xdsplane.guard.service import GuardConfig, GuardMetrics, GuardService
from xdsplane.guard.store import MemoryStore
from xdsplane.guard.tls import CallerCheck
from xdsplane.policytest.hermetic import PolicyTestError

START_SECONDS = 30.0


class _Quiet:
    """The run's guard logs nothing: its refusals are what the cases expect, and its log
    lines name token ids."""

    def __getattr__(self, level: str) -> Any:
        return lambda *args, **kwargs: None


class RunGuard:
    def __init__(
        self,
        folder: Path,
        tls: tuple[Path, Path, Path] | None,  # certificate, key, client CA
        client_sans: tuple[str, ...] = (),
        http: bool = False,
    ) -> None:
        try:
            limits = limits_from_policy(folder)
        except ConfigErrors as e:
            raise PolicyTestError([str(x) for x in e.errors]) from None
        metrics = GuardMetrics()
        self.service = GuardService(MemoryStore(), limits, GuardConfig(), metrics)
        self.service.log = _Quiet()
        self.check = CallerCheck(client_sans, metrics.registry) if tls is not None else None
        self.tls = tls
        self.port = 0
        self.http = http
        self.http_port = 0
        self.http_server: asyncio.Server | None = None
        self.loop = asyncio.new_event_loop()
        self.server: Any = None
        self.thread = threading.Thread(target=self.loop.run_forever, name="guard", daemon=True)

    async def _start(self) -> int:
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.server.add_generic_rpc_handlers(tuple(self.service.handlers(self.check)))
        if self.tls is not None:
            cert, key, ca = (p.read_bytes() for p in self.tls)
            creds = grpc.ssl_server_credentials(
                [(key, cert)], root_certificates=ca, require_client_auth=True
            )
            port = self.server.add_secure_port("127.0.0.1:0", creds)
        else:
            port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        if self.http:
            front = Front(
                self.service,
                self.service.metrics.registry,
                self.check.allows_der if self.check is not None else None,
            )
            context = None
            if self.tls is not None:
                context = server_context(*(str(p) for p in self.tls))
            self.http_server = await asyncio.get_running_loop().create_server(
                front.protocol, "127.0.0.1", 0, ssl=context
            )
            self.http_port = int(self.http_server.sockets[0].getsockname()[1])
        return int(port)

    def start(self) -> RunGuard:
        self.thread.start()
        future: Future[int] = asyncio.run_coroutine_threadsafe(self._start(), self.loop)
        self.port = future.result(START_SECONDS)
        if not self.port:
            raise PolicyTestError(["the run's guard could not listen on 127.0.0.1"])
        return self

    def close(self) -> None:
        if self.thread.is_alive():
            if self.http_server is not None:
                self.loop.call_soon_threadsafe(self.http_server.close)
            if self.server is not None:
                with_stop = asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop)
                with contextlib.suppress(Exception):  # stopping: nothing left to report
                    with_stop.result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()

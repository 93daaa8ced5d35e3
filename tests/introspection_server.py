"""A real RFC 7662 introspection endpoint for tests: Authlib's ``IntrospectionEndpoint`` in
Authlib's Flask ``AuthorizationServer``, served by Werkzeug over TLS on 127.0.0.1 (a free
port) from a thread, stopped by its handle (``close``).

Authlib does the protocol: client authentication (``client_secret_basic``, its own parsing
and secret check), the form parameters, ``token_type_hint``, the ``active`` answer and
the payload. The test owns the token store: ``issue`` adds an active token, ``deactivate``
revokes one (Authlib then answers ``{"active": false}``), and ``asked`` lists the tokens
the endpoint was asked about, in order.
"""

from __future__ import annotations

import secrets
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, TokenMixin
from authlib.oauth2.rfc7662 import IntrospectionEndpoint
from flask import Flask
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

HOST = "127.0.0.1"
ISSUER = "https://idp.example.com"


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    client_secret: str

    def get_client_id(self) -> str:
        return self.client_id

    def check_client_secret(self, client_secret: str) -> bool:
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "client_secret_basic" and endpoint == "introspection"


@dataclass
class Token(TokenMixin):  # type: ignore[misc]
    access_token: str
    client_id: str
    sub: str
    scope: str
    issued_at: int
    expires_in: int
    audience: str = "billing"
    revoked: bool = False

    def check_client(self, client: Any) -> bool:
        return True

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.revoked


@dataclass
class Store:
    tokens: dict[str, Token] = field(default_factory=dict)
    asked: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_app(store: Store, client: Client) -> Flask:
    app = Flask("introspection-test")

    class Endpoint(IntrospectionEndpoint):  # type: ignore[misc]
        def query_token(self, token_string: str, token_type_hint: str | None) -> Token | None:
            with store.lock:
                store.asked.append(token_string)
                return store.tokens.get(token_string)

        def check_permission(self, token: Token, client: Client, request: Any) -> bool:
            return True

        def introspect_token(self, token: Token) -> dict[str, Any]:
            return {
                "active": True,
                "client_id": token.client_id,
                "token_type": "Bearer",
                "scope": token.scope,
                "sub": token.sub,
                "aud": token.audience,
                "iss": ISSUER,
                "exp": token.issued_at + token.expires_in,
                "iat": token.issued_at,
            }

    server = AuthorizationServer(
        app,
        query_client=lambda cid: client if cid == client.client_id else None,
        save_token=lambda token, request: None,
    )
    server.register_endpoint(Endpoint)

    @app.route("/introspect", methods=["POST"])
    def introspect() -> Any:
        return server.create_endpoint_response(Endpoint.ENDPOINT_NAME)

    return app


class _Quiet(WSGIRequestHandler):
    def log_request(self, *args: Any) -> None:
        pass


class IntrospectionServer:
    """Authlib's endpoint at ``url`` (https://127.0.0.1:PORT/introspect), TLS with
    ``cert``/``key``; ``client_id``/``client_secret`` is the one client it knows."""

    def __init__(
        self, cert: Path, key: Path, client_id: str = "edge", client_secret: str | None = None
    ) -> None:
        self.client = Client(client_id, client_secret or secrets.token_urlsafe(24))
        self.store = Store()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        self.server: BaseWSGIServer = make_server(
            HOST,
            0,
            make_app(self.store, self.client),
            threaded=True,
            ssl_context=ctx,
            request_handler=_Quiet,
        )
        self.port = self.server.server_port
        self.url = f"https://{HOST}:{self.port}/introspect"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def issue(
        self, sub: str, scope: str = "billing:read", ttl: int = 300, audience: str = "billing"
    ) -> str:
        """A new active opaque token (random, not a JWT)."""
        value = secrets.token_urlsafe(32)
        token = Token(value, self.client.client_id, sub, scope, int(time.time()), ttl, audience)
        with self.store.lock:
            self.store.tokens[value] = token
        return value

    def deactivate(self, token: str) -> None:
        with self.store.lock:
            self.store.tokens[token].revoked = True

    def asked(self) -> list[str]:
        with self.store.lock:
            return list(self.store.asked)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

"""Nothing secret is printed, and nothing a client sends can drive the operator's terminal.

An attacker's view: a hostile policy (a PEM private key and a JWT pasted where file names
belong, a GenericSecret, a symmetric ``kty: oct`` JWKS key, a password) and a hostile ADS
client (a node id and a NACK text full of terminal escapes, a NACK quoting a key) against a
real ``xdsplane serve``. Every output surface is then grepped, as bytes, for the key
material, the token text and the control bytes: ``validate``, ``render``, ``diff``, serve's
log (JSON and console), ``/status``, the HTML page and ``xdsplane status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from ads_client import Stream
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from harness import HOST, ProcessGroup, XdsServer, http_get, wait_until, xdsplane_argv

from xdsplane.redact import escape_control, quote, scrub, scrub_message

# -- the hostile material ---------------------------------------------------------------------


def _private_key() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


KEY = _private_key()
KEY_LINES = [ln for ln in KEY.splitlines() if ln and not ln.startswith("-----")]
# A JWT as a client would hold it; its payload and signature must never be printed.
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiJhbGljZSIsImF1ZCI6ImJpbGxpbmcifQ."
    "Q2xpZW50U2lnbmF0dXJlVmFsdWVOb3RUb0JlU2hvd24"
)
JWT_PARTS = JWT.split(".")[1:]
OCT_K = "c3ltbWV0cmljLWhtYWMta2V5LW9jdC1kbzEtbm90LXByaW50"  # a kty oct JWK's k
GENERIC = "generic-secret-value-7f3a"  # short, plain text: no pattern would catch it
PASSWORD = "hunter2-password-9d1c"

# Terminal control from a client: clear screen, bell, carriage return, OSC title, bidi.
NODE = "edge-\x1b[2J\x07evil\r\u202e"
NACK = f"rejected \x1b[31mred\x1b[0m\x07\r\x1b]0;pwned\x07 {KEY} token {JWT}"
CONTROL_BYTES = [b"\x1b", b"\x07", b"\r", "\u202e".encode()]

LISTENER_PORT = 18  # never bound: the folder is only served to scripted clients


def _jwks() -> str:
    return json.dumps(
        {"keys": [{"kty": "oct", "kid": "hmac-1", "alg": "HS256", "k": OCT_K, "use": "sig"}]}
    )


def good_policy(
    generic: str = GENERIC, password: str = PASSWORD, body: str = "ok"
) -> dict[str, Any]:
    return {
        "nodes": ["edge-*"],
        "jwt_providers": {
            "idp": {
                "issuer": "https://idp.example.com",
                "audiences": ["billing"],
                "jwks_file": "jwks.json",
            }
        },
        "listeners": [
            {
                "name": "http",
                "address": f"127.0.0.1:{LISTENER_PORT}",
                "hosts": [
                    {
                        "name": "web",
                        "domains": ["web.example.com"],
                        "routes": [
                            {
                                "prefix": "/",
                                "jwt": "idp",
                                "direct_response": {"status": 200, "body": body},
                            }
                        ],
                    }
                ],
            }
        ],
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": "api-token",
                "generic_secret": {"secret": {"inline_string": generic}},
            },
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": "many",
                "generic_secret": {"secrets": {"a": {"inline_string": generic + "-map"}}},
            },
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": "raw-key",
                "tls_certificate": {
                    "private_key": {"inline_string": KEY},
                    "password": {"inline_string": password},
                },
            },
        ],
    }


def hostile_edit() -> dict[str, Any]:
    """A file that does not load, for the reasons an operator pasting secrets causes."""
    return {
        "secrets": {
            # the key itself where its file name belongs; a token where a certificate's is
            "pasted": {"certificate": JWT, "private_key": KEY},
            # a raw key value where a CA file name belongs
            "blob": {"ca": OCT_K},
        }
    }


def hostile_resource() -> dict[str, Any]:
    """A raw Secret of the wrong shape: its value must not be quoted in the error."""
    return {
        "resources": [
            {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                "name": "wrong-shape",
                "generic_secret": {"secret": PASSWORD},  # a string where a DataSource goes
            }
        ],
    }


def write_folder(folder: Path, policy: dict[str, Any], jwks: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "jwks.json").write_text(jwks or _jwks())
    (folder / "edge.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    return folder


SECRETS: list[str] = [*KEY_LINES, *JWT_PARTS, OCT_K, GENERIC, PASSWORD]


def assert_clean(surface: str, data: bytes, pem: bool = True) -> None:
    """No secret, no token text, no control byte in ``data`` (one output surface)."""
    for secret in SECRETS:
        assert secret.encode() not in data, f"{surface} prints a secret: {secret[:12]}..."
    assert b"PRIVATE KEY-----" not in data, f"{surface} prints a PEM private key"
    if pem:
        assert b"-----BEGIN" not in data, f"{surface} prints a PEM block"
    for byte in CONTROL_BYTES:
        assert byte not in data, f"{surface} emits control byte {byte!r}"


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(xdsplane_argv(*args), capture_output=True, timeout=60, check=False)


# -- validate, render, diff -------------------------------------------------------------------


def test_validate_never_echoes_pasted_keys_or_tokens(tmp_path: Path) -> None:
    text = ""
    for name, edit in (("secrets", hostile_edit()), ("raw", hostile_resource())):
        folder = write_folder(tmp_path / name, good_policy())
        (folder / "pasted.yaml").write_text(yaml.safe_dump(edit, sort_keys=False))
        r = cli("validate", str(folder))
        assert r.returncode == 1, r.stdout + r.stderr
        assert_clean("xdsplane validate", r.stdout + r.stderr)
        text += r.stdout.decode()
    # each error still names its file, line and field, and what stood there
    assert re.search(r"pasted\.yaml:\d+:\d+: private_key: cannot read .*<redacted PEM", text)
    assert re.search(r"pasted\.yaml:\d+:\d+: certificate: cannot read .*<redacted sha256:", text)
    assert re.search(r"pasted\.yaml:\d+:\d+: ca: cannot read .*<redacted sha256:", text)
    assert re.search(r"pasted\.yaml:\d+:\d+: secret: expected a mapping, got <redacted", text)


def test_error_messages_cut_long_values_and_escape_control_characters(tmp_path: Path) -> None:
    long_name = "x" * 5000
    policy = {
        "nodes": ["edge-*"],
        "upstreams": {"api": {"endpoints": ["127.0.0.1:1"], "connect_timeout": long_name}},
    }
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "p.yaml").write_text(
        yaml.safe_dump(policy) + 'listeners: [{name: "a\\e[2Jb", address: 1}]\n'
    )
    r = cli("validate", str(folder))
    assert r.returncode == 1
    assert b"\x1b" not in r.stdout
    lines = r.stdout.decode().splitlines()
    duration = next(ln for ln in lines if "not a duration" in ln)
    assert "xxxx..." in duration and "(5000 characters)" in duration
    assert len(duration) < 400, duration
    assert any("\\x1b[2J" in ln for ln in lines), lines


def test_render_shows_fingerprints_not_secrets(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "p", good_policy())
    r = cli("render", str(folder), "--node", "edge-1")
    assert r.returncode == 0, r.stderr
    assert_clean("xdsplane render", r.stdout + r.stderr)
    out = json.loads(r.stdout)
    sds = {s["name"]: s["resource"] for s in out["resources"]["SDS"]["resources"]}
    mark = re.compile(r"<redacted sha256:[0-9a-f]{8}\.\.\.>")
    assert mark.fullmatch(sds["api-token"]["generic_secret"]["secret"])
    assert mark.fullmatch(sds["many"]["generic_secret"]["secrets"])
    assert mark.fullmatch(sds["raw-key"]["tls_certificate"]["private_key"])
    assert mark.fullmatch(sds["raw-key"]["tls_certificate"]["password"])
    (ecds,) = out["resources"]["ECDS"]["resources"]
    providers = ecds["resource"]["typed_config"]["providers"]
    jwks = json.loads(providers["idp"]["local_jwks"]["inline_string"])
    (key,) = jwks["keys"]
    assert key["kty"] == "oct" and key["kid"] == "hmac-1"  # what it is stays visible
    assert mark.fullmatch(key["k"])


def test_diff_says_which_secret_changed_without_printing_it(tmp_path: Path) -> None:
    old = write_folder(tmp_path / "old", good_policy())
    new_k = OCT_K[::-1]
    SECRETS.append(new_k)
    try:
        new = write_folder(
            tmp_path / "new",
            good_policy(
                generic=GENERIC + "-rotated",
                password=PASSWORD + "-rotated",
                body="changed \x1b[2J\x07\u202e",  # diff prints it: escaped
            ),
            jwks=_jwks().replace(OCT_K, new_k),
        )
        for extra in ([], ["--unified"]):
            r = cli("diff", str(old), str(new), *extra)
            assert r.returncode == 0, r.stderr
            assert_clean(f"xdsplane diff {extra}", r.stdout + r.stderr)
            text = r.stdout.decode()
            for changed in ("SDS api-token", "SDS many", "SDS raw-key", "ECDS"):
                assert changed in text, text
            fingerprints = set(re.findall(r"<redacted sha256:([0-9a-f]{8})\.\.\.>", text))
            assert len(fingerprints) >= 6, text  # old and new of each changed secret
            assert "secret" in text and "password" in text
            assert "\\u001b[2J" in text or "\\x1b[2J" in text, text
    finally:
        SECRETS.remove(new_k)


# -- serve: logs, /status, the page, xdsplane status ------------------------------------------

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"


async def _hostile_client(address: str) -> None:
    """Subscribe with a hostile node id, then NACK with a hostile error text."""
    async with grpc.aio.insecure_channel(address) as channel:
        stream = Stream.open(channel, "sotw")
        node = base_pb2.Node(id=NODE, cluster="edge")
        await stream.write(discovery_pb2.DiscoveryRequest(node=node, type_url=LDS))
        first = await stream.read(20)
        await stream.write(
            discovery_pb2.DiscoveryRequest(
                node=node,
                type_url=LDS,
                response_nonce=first.nonce,
                error_detail=status_pb2.Status(code=3, message=NACK),
            )
        )
        await asyncio.Event().wait()  # stays open while the test reads the surfaces


def _run_client(address: str) -> Any:
    import threading

    loop = asyncio.new_event_loop()
    task: list[asyncio.Task[None]] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        task.append(loop.create_task(_hostile_client(address)))
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            loop.run_until_complete(task[0])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def stop() -> None:
        loop.call_soon_threadsafe(lambda: task and task[0].cancel())
        thread.join(10)

    return stop


@pytest.mark.parametrize("log_format", ["json", "console"])
def test_serve_surfaces_print_no_secret_and_no_client_control_bytes(
    log_format: str, procs: ProcessGroup, tmp_path: Path
) -> None:
    folder = write_folder(tmp_path / "p", good_policy())
    server = XdsServer(procs, folder, extra_args=["--log-format", log_format]).start()
    admin = server.admin_port
    stop = _run_client(server.xds_address)
    try:
        wait_until(lambda: server.status()["nacks"], 20, what="the hostile NACK in /status")
        (folder / "pasted.yaml").write_text(yaml.safe_dump(hostile_edit(), sort_keys=False))
        wait_until(lambda: server.status()["reload"]["errors"], 20, what="the refused edit")
        log_text = lambda: server.proc.log_path.read_bytes()  # noqa: E731
        wait_until(lambda: b"nack" in log_text() and b"reload failed" in log_text(), 10)

        status = http_get(admin, "/status")
        assert status.status == 200
        page = http_get(admin, "/")
        assert page.status == 200
        metrics = http_get(admin, "/metrics")
        assert metrics.status == 200
        text = cli("status", "--admin-address", f"{HOST}:{admin}")
        assert text.returncode == 0, text.stderr
        raw = cli("status", "--admin-address", f"{HOST}:{admin}", "--json")
        assert raw.returncode == 0, raw.stderr
        log = log_text()
    finally:
        stop()

    assert_clean("/status", status.body)
    assert_clean("the status page", page.body)
    assert_clean("/metrics", metrics.body)
    assert_clean("xdsplane status", text.stdout + text.stderr)
    assert_clean("xdsplane status --json", raw.stdout + raw.stderr)
    assert_clean(f"serve's {log_format} log", log)

    # What was there is still visible, escaped: the node id, the NACK, the errors.
    doc = json.loads(status.body)
    assert NODE in doc["nacks"]  # /status is JSON: the id as sent, escaped by JSON
    (nack,) = doc["nacks"][NODE].values()
    assert "<redacted PEM block (private key)>" in nack["message"]
    assert any("private_key: cannot read" in e for e in doc["reload"]["errors"])
    shown = escape_control(NODE)
    assert shown.encode() in text.stdout, text.stdout
    assert b"\\x1b[31mred" in text.stdout
    assert shown.replace("&", "&amp;").encode() in page.body
    # the node label, escaped (and its backslashes doubled by the exposition format)
    assert shown.replace("\\", "\\\\").encode() in metrics.body
    if log_format == "console":
        assert shown.encode() in log
        assert b"\\x1b[31mred" in log
    else:
        events = [json.loads(ln) for ln in log.splitlines() if ln.startswith(b"{")]
        assert any(e.get("node") == NODE for e in events)


# -- the functions themselves -----------------------------------------------------------------


def test_scrub_catches_key_material_in_any_spelling() -> None:
    for text in (KEY, repr(KEY), KEY[:100], json.dumps(KEY), f"x {JWT} y"):
        out = scrub(text)
        assert all(ln not in out for ln in KEY_LINES[1:]) and "PRIVATE KEY--" not in out
        assert all(p not in out for p in JWT_PARTS)
    assert scrub("../certs/edge.key") == "../certs/edge.key"
    path = "/srv/Configs/Edge2024Certificates/server.pem"
    assert scrub(path) == path  # a file name is not taken for a key
    assert scrub("0123456789abcdef" * 4) == "0123456789abcdef" * 4  # a hex digest stays


def test_quote_hides_secret_fields_and_cuts() -> None:
    assert quote("hunter2", field="password").startswith("<redacted sha256:")
    assert quote("hunter2", field="client_secret").startswith("<redacted sha256:")
    assert quote("../k.pem", field="private_key") == "'../k.pem'"  # a file name
    assert quote("y" * 500).endswith("(500 characters)")
    assert scrub_message("got '" + "z" * 300 + "'").endswith("(300 characters)")
    assert escape_control("a\x1b[2Jb\u202e\n") == "a\\x1b[2Jb\\u202e\\x0a"


def test_render_redacts_auth_headers_and_key_sets_as_bytes() -> None:
    import base64

    from xdsplane.render import redact

    headers = redact(
        {
            "request_headers_to_add": [
                {"header": {"key": "Authorization", "value": f"Bearer {JWT}"}},
                {"header": {"key": "x-api-key", "value": PASSWORD}},
                {"header": {"key": "x-trace", "value": "1"}},
            ]
        }
    )
    shown = json.dumps(headers)
    assert JWT_PARTS[1] not in shown and PASSWORD not in shown
    assert headers["request_headers_to_add"][2]["header"]["value"] == "1"  # not a secret
    jwks = base64.b64encode(_jwks().encode()).decode()
    out = json.dumps(redact({"local_jwks": {"inline_bytes": jwks}}))
    assert jwks not in out and "<redacted sha256:" in out


def test_a_huge_nack_text_is_cut_in_logs_and_status(capsys: pytest.CaptureFixture[str]) -> None:
    from xdsplane import logs
    from xdsplane.admin import _scrubbed
    from xdsplane.redact import MAX_TEXT

    huge = "nack " + "x" * 1_000_000
    shown = _scrubbed({"nacks": {"edge-1": {"LDS": {"message": huge}}}})
    assert len(shown["nacks"]["edge-1"]["LDS"]["message"]) < MAX_TEXT + 100
    import structlog

    logs.configure("info", json=False)
    try:
        logs.get("t").warning("nack", error=huge, node=NODE)
    finally:
        structlog.reset_defaults()
    err = capsys.readouterr().err
    assert len(err) < MAX_TEXT + 500 and "(1000005 characters)" in err
    assert "\x1b" not in err and escape_control(NODE) in err

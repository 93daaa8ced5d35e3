"""Resources built from each policy part, cached by the part's content (the translate step).

A reload re-translates and re-serializes only the parts that changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from operator import is_
from typing import Any

from pydantic import BaseModel

from xdsplane.policy import grpc_providers, translate
from xdsplane.policy.grpc_check import grpc_upstreams
from xdsplane.policy.jsonmemo import JsonMemo
from xdsplane.policy.merge import GroupPolicy, Origin
from xdsplane.policy.model import Guard, Host, Listener
from xdsplane.policy.translate import Built, guard, introspection, jwt, ratelimit, routes
from xdsplane.policy.translate.secrets import paths
from xdsplane.snapshot import Resource, digest, make_resource

_Same = tuple[object, object, tuple[str | int, ...], tuple[str, str], list[Resource]]
_LSame = tuple[object, object, tuple[str | int, ...], str, tuple[str, str], list[Resource]]


class TranslationCache:
    """Resources built from each policy part, reused while the part is unchanged.

    A part's key is its canonical JSON (plus the digests of the files a secret names), so
    a one-route edit re-translates and re-serializes only the listener holding that route.
    Entries unused by the latest build are dropped.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], list[Resource]] = {}
        self._used: dict[tuple[str, str], list[Resource]] = {}
        self.hits = 0
        self.misses = 0
        # A part's JSON and an origin's source, by the identity of the (frozen) model and
        # of the document: a file that did not change gives the very same objects, so a
        # reload does not dump every part of the policy again to find what changed. Each
        # entry keeps its object alive: its id cannot be reused while it is cached.
        self._dumps: JsonMemo[BaseModel] = JsonMemo()
        self._sources: dict[tuple[int, tuple[str | int, ...]], tuple[object, str]] = {}
        self._sources_used: dict[tuple[int, tuple[str | int, ...]], tuple[object, str]] = {}
        # What the translation asks of each listener's routes, by the listener's identity.
        self._facts: dict[int, tuple[Listener, _Facts]] = {}
        self._facts_used: dict[int, tuple[Listener, _Facts]] = {}
        # Each host's VirtualHost, by its JSON and what else virtual_host takes: an edit
        # re-translates only the host it is in, not every route of its listener.
        self._vhosts: dict[tuple[str, bool, bool, str, str], Any] = {}
        self._vhosts_used: dict[tuple[str, bool, bool, str, str], Any] = {}
        # upstream name -> (its model, document, keys, cache key, resources) last time
        self._same: dict[str, _Same] = {}
        self._same_used: dict[str, _Same] = {}
        # listener name -> (its model, document, keys, the rest of its key, key, resources)
        self._lsame: dict[str, _LSame] = {}
        self._lsame_used: dict[str, _LSame] = {}
        # the upstreams' names in order -> what the upstreams gave last time (``_upstreams``)
        self._blocks: dict[tuple[str, ...], _Block] = {}
        self._blocks_used: dict[tuple[str, ...], _Block] = {}

    def _json(self, model: BaseModel) -> str:
        return self._dumps.json(model)

    def _listener_json(self, listener: Listener) -> str:
        """A listener's JSON as its cache key: its own fields, then each host's JSON, kept by
        the host's identity (an edited file keeps the models of the hosts that did not
        change: only the edited host is dumped, not the whole listener)."""
        hosts = ",".join([self._json(h) for h in listener.hosts])
        return f"{listener.model_dump_json(exclude={'hosts'})}[{hosts}]"

    def _facts_of(self, listener: Listener) -> _Facts:
        key = id(listener)
        hit = self._facts_used.get(key) or self._facts.get(key)
        if hit is None or hit[0] is not listener:
            hosts = listener.hosts
            facts = _Facts(
                jwt.listener_providers(listener),
                introspection.providers_of(hosts),
                guard.needs_ext_authz(hosts) or ratelimit.needs_global(hosts),
            )
            hit = (listener, facts)
        self._facts_used[key] = hit
        return hit[1]

    def _vhost(
        self, host: Host, jwt_filter: bool, ext_authz: bool, listener: str, spec: Guard | None
    ) -> Any:
        # The guard's JSON (its transport decides the per-route config) where routes ask it.
        asked = self._json(spec) if ext_authz and spec is not None else ""
        key = (self._json(host), jwt_filter, ext_authz, listener, asked)
        found = self._vhosts_used.get(key)
        if found is None:
            found = self._vhosts.get(key)
            if found is None:
                found = routes.virtual_host(host, jwt_filter, ext_authz, listener, spec)
            self._vhosts_used[key] = found
        return found

    def _source(self, origin: Origin) -> str:
        key = (id(origin.doc), origin.keys)
        hit = self._sources_used.get(key) or self._sources.get(key)
        if hit is None or hit[0] is not origin.doc:
            hit = (origin.doc, origin.source)
        self._sources_used[key] = hit
        return hit[1]

    def _get(
        self,
        key: tuple[str, str],
        source: str,
        build: Callable[[], list[Built]],
        previous: list[Resource] | None = None,
    ) -> list[Resource]:
        """The part's resources, from the cache or built; ``previous``: what the part gave
        last time, whose resources that come out the same (same bytes, same source) are
        given again, the very objects (what is served and versioned does not change)."""
        found = self._used.get(key) or self._entries.get(key)
        if found is None:
            self.misses += 1
            found = [make_resource(b.type, b.message, self._source(b.origin)) for b in build()]
            if previous:
                found = _same_as_before(found, previous)
        else:
            self.hits += 1
            if found and found[0].source != source:
                found = [replace(r, source=source) for r in found]
        self._used[key] = found
        return found

    def translate(self, policy: GroupPolicy, files: Mapping[str, bytes]) -> list[Resource]:
        out: list[Resource] = []
        grpc_ups = grpc_upstreams(policy)
        sds = grpc_providers.sds_secrets(policy)  # gRPC reads certificate providers, never SDS
        for name, spart in sorted(policy.secrets.items()):
            if name not in sds:
                continue
            parts = [self._json(spart.value), str(spart.origin.folder)]
            parts += [digest(files[p]) for p in paths(spart.value, spart.origin.folder).values()]
            key = ("secret:" + name, "|".join(parts))
            out += self._get(
                key,
                self._source(spart.origin),
                lambda n=name, sp=spart: translate.secret_resources(n, sp, files),  # type: ignore[misc]
            )
        out += self._upstreams(policy, grpc_ups)
        for sname, gpart_ in sorted(policy.grpc_services.items()):
            out += self._get(
                ("grpc:" + sname, self._json(gpart_.value)),
                self._source(gpart_.origin),
                lambda sp=gpart_: translate.grpc_service_resources(sp),  # type: ignore[misc]
            )
        gpart = policy.guard
        if gpart is not None:
            out += self._get(
                ("guard", self._json(gpart.value)),
                self._source(gpart.origin),
                lambda gp=gpart: translate.guard_resources(gp),  # type: ignore[misc]
            )
        log = policy.access_log.value if policy.access_log is not None else None
        log_key = self._json(log) if log is not None else ""
        log_part = policy.access_log
        if log_part is not None and log_part.value.otlp is not None:
            # The OTLP collector's cluster (the listeners' loggers send to it).
            out += self._get(
                ("otlp", log_key),
                self._source(log_part.origin),
                lambda: translate.otlp_resources(log_part),
            )
        providers = translate.jwt_providers(policy, files)
        guard_spec = gpart.value if gpart is not None else None
        # The JWT providers (key sets included) are one ECDS resource, not in the listeners.
        facts = {lname: self._facts_of(lpart.value) for lname, lpart in policy.listeners.items()}
        jwt_names = sorted({n for f in facts.values() for n in f.jwt})
        if jwt_names:
            jwt_key = "".join(
                f"|{n}:{self._json(providers[n].spec)}:{digest(providers[n].jwks)}"
                for n in jwt_names
            )
            out += self._get(
                ("jwt", jwt_key),
                self._source(policy.jwt_providers[jwt_names[0]].origin),
                lambda: translate.jwt_resources(policy, providers),
            )
        for lname, lpart in sorted(policy.listeners.items()):
            # A listener names the JWT providers its routes use (for the claim headers).
            lfacts = facts[lname]
            jwt_key = "".join(f"|{n}:{self._json(providers[n].spec)}" for n in lfacts.jwt)
            # ... and the guard, when a route of it is replay-protected or globally limited.
            guard_key = ""
            # ... and its introspection providers (forwarded headers, the guard's timeout).
            introspected = {
                n: policy.introspection_providers[n].value
                for n in lfacts.introspection
                if n in policy.introspection_providers
            }
            intro_key = "".join(f"|{n}:{self._json(p)}" for n, p in introspected.items())
            if guard_spec is not None and lfacts.guard:
                guard_key = "|guard:" + self._json(guard_spec)
            extra = log_key + jwt_key + guard_key + intro_key
            origin = lpart.origin
            lsame = self._lsame_used.get(lname) or self._lsame.get(lname)
            if (
                lsame is not None
                and lsame[0] is lpart.value
                and lsame[1] is origin.doc
                and lsame[2] == origin.keys
                and lsame[3] == extra
            ):
                # The very listener of the very document, with the same providers, guard
                # and log: its resources as they were (the key, with the listener's whole
                # JSON, is not made and hashed again).
                self.hits += 1
                self._used[lsame[4]] = lsame[5]
                self._lsame_used[lname] = lsame
                out += lsame[5]
                continue
            key = ("listener:" + lname, self._listener_json(lpart.value) + extra)
            found = self._get(
                key,
                self._source(origin),
                lambda lp=lpart, i=introspected: translate.listener_resources(  # type: ignore[misc]
                    lp, log, providers, guard_spec, i, self._vhost
                ),
                lsame[5] if lsame is not None else None,
            )
            self._lsame_used[lname] = (lpart.value, origin.doc, origin.keys, extra, key, found)
            out += found
        for sname, srv in sorted(policy.grpc_servers.items()):
            out += self._get(
                ("grpc_server:" + sname, self._json(srv.value)),
                self._source(srv.origin),
                lambda sp=srv: translate.grpc_server_resources(sp),  # type: ignore[misc]
            )
        return out

    def _upstreams(self, policy: GroupPolicy, grpc_ups: set[str]) -> list[Resource]:
        """Every upstream's resources, in order of name. The very parts of the last load
        (merge.py gives an unchanged document's parts again, the same objects), with the
        same gRPC upstreams, give the resources they gave, without a look at each one."""
        parts = tuple(policy.upstreams.values())
        names = tuple(policy.upstreams)
        block = self._blocks_used.get(names) or self._blocks.get(names)
        if block is not None and block.grpc == grpc_ups and _same_objects(block.parts, parts):
            self.hits += len(parts)
            self._used.update(block.used)
            self._same_used.update(block.same)
            self._blocks_used[names] = block
            return block.out
        block = _Block(parts, set(grpc_ups), [], {}, {})
        self._each_upstream(policy, grpc_ups, block)
        self._blocks_used[names] = block
        return block.out

    def _each_upstream(self, policy: GroupPolicy, grpc_ups: set[str], block: _Block) -> None:
        """Fills ``block`` (and records in it the cache entries it used)."""
        out = block.out
        for name, upart in sorted(policy.upstreams.items()):
            if name in grpc_ups:
                gkey = ("grpc-upstream:" + name, self._json(upart.value))
                out += self._get(
                    gkey,
                    self._source(upart.origin),
                    lambda n=name, up=upart: translate.grpc_upstream_resources(n, up),  # type: ignore[misc]
                )
                block.used[gkey] = self._used[gkey]
                continue
            origin = upart.origin
            same = self._same_used.get(name) or self._same.get(name)
            if (
                same is not None
                and same[0] is upart.value
                and same[1] is origin.doc
                and same[2] == origin.keys
            ):
                # The very part of the very document as last time: its resources as they
                # were (same key, same source), without its key and source made again.
                self.hits += 1
                self._used[same[3]] = block.used[same[3]] = same[4]
                self._same_used[name] = block.same[name] = same
                out += same[4]
                continue
            key = ("upstream:" + name, self._json(upart.value))
            found = self._get(
                key,
                self._source(origin),
                lambda n=name, up=upart: translate.upstream_resources(n, up),  # type: ignore[misc]
            )
            block.used[key] = found
            self._same_used[name] = block.same[name] = (
                upart.value,
                origin.doc,
                origin.keys,
                key,
                found,
            )
            out += found

    def sweep(self) -> None:
        """Keep only what the latest build used."""
        self._entries, self._used = self._used, {}
        self._dumps.next_load()
        self._sources, self._sources_used = self._sources_used, {}
        self._facts, self._facts_used = self._facts_used, {}
        self._vhosts, self._vhosts_used = self._vhosts_used, {}
        self._same, self._same_used = self._same_used, {}
        self._lsame, self._lsame_used = self._lsame_used, {}
        self._blocks, self._blocks_used = self._blocks_used, {}


@dataclass(frozen=True, slots=True)
class _Facts:
    """What a listener's routes ask of the rest of the translation."""

    jwt: list[str]  # the JWT providers they name, sorted
    introspection: list[str]  # the introspection providers they name, sorted
    guard: bool  # a route needs the guard (ext_authz or a global rate limit)


@dataclass(frozen=True, slots=True)
class _Block:
    """What a group's upstreams gave: their parts, the gRPC upstreams among them, their
    resources, and the cache entries they used (carried over when the block is reused)."""

    parts: tuple[object, ...]
    grpc: set[str]
    out: list[Resource]
    used: dict[tuple[str, str], list[Resource]]
    same: dict[str, _Same]


def _same_objects(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return len(a) == len(b) and all(map(is_, a, b))


def _same_as_before(found: list[Resource], previous: list[Resource]) -> list[Resource]:
    """``found``, each resource that is one of ``previous`` byte for byte (type, name,
    version: a digest of its bytes, and source) replaced by that one (a route edit leaves
    its listener's Listener as it was: the snapshot's listeners are then left alone)."""
    before = {(r.type, r.name): r for r in previous}
    out = []
    for r in found:
        old = before.get((r.type, r.name))
        out.append(
            old if old is not None and (old.version, old.source) == (r.version, r.source) else r
        )
    return out

"""Resources built from each policy part, cached by the part's content (the translate step).

A reload re-translates and re-serializes only the parts that changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

from xdsplane.policy import grpc_providers, translate
from xdsplane.policy.grpc_check import grpc_upstreams
from xdsplane.policy.merge import GroupPolicy
from xdsplane.policy.translate import Built, guard, introspection, jwt, ratelimit
from xdsplane.policy.translate.secrets import paths
from xdsplane.snapshot import Resource, digest, make_resource


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

    def _get(
        self, key: tuple[str, str], source: str, build: Callable[[], list[Built]]
    ) -> list[Resource]:
        found = self._used.get(key) or self._entries.get(key)
        if found is None:
            self.misses += 1
            found = [make_resource(b.type, b.message, b.origin.source) for b in build()]
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
            parts = [spart.value.model_dump_json(), str(spart.origin.folder)]
            parts += [digest(files[p]) for p in paths(spart.value, spart.origin.folder).values()]
            key = ("secret:" + name, "|".join(parts))
            out += self._get(
                key,
                spart.origin.source,
                lambda n=name, sp=spart: translate.secret_resources(n, sp, files),  # type: ignore[misc]
            )
        for name, upart in sorted(policy.upstreams.items()):
            if name in grpc_ups:
                out += self._get(
                    ("grpc-upstream:" + name, upart.value.model_dump_json()),
                    upart.origin.source,
                    lambda n=name, up=upart: translate.grpc_upstream_resources(n, up),  # type: ignore[misc]
                )
                continue
            key = ("upstream:" + name, upart.value.model_dump_json())
            out += self._get(
                key,
                upart.origin.source,
                lambda n=name, up=upart: translate.upstream_resources(n, up),  # type: ignore[misc]
            )
        for sname, gpart_ in sorted(policy.grpc_services.items()):
            out += self._get(
                ("grpc:" + sname, gpart_.value.model_dump_json()),
                gpart_.origin.source,
                lambda sp=gpart_: translate.grpc_service_resources(sp),  # type: ignore[misc]
            )
        gpart = policy.guard
        if gpart is not None:
            out += self._get(
                ("guard", gpart.value.model_dump_json()),
                gpart.origin.source,
                lambda gp=gpart: translate.guard_resources(gp),  # type: ignore[misc]
            )
        log = policy.access_log.value if policy.access_log is not None else None
        log_key = log.model_dump_json() if log is not None else ""
        log_part = policy.access_log
        if log_part is not None and log_part.value.otlp is not None:
            # The OTLP collector's cluster (the listeners' loggers send to it).
            out += self._get(
                ("otlp", log_key),
                log_part.origin.source,
                lambda: translate.otlp_resources(log_part),
            )
        providers = translate.jwt_providers(policy, files)
        guard_spec = gpart.value if gpart is not None else None
        # The JWT providers (key sets included) are one ECDS resource, not in the listeners.
        jwt_names = jwt.group_providers(p.value for p in policy.listeners.values())
        if jwt_names:
            jwt_key = "".join(
                f"|{n}:{providers[n].spec.model_dump_json()}:{digest(providers[n].jwks)}"
                for n in jwt_names
            )
            out += self._get(
                ("jwt", jwt_key),
                policy.jwt_providers[jwt_names[0]].origin.source,
                lambda: translate.jwt_resources(policy, providers),
            )
        for lname, lpart in sorted(policy.listeners.items()):
            # A listener names the JWT providers its routes use (for the claim headers).
            jwt_key = "".join(
                f"|{n}:{providers[n].spec.model_dump_json()}"
                for n in jwt.listener_providers(lpart.value)
            )
            # ... and the guard, when a route of it is replay-protected or globally limited.
            guard_key = ""
            hosts = lpart.value.hosts
            # ... and its introspection providers (forwarded headers, the guard's timeout).
            introspected = {
                n: policy.introspection_providers[n].value
                for n in introspection.providers_of(hosts)
                if n in policy.introspection_providers
            }
            intro_key = "".join(f"|{n}:{p.model_dump_json()}" for n, p in introspected.items())
            if guard_spec is not None and (
                guard.needs_ext_authz(hosts) or ratelimit.needs_global(hosts)
            ):
                guard_key = "|guard:" + guard_spec.model_dump_json()
            key = (
                "listener:" + lname,
                lpart.value.model_dump_json() + log_key + jwt_key + guard_key + intro_key,
            )
            out += self._get(
                key,
                lpart.origin.source,
                lambda lp=lpart, i=introspected: translate.listener_resources(  # type: ignore[misc]
                    lp, log, providers, guard_spec, i
                ),
            )
        for sname, srv in sorted(policy.grpc_servers.items()):
            out += self._get(
                ("grpc_server:" + sname, srv.value.model_dump_json()),
                srv.origin.source,
                lambda sp=srv: translate.grpc_server_resources(sp),  # type: ignore[misc]
            )
        return out

    def sweep(self) -> None:
        """Keep only what the latest build used."""
        self._entries, self._used = self._used, {}

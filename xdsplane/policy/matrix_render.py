"""The access matrix for people: one set of cells per row, as a text table, Markdown or
HTML. Every renderer works on the JSON form (``RouteAccess.as_json``), the one /status
serves, so ``xdsplane routes``, the status page and the evidence report say the same."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

HEADERS = (
    "listener",
    "host",
    "route",
    "match",
    "who",
    "client certificate",
    "SANs allowed",
    "JWT",
    "replay",
    "rate limits",
    "RBAC",
    "upstream",
    "TLS",
)

Row = Mapping[str, Any]


def _match(row: Row) -> str:
    m = row.get("match")
    if not m:
        return "any request"
    text = f"{m['kind']} {m['value']}"
    if not m.get("case_sensitive", True):
        text += " (any case)"
    if m.get("methods"):
        text += " " + ",".join(m["methods"])
    if m.get("headers"):
        text += " headers: " + ",".join(m["headers"])
    return text


def _certificate(row: Row) -> str:
    host = str(row.get("client_certificate", "off"))
    if host == "required":
        return "required (handshake)"
    if row.get("require_client_certificate"):
        return f"required (route; host {host})"
    return host


def _sans(row: Row) -> str:
    if row.get("client_sans"):
        return ", ".join(row["client_sans"])
    return "any validated" if row.get("certificate_required") else "-"


def _jwt(row: Row) -> str:
    j = row.get("jwt")
    if not j and row.get("introspection"):
        scopes = row.get("require_scopes") or []
        return f"introspection {row['introspection']}" + (
            f" scopes {','.join(scopes)}" if scopes else ""
        )
    if not j:
        return "-"
    text = str(j["provider"]) + ("" if j["required"] else " (optional)")
    text += f" iss {j['issuer']} aud {','.join(j['audiences'])}"
    if j.get("max_lifetime"):
        text += f" max {j['max_lifetime']}"
    return text


def _guard(row: Row) -> str:
    parts = []
    if row.get("replay_protection"):
        parts.append("replay")
    elif row.get("revocation_check"):
        parts.append("revocation")
    if parts and row.get("guard_fail_open") is not None:
        parts.append("fail open" if row["guard_fail_open"] else "fail closed")
    return ", ".join(parts) or "-"


def _limits(row: Row) -> str:
    parts = []
    for key, label in (("rate_limit", "local"), ("global_rate_limit", "global")):
        lim = row.get(key)
        if lim:
            parts.append(f"{label} {lim['requests']}/{lim['per']} by {lim['by']}")
    return "; ".join(parts) or "-"


def _rbac(row: Row) -> str:
    r = row.get("rbac")
    if not r:
        return "-"
    parts = []
    if r.get("enforced"):
        parts.append("enforced: " + ",".join(r["enforced"]))
    if r.get("shadow"):
        parts.append("SHADOW (logged only): " + ",".join(r["shadow"]))
    if r.get("default"):
        parts.append(f"default {r['default']}")
    parts += [f"allow [{t}]" for t in r.get("allow", [])]
    parts += [f"deny [{t}]" for t in r.get("deny", [])]
    return "; ".join(parts)


def _upstream(row: Row) -> str:
    if row.get("redirect"):
        return f"redirect to {row['redirect']}"
    if row.get("direct_response") is not None:
        return f"direct response {row['direct_response']}"
    text = str(row.get("upstream") or "-")
    t = row.get("upstream_tls")
    if not t:
        return text + " (plaintext)"
    kind = "mTLS" if t["mtls"] else "TLS"
    text += f" ({kind} {t['min_version']}-{t['max_version']}"
    if t.get("subject_alt_names"):
        text += " SAN " + ",".join(t["subject_alt_names"])
    else:
        text += " any SAN"
    return text + (", legacy TLS allowed" if t.get("allow_legacy_tls") else "") + ")"


def _tls(row: Row) -> str:
    if not row.get("tls"):
        return "plain HTTP"
    return str(row["tls"]) + (" legacy allowed" if row.get("allow_legacy_tls") else "")


def cells(row: Row) -> list[str]:
    """The row's cells, in the order of ``HEADERS``, as plain text."""
    host = str(row.get("host", ""))
    if row.get("path_parameters") == "allow" and row.get("match"):
        host += " (';' paths allowed)"
    return [
        str(row.get("listener", "")),
        host,
        str(row.get("route", "")),
        _match(row),
        str(row.get("who", "")),
        _certificate(row),
        _sans(row),
        _jwt(row),
        _guard(row),
        _limits(row),
        _rbac(row),
        _upstream(row),
        _tls(row),
    ]


def _clean(text: str) -> str:
    """One line, no control characters (policy text is input)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def table(rows: Sequence[Row]) -> list[str]:
    """Aligned text columns, a header line first."""
    grid = [list(HEADERS)] + [[_clean(c) for c in cells(r)] for r in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(HEADERS))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in grid
    ]


def _md(text: str) -> str:
    out = _clean(text).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
    return out.replace("<", "&lt;").replace(">", "&gt;") or " "


def markdown(rows: Sequence[Row]) -> list[str]:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + " --- |" * len(HEADERS)]
    lines += ["| " + " | ".join(_md(c) for c in cells(r)) + " |" for r in rows]
    return lines


def html(rows: Sequence[Row]) -> str:
    """An HTML table, every cell escaped; a route reachable without any check is marked."""
    head = "".join(f"<th>{escape(h)}</th>" for h in HEADERS)
    body = []
    for r in rows:
        who = str(r.get("who", ""))
        tr = "<tr class='open'>" if who == "open" and not r.get("direct_response") else "<tr>"
        tds = "".join(f"<td>{escape(_clean(c), quote=True)}</td>" for c in cells(r))
        body.append(f"{tr}{tds}</tr>\n")
    return f"<table class='matrix'>\n<tr>{head}</tr>\n{''.join(body)}</table>\n"


def dumps(groups: Sequence[Mapping[str, Any]]) -> str:
    return json.dumps({"groups": list(groups)}, indent=2, sort_keys=False) + "\n"

"""The status page for people (``/`` on the admin server): plain HTML rendered from the same
document as ``/status``. Every value is escaped; nothing secret is in that document."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any

from xdsplane.policy import matrix_render
from xdsplane.redact import escape_control
from xdsplane.types import PUSH_ORDER

REFRESH_SECONDS = 5
TYPES = [t.short for t in PUSH_ORDER]

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; } th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; } code { font-size: 0.95em; }
.bad { color: #b00020; font-weight: 600; } .warn { color: #a15c00; font-weight: 600; }
.ok { color: #1b5e20; } .muted { color: #777; }
table.matrix td { font-size: 0.9em; vertical-align: top; } tr.open td { background: #fff4e5; }
"""


# The Content-Security-Policy of the admin server allows this one inline style by its hash.
STYLE_HASH = "sha256-" + base64.b64encode(hashlib.sha256(_STYLE.encode()).digest()).decode()


def short(version: object) -> str:
    """A version as people compare it: its first 8 characters."""
    return str(version or "")[:8]


def when(ts: object) -> str:
    if not isinstance(ts, int | float) or not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _e(value: object) -> str:
    # Node ids and NACK texts come from clients: control characters shown, not passed on.
    return escape(escape_control(str(value)), quote=True)


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    """``rows`` are cells already escaped (they may hold markup of ours)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _type_cell(st: Mapping[str, Any] | None) -> str:
    if st is None:
        return '<span class="muted">-</span>'
    acked, sent = str(st.get("acked_version", "")), str(st.get("sent_version", ""))
    parts = [f"<code>{_e(short(acked)) or '-'}</code>"]
    if sent and sent != acked and sent != st.get("nacked_version"):
        parts.append(f'<span class="warn">sent <code>{_e(short(sent))}</code>, waiting</span>')
    if st.get("nacks"):
        parts.append(
            f'<span class="bad">NACK of <code>{_e(short(st.get("nacked_version")))}</code>: '
            f"{_e(st.get('last_nack', ''))}</span>"
        )
    return "<br>".join(parts)


def _nodes(status: Mapping[str, Any]) -> str:
    streams = list(status.get("streams", []))
    if not streams:
        return "<p class='muted'>No Envoy is connected.</p>\n"
    rows = []
    for s in sorted(streams, key=lambda s: (str(s.get("node")), int(s.get("stream", 0)))):
        types = s.get("types", {})
        rows.append(
            [
                f"<b>{_e(s.get('node') or '(no request yet)')}</b>",
                _e(s.get("cluster", "")),
                _e(s.get("user_agent") or s.get("client", "")),
                _e(s.get("variant", "")),
                _e(s.get("group", "")),
                _e(s.get("peer", "")),
                _e(when(s.get("connected_at"))),
                *(_type_cell(types.get(t)) for t in TYPES),
            ]
        )
    headers = ["node", "cluster", "client", "variant", "group", "peer", "connected", *TYPES]
    return (
        "<p>Acknowledged version per type (first 8 characters of the content hash).</p>\n"
        + _table(headers, rows)
    )


def _nacks(status: Mapping[str, Any]) -> str:
    nacks: Mapping[str, Mapping[str, Mapping[str, Any]]] = status.get("nacks", {})
    if not nacks:
        return "<p class='ok'>No node rejected anything.</p>\n"
    rows = [
        [
            _e(node),
            _e(t),
            f"<code>{_e(short(r.get('version')))}</code>",
            _e(when(r.get("at"))),
            f"<span class='bad'>{_e(r.get('message', ''))}</span>",
        ]
        for node, by_type in sorted(nacks.items())
        for t, r in by_type.items()
    ]
    return _table(["node", "type", "version", "at", "error"], rows)


def _envoys(status: Mapping[str, Any]) -> str:
    """Per-host requests without/with a client certificate, from each named Envoy's admin."""
    envoys = status.get("envoys")
    if envoys is None:
        return ""
    rows = []
    for e in envoys:
        name = f"{_e(e.get('name', ''))} <span class='muted'>{_e(e.get('address', ''))}</span>"
        if not e.get("ok"):
            rows.append([name, "-", "-", "-", f"<span class='bad'>{_e(e.get('error', ''))}</span>"])
            continue
        read = _e(when(e.get("read_at")))
        hosts = e.get("hosts") or []
        if not hosts:
            rows.append([name, "<span class='muted'>no optional host</span>", "-", "-", read])
        for h in hosts:
            missing = int(h.get("without_certificate", 0))
            cell = f"<span class='warn'>{missing}</span>" if missing else "0"
            rows.append([name, _e(h.get("host", "")), cell, _e(h.get("with_certificate", 0)), read])
    table = _table(
        ["envoy", "listener/host", "without certificate", "with certificate", "read"], rows
    )
    return f"<h2>Client certificates on optional hosts (Envoy admin)</h2>\n{table}"


def _reload(status: Mapping[str, Any]) -> str:
    r: Mapping[str, Any] = status.get("reload", {})
    lines = [
        f"<p>Folder <code>{_e(status.get('config', ''))}</code>: "
        f"loaded {_e(when(r.get('loaded_at')))}; {_e(r.get('successes', 0))} loads served, "
        f"{_e(r.get('failures', 0))} refused; last load took {_e(r.get('last_duration_ms', 0))} "
        "ms.</p>"
    ]
    errors = list(r.get("errors", []))
    if errors:
        lines.append(
            f"<p class='bad'>The last edit was refused ({_e(when(r.get('failed_at')))}); "
            "the last good snapshot is still served:</p>"
        )
        lines.append("<ul>" + "".join(f"<li><code>{_e(x)}</code></li>" for x in errors) + "</ul>")
    else:
        lines.append("<p class='ok'>No policy errors.</p>")
    return "\n".join(lines) + "\n"


def _certificates(status: Mapping[str, Any]) -> str:
    certs = list(status.get("certificates", []))
    if not certs:
        return "<p class='muted'>No certificates are served.</p>\n"
    rows = []
    for c in certs:
        expiring = bool(c.get("expiring"))
        days = c.get("days_left", "")
        flag = "<span class='bad'>expiring</span>" if expiring else "<span class='ok'>ok</span>"
        rows.append(
            [
                _e(c.get("secret", "")),
                _e(c.get("subject", "")),
                _e(", ".join(map(str, c.get("dns", [])))),
                _e(c.get("not_after", "")),
                f"<span class='{'bad' if expiring else 'ok'}'>{_e(days)}</span>",
                flag,
                _staple_cell(c),
            ]
        )
    headers = ["secret", "subject", "DNS names", "not after", "days left", "", "OCSP staple"]
    due = [c for c in certs if c.get("ocsp_due")]
    warning = ""
    if due:
        names = ", ".join(str(c.get("secret", "")) for c in due)
        warning = (
            f"<p class='warn'>OCSP staple due: {_e(names)}. Renew it (xdsplane certs ocsp "
            "NAME, or your responder's renewal) before its next update.</p>\n"
        )
    return warning + _table(headers, rows)


def staple_text(c: Mapping[str, Any]) -> str:
    """A certificate's OCSP staple in words: '' without one; its nextUpdate and state."""
    if "ocsp_next_update" not in c:
        return ""
    when = str(c.get("ocsp_next_update", ""))
    if c.get("ocsp_expired"):
        served = "stapled (must_staple)" if c.get("ocsp_stapled") else "not stapled"
        return f"EXPIRED {when}, {served}"
    hours = c.get("ocsp_hours_left", "")
    state = "DUE" if c.get("ocsp_due") else "ok"
    return f"{state}: next update {when} ({hours} h)"


def _staple_cell(c: Mapping[str, Any]) -> str:
    text = staple_text(c)
    if not text:
        return "<span class='muted'>none</span>"
    css = "bad" if c.get("ocsp_expired") else "warn" if c.get("ocsp_due") else "ok"
    return f"<span class='{css}'>{_e(text)}</span>"


def _xds_tls(status: Mapping[str, Any]) -> str:
    """The xDS server's own certificate and client CAs (hot-reloaded), and refused files."""
    tls = status.get("xds_tls")
    if not tls:
        return "<p class='muted'>The xDS port is plaintext.</p>\n"
    c = tls.get("certificate", {})
    cas = ", ".join(str(ca.get("subject", "")) for ca in tls.get("client_cas", []))
    out = _table(
        ["subject", "serial", "SHA-256 fingerprint", "not after", "days left", "client CAs"],
        [
            [
                _e(c.get("subject", "")),
                f"<code>{_e(c.get('serial', ''))}</code>",
                f"<code>{_e(c.get('fingerprint_sha256', ''))}</code>",
                _e(c.get("not_after", "")),
                _e(c.get("days_left", "")),
                _e(cas),
            ]
        ],
    )
    out += (
        f"<p class='muted'>Loaded {_e(when(tls.get('loaded_at')))}; "
        f"{_e(tls.get('reloads', 0))} reloads, {_e(tls.get('failures', 0))} refused.</p>\n"
    )
    errors = list(tls.get("errors", []))
    if errors:
        out += (
            f"<p class='bad'>Files refused at {_e(when(tls.get('failed_at')))}; new handshakes "
            "still get the certificate above:</p><ul>"
            + "".join(f"<li><code>{_e(x)}</code></li>" for x in errors)
            + "</ul>\n"
        )
    return out


def _access(status: Mapping[str, Any]) -> str:
    """The access matrix of each served node group (policy/matrix.py, as /status has it)."""
    groups = [g for g in status.get("groups", []) if g.get("access")]
    if not groups:
        return "<p class='muted'>No policy routes are served.</p>\n"
    out = [
        "<p>Who may reach what, as Envoy is told (<code>xdsplane routes</code>); rows on a "
        "tint reach an upstream with no check.</p>\n"
    ]
    for g in groups:
        out.append(f"<h3>nodes {_e(g.get('name', ''))}</h3>\n{matrix_render.html(g['access'])}")
    return "".join(out)


def render(status: Mapping[str, Any], cert_warn_days: float = 14.0) -> str:
    ready = bool(status.get("ready"))
    state = "<span class='ok'>ready</span>" if ready else "<span class='bad'>not ready</span>"
    refused: Mapping[str, int] = status.get("refused", {}) or {}
    refused_html = (
        "<p class='warn'>Streams refused: "
        + _e(", ".join(f"{k}: {v}" for k, v in sorted(refused.items())))
        + "</p>\n"
        if refused
        else ""
    )
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>\n"
        f"<meta http-equiv='refresh' content='{REFRESH_SECONDS}'>\n"
        "<title>xdsplane</title>\n"
        f"<style>{_STYLE}</style></head><body>\n"
        f"<h1>xdsplane: {state}</h1>\n"
        f"{''.join(f'<p class=bad>Insecure: {_e(r)}</p>' for r in status.get('insecure', []))}"
        f"<p class='muted'>Refreshes every {REFRESH_SECONDS} s. Machine-readable: "
        "<a href='/status'>/status</a>, <a href='/metrics'>/metrics</a>.</p>\n"
        f"<h2>Nodes ({len(status.get('streams', []))} streams)</h2>\n{_nodes(status)}"
        f"{refused_html}"
        f"<h2>Rejected (last NACK per node and type)</h2>\n{_nacks(status)}"
        f"{_envoys(status)}"
        f"<h2>Policy</h2>\n{_reload(status)}"
        f"<h2>Access matrix (served config)</h2>\n{_access(status)}"
        f"<h2>Certificates (expiring: within {_e(cert_warn_days)} days)</h2>\n"
        f"{_certificates(status)}"
        f"<h2>xDS server certificate</h2>\n{_xds_tls(status)}"
        "</body></html>\n"
    )


# -- the same for a terminal (``xdsplane status``) ----------------------------------------------


def _type_text(st: Mapping[str, Any] | None) -> str:
    if st is None:
        return "-"
    acked, sent = str(st.get("acked_version", "")), str(st.get("sent_version", ""))
    text = short(acked) or "-"
    if st.get("nacks") and sent and sent == st.get("nacked_version"):
        return f"{text} NACK"
    if sent and sent != acked:
        return f"{text} (sent {short(sent)})"
    return text


def _columns(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def status_lines(status: Mapping[str, Any]) -> list[str]:
    """The node table, reload state and errors, then certificates, as lines of text."""
    lines: list[str] = [f"INSECURE (--insecure): {r}" for r in status.get("insecure", [])]
    streams = sorted(
        status.get("streams", []), key=lambda s: (str(s.get("node")), int(s.get("stream", 0)))
    )
    if streams:
        rows = [["NODE", "CLIENT", "VARIANT", "GROUP", *TYPES]]
        for s in streams:
            types = s.get("types", {})
            node = str(s.get("node") or "(no request yet)")
            rows.append(
                [
                    node,
                    str(s.get("client") or "-"),
                    str(s.get("variant", "")),
                    str(s.get("group", "")),
                ]
                + [_type_text(types.get(t)) for t in TYPES]
            )
        lines += _columns(rows)
    else:
        lines.append("no Envoy or gRPC client is connected")
    for node, by_type in sorted(status.get("nacks", {}).items()):
        for t, r in by_type.items():
            lines.append(
                f"NACK {node} {t} version {short(r.get('version'))} at {when(r.get('at'))}: "
                f"{r.get('message', '')}"
            )
    for e in status.get("envoys") or []:
        if not e.get("ok"):
            lines.append(f"envoy {e.get('name', '')}: admin not read: {e.get('error', '')}")
            continue
        for h in e.get("hosts") or []:
            lines.append(
                f"envoy {e.get('name', '')} {h.get('host', '')}: "
                f"{h.get('without_certificate', 0)} requests without a client certificate, "
                f"{h.get('with_certificate', 0)} with one"
            )
    r = status.get("reload", {})
    lines.append("")
    lines.append(
        f"reload: {'ready' if status.get('ready') else 'NOT READY'}, config "
        f"{status.get('config', '')}, loaded {when(r.get('loaded_at'))}, "
        f"{r.get('successes', 0)} served, {r.get('failures', 0)} refused"
    )
    errors = list(r.get("errors", []))
    if errors:
        lines.append(
            f"the last edit was refused at {when(r.get('failed_at'))}; "
            "still serving the last good snapshot:"
        )
        lines += [f"  {e}" for e in errors]
    certs = list(status.get("certificates", []))
    lines.append("")
    if certs:
        rows = [["SECRET", "SUBJECT", "NOT AFTER", "DAYS LEFT", "", "OCSP STAPLE"]]
        for c in certs:
            rows.append(
                [
                    str(c.get("secret", "")),
                    str(c.get("subject", "")),
                    str(c.get("not_after", "")),
                    str(c.get("days_left", "")),
                    "EXPIRING" if c.get("expiring") else "",
                    staple_text(c),
                ]
            )
        lines += _columns(rows)
        for c in certs:
            if c.get("ocsp_due"):
                lines.append(
                    f"warning: the OCSP staple of {c.get('secret', '')} is due "
                    f"({staple_text(c)}): renew it (xdsplane certs ocsp NAME)"
                )
    else:
        lines.append("no certificates served")
    tls = status.get("xds_tls")
    if tls:
        c = tls.get("certificate", {})
        lines.append("")
        lines.append(
            f"xDS server certificate: {c.get('subject', '')} serial {c.get('serial', '')}, "
            f"not after {c.get('not_after', '')} ({c.get('days_left', '')} days left), "
            f"sha256 {c.get('fingerprint_sha256', '')}"
        )
        if tls.get("errors"):
            lines.append("xDS TLS files refused; new handshakes still get the certificate above:")
            lines += [f"  {e}" for e in tls["errors"]]
    return lines

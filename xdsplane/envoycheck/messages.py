"""Envoy's messages made fit to show: scrubbed of PEM blocks and config dumps, bounded."""

from __future__ import annotations

import re

MAX_MESSAGE = 1000  # characters of Envoy's message kept in a report
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

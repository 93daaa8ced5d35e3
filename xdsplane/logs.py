"""Logging through structlog: JSON lines when not on a terminal, readable on one.

Log events carry text from clients (node ids, NACK details) and from files (error
messages). Whatever the format, key material in a string value (a PEM block, a token) is
replaced (xdsplane.redact) and a text longer than MAX_TEXT is cut; the console format also
escapes control characters, so a node id holding ESC[2J cannot clear or rewrite the
operator's terminal (JSON escapes them itself).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from xdsplane.redact import MAX_TEXT, cut, escape_control, scrub


def _clean(value: Any, console: bool, keep: str = "") -> Any:
    if isinstance(value, str):
        text = scrub(value, blobs=False) if ("-----BEGIN " in value or "eyJ" in value) else value
        if not keep:  # a traceback stays whole; any other text (a client's NACK) is cut
            text = cut(text, MAX_TEXT)
        return escape_control(text, keep) if console else text
    if isinstance(value, list | tuple):
        return [_clean(v, console) for v in value]
    if isinstance(value, dict):
        return {_clean(k, console): _clean(v, console) for k, v in value.items()}
    return value


def _redact_processor(console: bool) -> Any:
    def redact_event(
        logger: Any, method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for k in list(event):
            # A traceback keeps its lines; anything else is one line.
            event[k] = _clean(event[k], console, keep="\n" if k == "exception" else "")
        return event

    return redact_event


def configure(level: str = "info", json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            _redact_processor(console=not json),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str) -> Any:
    return structlog.get_logger(name)

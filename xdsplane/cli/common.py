"""Helpers the command modules share: logging flags, the Envoy binary flag."""

from __future__ import annotations

import argparse
from typing import TypeAlias

from xdsplane import logs

Sub: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
"""What ``add_subparsers`` returns: each command module adds its parsers to it."""


def add_logging(p: argparse.ArgumentParser) -> None:
    """--log-level and --log-format, for the long-running commands (serve, guard)."""
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "console"],
        help="auto: JSON unless stderr is a terminal",
    )


def configure_logging(args: argparse.Namespace) -> None:
    fmt = {"auto": None, "json": True, "console": False}[args.log_format]
    logs.configure(args.log_level, fmt)


def add_envoy_binary(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--envoy-binary",
        metavar="PATH",
        help="the Envoy to run (default: envoy on PATH, or beside this Python)",
    )

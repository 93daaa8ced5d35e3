"""The ``xdsplane`` command: parse arguments, call the layers, print results.

One module per command family; each adds its parsers (``add_*``) and runs its commands
(``cmd_*``). Nothing here decides policy: the rules live in the layers the commands call.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from xdsplane import __version__
from xdsplane.cli import (
    audit,
    bootstrap,
    guard,
    policytest,
    revoke,
    serve,
    status,
    up,
    validate,
)

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "status": status.cmd_status,
    "diff": validate.cmd_diff,
    "guard": guard.cmd_guard,
    "revoke": revoke.cmd_revoke,
    "unrevoke": revoke.cmd_unrevoke,
    "serve": serve.cmd_serve,
    "validate": validate.cmd_validate,
    "render": validate.cmd_render,
    "bootstrap": bootstrap.cmd_bootstrap,
    "up": up.cmd_up,
    "certs": bootstrap.cmd_certs,
    "token": bootstrap.cmd_token,
    "demo-billing": up.cmd_demo,
    "schema": validate.cmd_schema,
    "test": policytest.cmd_test,
    "routes": audit.cmd_routes,
    "report": audit.cmd_report,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xdsplane",
        description="An Envoy xDS control plane: serves Listener, Cluster, Route, Endpoint "
        "and Secret resources over ADS from files on disk.",
    )
    p.add_argument("--version", action="version", version=f"xdsplane {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve.add_serve(sub)
    validate.add_validate(sub)
    validate.add_render(sub)
    bootstrap.add_bootstrap(sub)
    up.add_up(sub)
    bootstrap.add_certs(sub)
    bootstrap.add_token(sub)
    up.add_demo(sub)
    validate.add_schema(sub)
    validate.add_diff(sub)
    policytest.add_test(sub)
    audit.add_routes(sub)
    audit.add_report(sub)
    guard.add_guard(sub)
    revoke.add_revoke(sub)
    revoke.add_unrevoke(sub)
    status.add_status(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader went away (``xdsplane render ... | head``): not an error of ours.
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())

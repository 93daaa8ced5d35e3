"""``xdsplane revoke`` and ``xdsplane unrevoke``: the guard's revocation list, in the Redis
the guards share (--redis) or in the file they watch (--file, written atomically)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from xdsplane.cli.common import Sub


def _target(p: argparse.ArgumentParser, listing: bool) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--jti", metavar="ID", help="a token id (the JWT's jti claim)")
    what.add_argument("--sub", metavar="NAME", help="a subject (the JWT's sub claim)")
    what.add_argument(
        "--cert", metavar="FILE", help="a client certificate (PEM): its SHA-256 fingerprint"
    )
    what.add_argument("--cert-sha256", metavar="HEX", help="a certificate's SHA-256 fingerprint")
    what.add_argument("--cert-serial", metavar="HEX", help="a client certificate's serial (hex)")
    if listing:
        what.add_argument("--list", action="store_true", help="print the live revocations")
    where = p.add_argument_group("where", "exactly one of --redis and --file")
    where.add_argument("--redis", metavar="URL", help="redis://HOST:PORT/DB the guards share")
    where.add_argument("--redis-password-file", metavar="FILE", help="the Redis password")
    where.add_argument("--file", metavar="FILE", help="the guards' --revocations file")
    p.add_argument(
        "--key-prefix", default="xdsplane:guard:", metavar="P", help="the guards' --key-prefix"
    )


def add_revoke(sub: Sub) -> None:
    p = sub.add_parser(
        "revoke",
        help="refuse a token (jti), a subject (sub) or a client certificate at every guard",
        description="Add a revocation: the guards refuse requests carrying it (ext_authz, "
        "routes with replay_protection or revocation_check) from their next Check, until "
        "--until. See docs/guard.md.",
    )
    _target(p, listing=True)
    p.add_argument(
        "--until",
        default="24h",
        metavar="TIME",
        help="when it expires: a duration (90s, 30m, 12h, 7d), an ISO 8601 time, or never "
        "(default: 24h)",
    )
    p.add_argument("--reason", default="", metavar="TEXT", help="why (logged at each refusal)")


def add_unrevoke(sub: Sub) -> None:
    p = sub.add_parser(
        "unrevoke",
        help="remove a revocation added by xdsplane revoke",
        description="Remove a revocation from the guards' Redis or file. See docs/guard.md.",
    )
    _target(p, listing=False)


def _kind_value(args: argparse.Namespace) -> tuple[str, str]:
    from xdsplane.guard.revoke import cert_file_identity, normalize

    if args.cert:
        return "cert_sha256", cert_file_identity(Path(args.cert))[0]
    for kind in ("jti", "sub", "cert_sha256", "cert_serial"):
        value = getattr(args, kind)
        if value is not None:
            return kind, normalize(kind, value)
    raise AssertionError("argparse requires one")


def _store_for(args: argparse.Namespace) -> object:
    from xdsplane.guard.app import GuardOptions, make_store
    from xdsplane.guard.service import GuardMetrics

    opts = GuardOptions(
        redis=args.redis,
        redis_password_file=Path(args.redis_password_file) if args.redis_password_file else None,
    )
    return make_store(opts, GuardMetrics())


def _run(args: argparse.Namespace, removing: bool) -> int:
    from xdsplane.atomicwrite import write_atomic
    from xdsplane.guard import revoke as rv
    from xdsplane.guard.app import GuardStartupError
    from xdsplane.guard.store import RedisStore, StoreUnavailable

    name = "unrevoke" if removing else "revoke"
    if (args.redis is None) == (args.file is None):
        print(f"xdsplane {name}: give exactly one of --redis and --file", file=sys.stderr)
        return 2
    now = time.time()
    listing = getattr(args, "list", False)
    try:
        kind, value = ("", "") if listing else _kind_value(args)
        new = None
        if not removing and not listing:
            new = rv.entry(kind, value, rv.parse_until(args.until, now), args.reason)
            if new.until is not None and new.until <= now:
                raise rv.RevocationError(f"--until {args.until}: already past")
        if args.file is not None:
            path = Path(args.file)
            entries = [r for r in rv.read_file(path) if r.live(now)]
            if listing:
                _print(entries)
                return 0
            kept = [r for r in entries if (r.kind, r.value) != (kind, value)]
            if removing and len(kept) == len(entries):
                print(f"xdsplane unrevoke: no {kind} revocation for that value", file=sys.stderr)
                return 1
            write_atomic(path, rv.dump_file(kept + ([new] if new else [])))
        else:
            store = _store_for(args)
            assert isinstance(store, RedisStore)
            return asyncio.run(_redis(store, args.key_prefix, kind, value, new, listing))
    except (rv.RevocationError, GuardStartupError, StoreUnavailable, OSError) as e:
        print(f"xdsplane {name}: {e}", file=sys.stderr)
        return 1
    print(
        f"{'unrevoked' if removing else 'revoked'} {kind}"
        + (f" until {_until(new)}" if new else "")
    )
    return 0


async def _redis(
    store: object, prefix: str, kind: str, value: str, new: object, listing: bool
) -> int:
    from xdsplane.guard import revoke as rv
    from xdsplane.guard.store import RedisStore

    assert isinstance(store, RedisStore)
    try:
        if listing:
            _print(await rv.listing(store, prefix))
            return 0
        if isinstance(new, rv.Revocation):
            await rv.put(store, prefix, new, time.time())
            print(f"revoked {kind} until {_until(new)}")
            return 0
        if not await rv.remove(store, prefix, kind, value):
            print(f"xdsplane unrevoke: no {kind} revocation for that value", file=sys.stderr)
            return 1
        print(f"unrevoked {kind}")
        return 0
    finally:
        await store.close()


def _until(r: object) -> str:
    from xdsplane.guard.revoke import Revocation

    assert isinstance(r, Revocation)
    return str(r.to_json()["until"] or "never")


def _print(entries: Sequence[object]) -> None:
    from xdsplane.guard.revoke import Revocation

    print(json.dumps([r.to_json() for r in entries if isinstance(r, Revocation)], indent=2))


def cmd_revoke(args: argparse.Namespace) -> int:
    return _run(args, removing=False)


def cmd_unrevoke(args: argparse.Namespace) -> int:
    return _run(args, removing=True)

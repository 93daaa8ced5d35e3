"""Message classes by full proto name, their packages imported on demand.

Importing all of xds-protos costs about 0.8 s, so the ``_pb2`` modules of each package named
by an ``@type`` are imported when first needed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
from typing import Any

from google.protobuf import descriptor_pool

_ROOTS = ("envoy", "xds", "udpa", "validate", "google")


def _type_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


@functools.cache
def _import_package(package: str) -> None:
    """Import every ``_pb2`` module of a proto package (``envoy.config.listener.v3``)."""
    if not package or package.split(".")[0] not in _ROOTS:
        return
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return
    if spec is None or not spec.submodule_search_locations:
        return
    for info in pkgutil.iter_modules(spec.submodule_search_locations):
        if info.name.endswith("_pb2"):
            try:
                importlib.import_module(f"{package}.{info.name}")
            except Exception:  # a broken optional module must not break loading
                continue


_FOUND: dict[str, Any] = {}  # full name -> class (a class found stays the same)


def find_message(full_name: str) -> Any | None:
    """The message class for a full proto name, importing its package when needed."""
    found = _FOUND.get(full_name)
    if found is not None:
        return found
    if not full_name.isascii():
        # Proto names are ASCII; the pool raises TypeError (not KeyError) on a lone
        # surrogate such as a YAML "\ud800" escape: that is an unknown type, not a crash.
        return None
    found = _find(full_name)
    if found is not None:
        _FOUND[full_name] = found
    return found


def _find(full_name: str) -> Any | None:
    pool = descriptor_pool.Default()
    try:
        desc = pool.FindMessageTypeByName(full_name)
    except KeyError:
        _import_package(full_name.rsplit(".", 1)[0])
        try:
            desc = pool.FindMessageTypeByName(full_name)
        except KeyError:
            return None
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)

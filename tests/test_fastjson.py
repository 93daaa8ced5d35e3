"""``config.fastjson`` against ``json_format.ParseDict``: whatever the fast converter
accepts gives the same message, byte for byte (``Any`` payloads included), and whatever
json_format refuses the fast converter refuses too (``parse_message`` then words the error
from json_format, as before). Inputs: every raw resource of the repository's corpora, the
benchmark folder's, and generated ones: mutations of those, and mappings built at random
from the message descriptors (every kind of field, right and wrong types).

XDSPLANE_HYPOTHESIS_EXAMPLES=3000 runs a longer search (300 examples per test by default).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdsplane.config import fastjson
from xdsplane.config.protos import find_message, prepare_types
from xdsplane.types import ResourceType

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(
    max_examples=int(os.environ.get("XDSPLANE_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def agree(body: Any, cls: Any) -> bool:
    """Asserts fastjson and json_format agree on ``body``; True if fastjson converted it."""
    with contextlib.suppress(Exception):
        prepare_types(body)
    reference = cls()
    try:
        json_format.ParseDict(copy.deepcopy(body), reference)
    except Exception:
        reference = None
    try:
        fast = fastjson.parse(body, cls)
    except fastjson.Fallback:
        return False
    assert reference is not None, f"fastjson accepted what json_format refuses: {body!r}"
    assert fast.SerializeToString() == reference.SerializeToString(), body
    assert fast.SerializeToString(deterministic=True) == reference.SerializeToString(
        deterministic=True
    )
    assert fast == reference
    return True


def raw_bodies(paths: list[Path]) -> list[tuple[Any, dict[str, Any]]]:
    out = []
    for path in paths:
        try:
            docs = list(yaml.safe_load_all(path.read_text("utf-8")))
        except Exception:
            continue
        for doc in docs:
            items = doc.get("resources") if isinstance(doc, dict) else None
            if not isinstance(items, list):
                continue
            for item in items:
                if not isinstance(item, dict) or not isinstance(item.get("@type"), str):
                    continue
                rtype = ResourceType.from_url(item["@type"])
                if rtype is not None:
                    body = {k: v for k, v in item.items() if k != "@type"}
                    out.append((rtype.message_class, body))
    return out


def corpus() -> list[tuple[Any, dict[str, Any]]]:
    paths = []
    for folder in ("tests", "examples", "docs", "deploy"):
        base = ROOT / folder
        if base.is_dir():
            paths.extend(sorted(base.rglob("*.yaml")))
    return raw_bodies(paths)


def bench_bodies(tmp: Path) -> list[tuple[Any, dict[str, Any]]]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _snapgen
    finally:
        sys.path.pop(0)
    _snapgen.generate(tmp, _snapgen.Shape(clusters=40, listeners=4, cluster_files=2))
    return raw_bodies(sorted(tmp.rglob("*.yaml")))


def test_corpus_resources_convert_the_same() -> None:
    bodies = corpus()
    assert len(bodies) > 30
    fast = sum(agree(body, cls) for cls, body in bodies)
    assert fast > len(bodies) // 2, f"fastjson converted only {fast} of {len(bodies)}"


def test_benchmark_resources_all_take_the_fast_path(tmp_path: Path) -> None:
    bodies = bench_bodies(tmp_path)
    assert len(bodies) > 80
    for cls, body in bodies:
        assert agree(body, cls), body


def test_edge_cases_convert_the_same() -> None:
    cluster = ResourceType.CLUSTER.message_class
    cases: list[dict[str, Any]] = [
        {"name": "a", "connectTimeout": "1s", "connect_timeout": "2s"},  # both names
        {"name": "a", "type": "EDS", "clusterType": {"name": "x"}},  # one oneof twice
        {"name": "a", "type": 3},  # an enum as a number
        {"name": "a", "type": "NOPE"},
        {"name": "a", "connect_timeout": "0s"},
        {"name": "a", "connect_timeout": "-1.5s"},
        {"name": "a", "connect_timeout": "1.0000000001s"},
        {"name": "a", "connect_timeout": 1},
        {"name": "a", "per_connection_buffer_limit_bytes": 5},
        {"name": "a", "per_connection_buffer_limit_bytes": -1},
        {"name": "a", "per_connection_buffer_limit_bytes": 2**32},
        {"name": "a", "per_connection_buffer_limit_bytes": "5"},
        {"name": "a", "per_connection_buffer_limit_bytes": True},
        {"name": "a", "per_connection_buffer_limit_bytes": None},
        {"name": "a", "eds_cluster_config": {}},
        {"name": "a", "eds_cluster_config": None},
        {"name": "a", "metadata": {"filter_metadata": {"x": {"a": 1}}}},
        {"name": "a", "typed_extension_protocol_options": {}},
        {
            "name": "a",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                    ".HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
        },
        {"name": "a", "transport_socket": {"name": "t", "typed_config": {}}},
        {"name": "a", "transport_socket": {"name": "t", "typed_config": {"@type": "nope"}}},
        {
            "name": "a",
            "transport_socket": {
                "name": "t",
                "typed_config": {"@type": "type.googleapis.com/google.protobuf.UInt32Value"},
            },
        },
        {"name": "\ud800"},
        {"name": "é"},
        {"name": 5},
        {"name": "a", "[ext]": 1},
        {"name": "a", "lb_subset_config": {"subset_selectors": [{"keys": ["a", "b"]}]}},
        {"name": "a", "lb_subset_config": {"subset_selectors": [None]}},
        {"name": "a", "lb_subset_config": {"subset_selectors": {"keys": []}}},
        {"name": "a", "load_balancing_policy": {"policies": []}},
        {"name": "a", "common_lb_config": {"healthy_panic_threshold": {"value": 50.0}}},
        {"name": "a", "common_lb_config": {"healthy_panic_threshold": {"value": float("nan")}}},
        {"name": "a", "common_lb_config": {"healthy_panic_threshold": {"value": 1e400}}},
        {"name": "a", "common_lb_config": {"healthy_panic_threshold": {"value": 5}}},
        {"name": "a", "common_lb_config": {"healthy_panic_threshold": {"value": True}}},
        {"name": "a", "circuit_breakers": {"thresholds": [{"max_connections": 5}]}},
        {"name": "a", "circuit_breakers": {"thresholds": [{"max_connections": {"value": 5}}]}},
        {"name": "a", "respect_dns_ttl": True},
        {"name": "a", "respect_dns_ttl": "true"},
        {"name": "a", "respect_dns_ttl": 1},
        {"name": "a", 1: 2},
        {"name": ["a"]},
    ]
    for body in cases:
        agree(body, cluster)
    secret = ResourceType.SECRET.message_class
    for data in ("aGVsbG8", "aGVsbG8=", "a-_b", "a+/b", "!!", "", "é"):
        agree({"name": "s", "generic_secret": {"secret": {"inline_bytes": data}}}, secret)


# Mappings made at random from the descriptors -----------------------------------------

ANY_TYPES = [
    "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "envoy.extensions.filters.http.router.v3.Router",
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
]
RARE_ANY_TYPES = ["google.protobuf.UInt32Value", "google.protobuf.Struct"]
WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(),
    st.text(max_size=4),
    st.sampled_from(["1s", "1.5s", "-2s", "x", "123", "1e3", "NaN", "Infinity", "\ud800"]),
    st.just([]),
    st.just({}),
)


def mostly(right: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``right``, and now and then a value of any other type (a mapping holds many values:
    most generated mappings should be valid, to compare messages and not only refusals)."""
    return st.integers(0, 59).flatmap(lambda i: WRONG if i == 0 else right)


def scalar_for(field: Any) -> st.SearchStrategy[Any]:
    fd = field
    kinds = {
        fd.TYPE_STRING: st.text(max_size=6),
        fd.TYPE_BYTES: st.sampled_from(["aGVsbG8=", "aGk", "", "-_-_"]),
        fd.TYPE_BOOL: st.booleans(),
        fd.TYPE_DOUBLE: st.one_of(st.floats(allow_nan=False), st.integers(-5, 5)),
        fd.TYPE_FLOAT: st.one_of(st.floats(allow_nan=False), st.integers(-5, 5)),
    }
    if fd.type in kinds:
        right = kinds[fd.type]
    elif fd.type == fd.TYPE_ENUM:
        right = st.sampled_from([v.name for v in fd.enum_type.values])
    else:
        bits = 32 if fd.cpp_type in (fd.CPPTYPE_INT32, fd.CPPTYPE_UINT32) else 64
        low = 0 if fd.cpp_type in (fd.CPPTYPE_UINT32, fd.CPPTYPE_UINT64) else -(2 ** (bits - 1))
        right = st.integers(min_value=low, max_value=low + 2**bits - 1)
    return mostly(right)


def _member(field: Any) -> str:
    """Fields drawn together are of different oneofs (a oneof set twice is refused), but
    now and then ``rare`` adds one that may clash."""
    oneof = field.containing_oneof
    return str(oneof.full_name) if oneof is not None else str(field.name)


def _json_format_only(field: Any) -> bool:
    msg = field.message_type
    if msg is not None and msg.GetOptions().map_entry:
        msg = msg.fields_by_name["value"].message_type
    if msg is None or not msg.full_name.startswith("google.protobuf."):
        return False
    return msg.file.name != "google/protobuf/wrappers.proto" and msg.full_name not in (
        "google.protobuf.Duration",
        "google.protobuf.Any",
    )


def message_for(desc: Any, depth: int) -> st.SearchStrategy[Any]:
    name = desc.full_name
    if desc.file.name == "google/protobuf/wrappers.proto":
        return scalar_for(desc.fields_by_name["value"])
    if name == "google.protobuf.Duration":
        good = st.sampled_from(["1s", "0.5s", "-3s", "0s", "1.000000001s", "2.5000s"])
        return mostly(st.one_of(good, good, good, st.sampled_from(["bad", "1", "s"])))
    if name == "google.protobuf.Any":
        if depth <= 0:
            return st.just({})
        return st.sampled_from(ANY_TYPES * 10 + RARE_ANY_TYPES).flatmap(
            lambda t: message_for(find_message(t).DESCRIPTOR, depth - 1).map(
                lambda body: (
                    {"@type": f"type.googleapis.com/{t}", **body}
                    if isinstance(body, dict)
                    else {"@type": f"type.googleapis.com/{t}", "value": body}
                )
            )
        )
    if name.startswith("google.protobuf."):
        return st.one_of(st.just({}), WRONG)
    if depth <= 0:
        return st.just({})
    # Fields of the well-known types json_format alone converts (Struct...) are rare here:
    # the mappings that hold one are json_format's, and most should be fastjson's.
    fields = [f for f in desc.fields if not _json_format_only(f)]
    rare = [f for f in desc.fields if _json_format_only(f)]

    def build(draw: Any) -> Any:
        out: dict[Any, Any] = {}
        chosen = (
            draw(st.lists(st.sampled_from(fields), max_size=5, unique_by=_member)) if fields else []
        )
        if rare and draw(st.integers(0, 30)) == 0:
            chosen.append(draw(st.sampled_from(rare)))
        if fields and draw(st.integers(0, 30)) == 0:
            chosen.append(draw(st.sampled_from(fields)))  # maybe a oneof's second member
        for f in chosen:
            key = draw(st.sampled_from([f.name, f.json_name]))
            out[key] = draw(field_value(f, depth - 1))
        if draw(st.integers(0, 150)) == 0:
            out[draw(st.sampled_from(["nope", "[x]", "@type"]))] = 1
        return out

    return st.composite(lambda draw: build(draw))()


def field_value(field: Any, depth: int) -> st.SearchStrategy[Any]:
    msg = field.message_type
    if msg is not None and msg.GetOptions().map_entry:
        vf = msg.fields_by_name["value"]
        one = message_for(vf.message_type, depth) if vf.message_type else scalar_for(vf)
        return mostly(st.dictionaries(st.text(max_size=3), one, max_size=3))
    one = message_for(msg, depth) if msg is not None else scalar_for(field)
    if field.is_repeated:
        return mostly(st.lists(one, max_size=3))
    return one


RESOURCE = st.sampled_from(list(ResourceType))


@SETTINGS
@given(st.data())
def test_generated_mappings_convert_the_same(data: Any) -> None:
    rtype = data.draw(RESOURCE)
    cls = rtype.message_class
    body = data.draw(message_for(cls.DESCRIPTOR, 4))
    agree(body, cls)


def paths(value: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [here]
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(paths(v, (*here, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(paths(v, (*here, i)))
    return out


_CORPUS: list[tuple[Any, dict[str, Any]]] = []


@SETTINGS
@given(st.data())
def test_mutated_corpus_resources_convert_the_same(data: Any) -> None:
    if not _CORPUS:
        _CORPUS.extend(corpus())
    cls, body = data.draw(st.sampled_from(_CORPUS))
    body = copy.deepcopy(body)
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(paths(body)))
        if not where:
            continue
        parent = body
        for k in where[:-1]:
            parent = parent[k]
        action = data.draw(st.sampled_from(["replace", "delete", "twin", "unknown"]))
        last = where[-1]
        if action == "replace":
            parent[last] = data.draw(WRONG)
        elif action == "delete" and isinstance(parent, dict):
            del parent[last]
        elif action == "twin" and isinstance(parent, dict) and isinstance(last, str):
            camel = last.split("_")[0] + "".join(p.title() for p in last.split("_")[1:])
            parent[camel] = parent[last]
        elif action == "unknown" and isinstance(parent, dict):
            parent["no_such_field"] = 1
    agree(body, cls)


def test_a_type_url_with_a_lone_surrogate_is_an_unknown_type_not_a_crash() -> None:
    """Found by the mutation test above: the descriptor pool raises TypeError on '\\ud800'
    (json can carry one; YAML refuses it); both paths must treat it as an unknown type."""
    from envoy.config.cluster.v3.cluster_pb2 import Cluster

    body = {
        "name": "c",
        "typed_extension_protocol_options": {"x": {"@type": "type.googleapis.com/\ud800"}},
    }
    assert find_message("\ud800") is None
    agree(body, Cluster)

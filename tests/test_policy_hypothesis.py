"""Property tests of the loader: whatever a folder holds, ``FolderLoader.load()`` returns a
SnapshotSet or raises ConfigErrors (never anything else), and every error of a mutated
valid policy points at ``path:line:column``.

XDSPLANE_HYPOTHESIS_EXAMPLES=3000 runs a longer search (200 examples per test by default).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_policy_corpus import make_pki

from xdsplane.config.errors import ConfigErrors
from xdsplane.config.yamlsrc import parse
from xdsplane.pipeline import FolderLoader
from xdsplane.policy.model import PolicyFile
from xdsplane.snapshot import SnapshotSet

GOLDEN = Path(__file__).resolve().parent / "golden"
BASES = ("plain-http", "redirect", "upstreams", "tls")
SETTINGS = settings(
    max_examples=int(os.environ.get("XDSPLANE_HYPOTHESIS_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@cache
def pki_folder() -> Path:
    """The tls case's generated certificates and keys, made once per test session."""
    folder = Path(tempfile.mkdtemp(prefix="xdsplane-hypothesis-"))
    shutil.copy(GOLDEN / "tls" / "pki.txt", folder / "pki.txt")
    make_pki(folder)
    return folder


@contextmanager
def folder_with(files: dict[str, str]) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="xdsplane-hypothesis-") as tmp:
        root = Path(tmp) / "policies"
        shutil.copytree(pki_folder(), root)
        for name, text in files.items():
            (root / name).write_text(text)
        yield root


def load(root: Path) -> SnapshotSet | ConfigErrors:
    """What the loader makes of ``root``: any other exception fails the test."""
    try:
        return FolderLoader(root).load()
    except ConfigErrors as e:
        assert e.errors, "ConfigErrors without errors"
        return e


# -- anything at all -------------------------------------------------------------------------

FRAGMENTS = [
    *(f"{k}:" for k in PolicyFile.model_fields),
    "\n",
    "\n  ",
    "\n    ",
    "- ",
    "- name: x",
    "name: ",
    "address: 0.0.0.0:8080",
    "hosts:",
    "routes:",
    "domains: [a.example.com]",
    "prefix: /",
    "upstream: a",
    "endpoints: [10.0.0.1:80]",
    "redirect_to_https: true",
    "tls: {}",
    "{",
    "}",
    "[",
    "]",
    ", ",
    ": ",
    "&a ",
    "*a",
    "<<: *a",
    "!!binary ",
    "!!python/object ",
    "---\n",
    "...\n",
    "'",
    '"',
    "|\n",
    ">-\n",
    "# c",
    "\t",
    "~",
    "null",
    "1e309",
    "0x1F",
    "2001-01-01",
    "'\\x00'",
    "\ufeff",
    '"\\ud800"',
    "%YAML 1.2\n",
]
yamlish = st.lists(
    st.one_of(
        st.sampled_from(FRAGMENTS),
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8),
    ),
    max_size=40,
).map("".join)


@SETTINGS
@given(yamlish)
def test_any_text_loads_or_gives_config_errors(text: str) -> None:
    with folder_with({"policy.yaml": text}) as root:
        load(root)


KEYS = [
    *PolicyFile.model_fields,
    "name",
    "address",
    "hosts",
    "routes",
    "domains",
    "prefix",
    "upstream",
    "endpoints",
    "tls",
    "certificate",
    "private_key",
    "ca",
    "@type",
    "redirect_to_https",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "0.0.0.0:8080",
            "10.0.0.1:80",
            "/",
            "5s",
            "a",
            "x.example.com",
            "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "edge-*",
        ]
    ),
)
nested = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), children, max_size=5
        ),
    ),
    max_leaves=25,
)
top_level = st.dictionaries(st.sampled_from(KEYS), nested, max_size=6)


@SETTINGS
@given(st.lists(st.one_of(top_level, nested), min_size=1, max_size=3))
def test_any_nested_values_load_or_give_config_errors(docs: list[Any]) -> None:
    files = {f"f{i}.yaml": yaml.safe_dump(d, allow_unicode=True) for i, d in enumerate(docs)}
    with folder_with(files) as root:
        load(root)


# -- mutations of valid policies -------------------------------------------------------------


@cache
def base(case: str) -> dict[str, Any]:
    path = GOLDEN / case / "policy.yaml"
    (doc,) = parse(path.read_text(), str(path))
    assert isinstance(doc.value, dict)
    return doc.value


def paths(value: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            out.append((*at, k))
            out += paths(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.append((*at, i))
            out += paths(v, (*at, i))
    return out


REPLACEMENTS = [0, -1, 1.5, "", "x", "Bad Name", True, False, None, [], {}, ["x"], {"x": 1}]
DROP = object()


def mutate(doc: dict[str, Any], where: tuple[Any, ...], new: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    parent: Any = out
    for k in where[:-1]:
        parent = parent[k]
    if new is DROP:
        del parent[where[-1]]
    else:
        parent[where[-1]] = new
    return out


@SETTINGS
@given(st.data())
def test_mutated_policies_give_located_errors(data: st.DataObject) -> None:
    case = data.draw(st.sampled_from(BASES), label="case")
    doc = base(case)
    mutated = doc
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        where = data.draw(st.sampled_from(paths(mutated) or [("listeners",)]), label="where")
        new = data.draw(st.sampled_from([DROP, *REPLACEMENTS]), label="new")
        if where not in paths(mutated):
            continue
        mutated = mutate(mutated, where, new)
    text = yaml.safe_dump(mutated, sort_keys=False)
    with folder_with({"policy.yaml": text}) as root:
        result = load(root)
        if isinstance(result, SnapshotSet):
            return  # a harmless mutation (an optional key dropped, a default restated)
        prefix = re.compile(re.escape(str(root / "policy.yaml")) + r":\d+:\d+: \S")
        for error in result.errors:
            assert prefix.match(str(error)), (str(error), text)


def test_the_bases_are_valid() -> None:
    for case in BASES:
        with folder_with({"policy.yaml": yaml.safe_dump(base(case), sort_keys=False)}) as root:
            assert isinstance(load(root), SnapshotSet), case

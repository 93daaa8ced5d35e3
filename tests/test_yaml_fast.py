"""yamlsrc's fast path (``_parse_fast``) against the general builder (``_parse_general``):
the same values (types included), the same node positions, the same sizes of the mappings
and lists, the same errors, on every YAML file of the repository's corpora and on generated
texts (plain data, anchors and aliases, tags, duplicate keys, YAML 1.1 words, deep nesting).

XDSPLANE_HYPOTHESIS_EXAMPLES=3000 runs a longer search (300 examples per test by default).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdsplane.config import yamlsrc
from xdsplane.config.yamlsrc import YamlError

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = settings(
    max_examples=int(os.environ.get("XDSPLANE_HYPOTHESIS_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def typed(value: Any) -> Any:
    """``value`` with each scalar's type beside it (1, 1.0 and True compare equal)."""
    if isinstance(value, dict):
        return ("dict", [(k, typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [typed(v) for v in value])
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


def marks(node: Any) -> Any:
    """Every node's kind, start and end as the tree holds them (key and value nodes)."""
    kind = type(node).__name__
    here = (kind, node.start_mark.line, node.start_mark.column, node.end_mark.line)
    if isinstance(node, yaml.MappingNode):
        return (here, [(marks(k), marks(v)) for k, v in node.value])
    if isinstance(node, yaml.SequenceNode):
        return (here, node.flow_style, [marks(v) for v in node.value])
    return (here, node.value, node.style)


def outcome(parse: Any, text: str, depth: int = 0) -> Any:
    sizes: list[dict[int, int]] = []
    try:
        docs = parse(text, "f.yaml", sizes=sizes, depth=depth)
    except YamlError as e:
        return ("error", str(e.error))
    out = []
    for doc, known in zip(docs, sizes, strict=True):
        containers = []
        if doc.node is not None:
            todo = [doc.node]
            while todo:  # each mapping and list once (aliases share nodes)
                n = todo.pop()
                if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)) and id(n) in known:
                    containers.append((n.start_mark.index, known[id(n)]))
                if isinstance(n, yaml.MappingNode):
                    todo.extend(v for _, v in n.value)
                elif isinstance(n, yaml.SequenceNode):
                    todo.extend(n.value)
        out.append(
            (typed(doc.value), marks(doc.node) if doc.node else None, sorted(set(containers)))
        )
    return ("ok", out)


def same(text: str, depth: int = 0) -> bool:
    """Asserts the fast path and the general builder agree; True if the fast path took it."""
    general = outcome(yamlsrc._parse_general, text, depth)
    assert outcome(yamlsrc.parse, text, depth) == general
    try:
        yamlsrc._parse_fast(text, "f.yaml", depth)
    except Exception:
        return False
    return True


def corpus_files() -> list[Path]:
    out = []
    for folder in ("tests", "examples", "docs", "deploy"):
        base = ROOT / folder
        if base.is_dir():
            out.extend(sorted(base.rglob("*.yaml")) + sorted(base.rglob("*.yml")))
    return out


def test_corpus_files_parse_the_same() -> None:
    files = corpus_files()
    assert len(files) > 100
    fast = 0
    for path in files:
        try:
            text = path.read_text("utf-8")
        except UnicodeDecodeError:
            continue
        fast += same(text)
    assert fast > len(files) // 2, f"the fast path took only {fast} of {len(files)} files"


def test_benchmark_folder_takes_the_fast_path(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _snapgen
    finally:
        sys.path.pop(0)
    _snapgen.generate(tmp_path, _snapgen.Shape(clusters=40, listeners=4, cluster_files=2))
    files = sorted(tmp_path.rglob("*.yaml"))
    assert files
    for path in files:
        assert same(path.read_text()), path


@pytest.mark.parametrize(
    "text",
    [
        "a: 1\na: 2\n",  # duplicate key
        "? [a]\n: 1\n",  # non-scalar key
        "a: &x {b: 1}\nc: *x\n",  # alias
        "a: &x [1, *x]\n",  # recursive alias
        "a: !!binary aGVsbG8=\n",
        "a: !!str 1\nb: !!int '2'\n",
        "<<: {a: 1}\nb: 2\n",
        "a: {<<: {b: 1}}\n",
        "!!merge <<: {a: 1}\n",
        "on: off\nyes: no\n",
        "a: [0x1F, 0o17, 017, 1_000, +1, -0, .5, 1e3, 1.5e-3, .inf, -.Inf, .nan, ~, null, Null]\n",
        "a: [true, True, TRUE, false, tRue, 2001-12-14, 1:30]\n",
        "a: " + "9" * 101 + "\n",
        "a: '\\ud800'\nb: \"\\ud800\"\n",
        "- a\n- b: c\n  d: [e, {f: g}]\n",
        "just a string\n",
        "",
        "---\na: 1\n---\nb: 2\n...\n",
        "---\na: 1\n---\n- [\n",
        "a: b: c\n",
        "a:\n  - 1\n - 2\n",
        "a: !custom 1\n",
        "! a: ! b\n",
        "a: '' \nb: \"\"\nc:\n",
        "[" * 205 + "]" * 205 + "\n",
        "a: " + "[" * 199 + "]" * 199 + "\n",
        "a: " + "[" * 200 + "]" * 200 + "\n",
        "a: " + "[" * 199 + "1" + "]" * 199 + "\n",
        "x: \x01\n",
    ],
)
def test_edge_cases_parse_the_same(text: str) -> None:
    same(text)
    same(text, depth=1)


def test_a_billion_laughs_is_refused_the_same() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    text = "\n".join(lines) + "\n"
    result = outcome(yamlsrc.parse, text)
    assert result[0] == "error" and "expands to more than" in result[1]
    same(text)


def test_too_many_values_without_aliases_is_refused_the_same(monkeypatch: Any) -> None:
    monkeypatch.setattr(yamlsrc, "MAX_VALUES", 50)
    text = "a: [" + ", ".join(str(i) for i in range(60)) + "]\n"
    assert outcome(yamlsrc.parse, text)[0] == "error"
    same(text)
    same("a: [" + ", ".join(str(i) for i in range(20)) + "]\n")


scalars = st.one_of(
    st.sampled_from(
        [
            "on",
            "off",
            "yes",
            "~",
            "null",
            "0x1F",
            "0o17",
            "1_000",
            ".inf",
            "-.INF",
            ".NaN",
            "1e3",
            "+12",
            "-0",
            "2001-12-14",
            "1:30",
            "true",
            "False",
            "*.example.com",
            "a: b",
            "- x",
            "#c",
            "'q'",
            '"d"',
            "&a",
            "*a",
            "!t",
            "",
            " ",
            "é",
            "\t",
        ]
    ),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
)
keys = st.one_of(
    st.sampled_from(["a", "b", "name", "on", "1", "<<", "null", "x y"]), st.text(max_size=6)
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)
    ),
    max_leaves=25,
)


@SETTINGS
@given(values, st.booleans(), st.booleans())
def test_dumped_values_parse_the_same(value: Any, flow: bool, canonical: bool) -> None:
    text = yaml.safe_dump(
        {"v": value}, default_flow_style=flow, canonical=canonical, allow_unicode=True
    )
    same(text)


pieces = st.sampled_from(
    [
        "a: 1\n",
        "a: 2\n",
        "b: &x {c: 1}\n",
        "d: *x\n",
        "e: !!binary aGVsbG8=\n",
        "f: !!str 3\n",
        "<<: {g: 1}\n",
        "h: [1, 2, {i: j}]\n",
        "k:\n  - l\n  - m: n\n",
        "o: |\n  text\n  more\n",
        "p: 'q'\n",
        "r: 1_000\n",
        "s: 2001-12-14\n",
        "t: [\n",
        "u: ]\n",
        "---\n",
        "v: ' x\n",
        'w: "\\x41"\n',
        "x: !custom y\n",
        "  y: 1\n",
        "? z\n: 1\n",
        "? [z]\n: 1\n",
        "- 1\n",
    ]
)


@SETTINGS
@given(st.lists(pieces, max_size=8))
def test_assembled_texts_parse_the_same(parts: list[str]) -> None:
    same("".join(parts))

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


def shallow(node: Any, levels: int = yamlsrc.SHALLOW) -> Any:
    """What ``Document.top`` promises: kinds, starts, key texts and flow styles of the first
    ``levels`` levels below the root (the containers of the last one without children)."""
    start = node.start_mark
    here = (type(node).__name__, start.index, start.line, start.column)
    if isinstance(node, yaml.ScalarNode):
        return (here, node.value)
    if levels == 0:
        return (here, node.flow_style)
    if isinstance(node, yaml.MappingNode):
        pairs = [(shallow(k, 0), shallow(v, levels - 1)) for k, v in node.value]
        return (here, node.flow_style, pairs)
    return (here, node.flow_style, [shallow(v, levels - 1) for v in node.value])


def sized(node: Any, known: dict[int, int], levels: int) -> list[tuple[int, int]]:
    """(start, size) of each mapping and list of ``levels`` levels of ``node`` (once each)."""
    out, seen, todo = [], set(), [(node, 0)]
    while todo:
        n, level = todo.pop()
        if id(n) in seen or level > levels:
            continue
        seen.add(id(n))
        if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
            out.append((n.start_mark.index, known[id(n)]))
        if isinstance(n, yaml.MappingNode):
            todo.extend((v, level + 1) for _, v in n.value)
        elif isinstance(n, yaml.SequenceNode):
            todo.extend((v, level + 1) for v in n.value)
    return sorted(set(out))


def outcome(parse: Any, text: str | bytes, depth: int = 0, deep: bool = False) -> Any:
    """What a parse gives: values with their types, the whole node tree's positions, the
    first levels as ``top`` holds them, the sizes (of every container if ``deep``, else of
    those of ``top``), or the error."""
    sizes: list[dict[int, int]] = []
    try:
        docs = parse(text, "f.yaml", sizes=sizes, depth=depth)
    except YamlError as e:
        return ("error", str(e.error))
    out = []
    for doc, known in zip(docs, sizes, strict=True):
        top = doc.top
        levels = 1000 if deep else yamlsrc.SHALLOW
        out.append(
            (
                typed(doc.value),
                marks(doc.node) if doc.node else None,
                shallow(top) if top else None,
                sized(top, known, levels) if top else None,
                [(loc(doc, keys), loc(doc, keys, key=True)) for keys in paths(doc.value)],
            )
        )
    return ("ok", out)


def paths(value: Any, here: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every key path in ``value`` (the first 200), and one that goes nowhere."""
    out = [here, (*here, "no such key")]
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(paths(v, (*here, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(paths(v, (*here, i)))
    return out[:200]


def loc(doc: yamlsrc.Document, keys: tuple[str | int, ...], key: bool = False) -> str:
    return str(doc.locate_key(keys) if key else doc.locate(keys))


def python_fast(text: str | bytes, path: str, **kw: Any) -> list[yamlsrc.Document]:
    """``parse`` as it runs without the compiled module (``_parse_fast``, PyYAML's nodes)."""
    saved = yamlsrc._C
    yamlsrc._C = None
    try:
        return yamlsrc.parse(text, path, **kw)
    finally:
        yamlsrc._C = saved


def same(text: str | bytes, depth: int = 0) -> bool:
    """Asserts both fast paths and the general builder agree (values, positions, located
    keys, sizes, errors); True if the compiled path took it."""
    general = outcome(yamlsrc._parse_general, text, depth)
    assert outcome(yamlsrc.parse, text, depth) == general
    assert outcome(python_fast, text, depth, deep=True) == outcome(
        yamlsrc._parse_general, text, depth, deep=True
    )
    try:
        return yamlsrc._parse_c(text, "f.yaml", depth) is not None
    except Exception:
        return False


def test_the_compiled_fast_path_is_built() -> None:
    """setup.py builds it where gcc and libyaml's header are (CI installs libyaml-dev):
    without it the cold load is ~2x slower (BENCHMARKS.md), not wrong."""
    assert yamlsrc._C is not None


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
        # hostile or unusual: the compiled path gives up or agrees
        "a: &x 1\nb: 2\n",  # an anchor with no alias
        "&r {a: 1}\n",  # an anchor on the root
        "a: 1\n'a': 2\n",  # duplicate key, one quoted
        "1: a\n'1': b\n",  # keys kept as written: a duplicate
        "? a\n: 1\n? b\n",
        "~: 1\nnull: 2\n",
        "[a: 1, b]\n",  # single-pair mappings in a flow list
        "a: {b: [c, {d: e}], f: {}}\ng: []\n",
        "a: " + "1" * 100 + "\nb: -" + "2" * 99 + "\n",
        "a: 18446744073709551616\nb: 0x" + "f" * 40 + "\n",
        "a: [.inf, -.inf, +.inf, .NaN, .nan, .NAN, 1., 1.e5, 0.0, -0.0, 1e400]\n",
        "a: [2001-12-14t21:59:43.10-05:00, 2002-12-14, 12:30:45]\n",
        "a: [017, 0o17, 0b11, 0x1f, 0X1F, 1_0, 010.5, 0o8, 09]\n",
        "a: [yes, no, on, off, y, n, Yes, NO, On, OFF]\n",
        "\ufeffa: 1\n",  # a byte-order mark
        "a:\tb\nc:\t1\n",  # tabs after the colon
        "a:\n\t- b\n",  # a tab for indentation
        "- a\n-\tb\n",
        "---\n---\na: 1\n---\n",  # empty documents
        "%YAML 1.1\n---\na: yes\n",
        "%TAG !e! tag:example.com,2000:\n---\na: !e!x 1\n",
        "a: |\n  text\n   more\nb: >-\n  folded\n  text\n",
        "a: 'it''s'\nb: \"\\t\\u00e9\\x41\"\nc: plain # comment\n",
        "a: b\r\nc: d\r\n",  # CRLF
        "a: b\u2028c: d\n",
        'a: "\\0"\n',
        "a: [\n  1,\n  2,\n]\n",
        "- [a, b]\n- {c: d}\n- - e\n  - f\n",
        "a:\n- b\n- c\nd: e\n",
        "resources:\n  - {a: 1}\n  - b: 2\n    c: [3]\n  -\n  - - x\n",
        "é: ü\n\U0001f600: [\U0001f600]\n",
        "a: " + "x" * 100000 + "\n",
        "!!map {a: 1}\n",
        "a: !!null ''\nb: !!float 1\n",
        "a: !<tag:yaml.org,2002:str> 1\n",
        "{a: 1, a: 1}\n",
    ],
)
def test_edge_cases_parse_the_same(text: str) -> None:
    same(text)
    same(text, depth=1)


@pytest.mark.parametrize(
    "data",
    [
        b"a: 1\nb: [x, y]\n",
        b"\xef\xbb\xbfa: 1\n",  # UTF-8 with a byte-order mark
        "a: \u00e9\n".encode("utf-16"),  # UTF-16, its byte-order mark first
        "a: \u00e9\n".encode("utf-16-be"),  # UTF-16 without one
        b"a: \xff\xfe\n",  # not UTF-8
        b"a: \xc3\n",  # a sequence cut short
        b"a: \xed\xa0\x80\n",  # an encoded surrogate
        b"a: \x00\n",
        b"",
    ],
)
def test_bytes_parse_the_same(data: bytes) -> None:
    same(data)


def test_text_that_cannot_be_encoded_fails_as_the_general_path_does() -> None:
    text = "a: \ud800\n"  # a lone surrogate in a str (files are decoded strictly first)
    for parse in (yamlsrc.parse, python_fast, yamlsrc._parse_general):
        with pytest.raises(UnicodeEncodeError):
            parse(text, "f.yaml")


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


def test_the_compiled_path_lets_other_threads_run() -> None:
    """It holds the GIL while it builds values: a big file must not stall the server's event
    loop (another thread) for the whole parse. Not a time bound: the other thread must have
    run in the middle half of the one call (without the yields in _yamlc.c it can run only
    before the call starts or after it returns)."""
    import threading
    import time

    # the same scalars again and again: resolved from the memo, no call into Python (whose
    # bytecode would let the other thread in by itself)
    data = b"resources:\n" + b"  - {name: svc, port: 80, tags: [a, b, c], meta: {x: 1}}\n" * 80_000
    yamlsrc.parse(data[: data.index(b"}}\n") + 3], "warm.yaml")
    stamps: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            stamps.append(time.perf_counter())

    other = threading.Thread(target=spin)
    other.start()
    try:
        while not stamps:
            pass
        start = time.perf_counter()
        found = yamlsrc._C.load(
            data, yamlsrc._PLAIN, yamlsrc._plain, 0, yamlsrc.MAX_DEPTH, 10**7, frozenset()
        )
        end = time.perf_counter()
    finally:
        stop.set()
        other.join()
    assert found is not None and len(found[0][0]["resources"]) == 80_000
    quarter = (end - start) / 4
    assert any(start + quarter < t < end - quarter for t in stamps)

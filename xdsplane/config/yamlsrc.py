"""YAML with positions: plain Python values plus the node tree to find any value's line.

PyYAML's C loader composes the node tree; values are built from it here, so that
duplicate keys are errors (PyYAML silently keeps the last) and alias expansion is bounded
(a "billion laughs" document is refused instead of eating the memory).
"""

from __future__ import annotations

import datetime
import importlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from xdsplane.config.errors import ConfigError, Location

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_Base):  # type: ignore[misc]
    """The C loader with YAML 1.2 core-schema scalars.

    YAML 1.1 makes ``on``, ``off``, ``yes`` and ``no`` booleans and ``1:30`` the number 90,
    which turns ``client_certificate: off`` into ``False``. Here only true/false are
    booleans, and numbers are plain decimal, 0x hex, 0o octal or floats.
    """

    yaml_implicit_resolvers: ClassVar[dict[str, Any]] = {}

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        # Plain scalars repeat (keys above all): remember what each resolved to.
        if kind is yaml.ScalarNode and implicit[0]:
            memo: dict[str, Any] = self.__dict__.setdefault("_tags", {})
            tag = memo.get(value)
            if tag is None:
                tag = memo[value] = super().resolve(kind, value, implicit)
            return tag
        return super().resolve(kind, value, implicit)

    def construct_yaml_int(self, node: Any) -> int:
        value = str(self.construct_scalar(node)).replace("_", "")
        sign = -1 if value.startswith("-") else 1
        digits = value.lstrip("+-")
        if len(digits) > MAX_INT_DIGITS:  # Python refuses to convert more than 4300 digits
            raise yaml.constructor.ConstructorError(
                None, None, f"a number of {len(digits)} digits is too long", node.start_mark
            )
        if digits[:2] in ("0x", "0o"):
            return sign * int(digits, 0)
        return sign * int(digits, 10)


for _tag, _pattern, _first in (
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("tag:yaml.org,2002:int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        "tag:yaml.org,2002:float",
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+0123456789."),
    ),
):
    _Loader.add_implicit_resolver(_tag, re.compile(_pattern), _first)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)

MAX_INT_DIGITS = 100  # far more than any field takes (uint64 is 20 digits)
MAX_VALUES = 1_000_000  # values built from one file, aliases expanded
MAX_DEPTH = 200


class YamlError(Exception):
    def __init__(self, error: ConfigError) -> None:
        super().__init__(str(error))
        self.error = error


SHALLOW = 2  # levels below a document's root that ``Document.top`` holds (``_yamlc``)


@dataclass(frozen=True, slots=True)
class Document:
    """One parsed YAML document: its value and the node tree it came from.

    From the C path (``_yamlc``) the tree is composed only when asked for (``node``: an
    error to locate deeper than ``SHALLOW`` levels), from the text kept for it, by the
    general loader; ``top`` holds the first levels (kinds, positions, key texts, flow
    styles; the containers of the last level without their children), which locating a
    resource and laying out a raw file need."""

    path: str
    value: Any
    _node: yaml.Node | None
    # id(mapping node) -> key -> (key node, value node): built once per mapping, so that
    # finding every key of a huge mapping (an error each) stays linear.
    _index: dict[int, dict[str, tuple[yaml.Node, yaml.Node]]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _top: yaml.Node | None = field(default=None, compare=False, repr=False)
    # (text, which document of it) to compose ``node`` from, until it is composed
    _source: tuple[str | bytes, int] | None = field(default=None, compare=False, repr=False)
    # (the keys noted when parsed, each (key, value) of them met anywhere in the document)
    _noted: tuple[frozenset[str], list[tuple[str, Any]]] | None = field(
        default=None, compare=False, repr=False
    )

    def noted(self, keys: frozenset[str]) -> list[tuple[str, Any]] | None:
        """(key, value) for each mapping key in ``keys`` anywhere in ``value``, when the
        parse noted them (``note_keys``); None when not known (then walk ``value``)."""
        if self._noted is None or not keys <= self._noted[0]:
            return None
        return [pair for pair in self._noted[1] if pair[0] in keys]

    @property
    def node(self) -> yaml.Node | None:
        """The document's node tree (as the general loader composes it)."""
        source = self._source
        if source is not None and self._node is None:
            object.__setattr__(self, "_node", _compose(*source))
            object.__setattr__(self, "_source", None)
        return self._node

    @property
    def top(self) -> yaml.Node | None:
        """The first ``SHALLOW`` levels of ``node`` below the root (the whole tree if kept)."""
        return self._top if self._top is not None else self.node

    def _tree(self, levels: int) -> yaml.Node | None:
        """A tree that holds the nodes ``levels`` keys below the root."""
        if levels <= SHALLOW and self._top is not None:
            return self._top
        return self.node

    def _entry(self, node: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
        index = self._index.get(id(node))
        if index is None:
            index = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    index.setdefault(k.value, (k, v))
            self._index[id(node)] = index
        return index.get(key)

    def _child(self, node: yaml.Node, key: str | int) -> yaml.Node | None:
        if isinstance(node, yaml.MappingNode):
            entry = self._entry(node, key) if isinstance(key, str) else None
            return entry[1] if entry is not None else None
        return _child(node, key)

    def locate(self, keys: tuple[str | int, ...]) -> Location:
        """The location of the value at ``keys`` (or of the deepest part of it that exists)."""
        node = self._tree(len(keys))
        best = node
        for key in keys:
            if node is None:
                break
            node = self._child(node, key)
            if node is not None:
                best = node
        if best is None:
            return Location(self.path, 1, 1)
        return Location(self.path, best.start_mark.line + 1, best.start_mark.column + 1)

    def locate_key(self, keys: tuple[str | int, ...]) -> Location:
        """The location of the mapping key at ``keys`` (its last element names the key)."""
        if not keys:
            return self.locate(keys)
        parent = self._walk(self._tree(len(keys)), keys[:-1])
        if isinstance(parent, yaml.MappingNode) and isinstance(keys[-1], str):
            entry = self._entry(parent, keys[-1])
            if entry is not None:
                k = entry[0]
                return Location(self.path, k.start_mark.line + 1, k.start_mark.column + 1)
        return self.locate(keys)

    def locate_node(self, keys: tuple[str | int, ...]) -> yaml.Node | None:
        return self._walk(self._tree(len(keys)), keys)

    def _walk(self, node: yaml.Node | None, keys: tuple[str | int, ...]) -> yaml.Node | None:
        for key in keys:
            if node is None:
                return None
            node = self._child(node, key)
        return node


def _compose(text: str | bytes, which: int) -> yaml.Node | None:
    """Document ``which`` of ``text`` composed by the general loader (the tree
    ``_parse_general`` keeps); None should it fail (it parsed once: it does not)."""
    loader = _Loader(text)
    try:
        n = 0
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            if n == which:
                return node  # type: ignore[no-any-return]
            n += 1
    except yaml.YAMLError:
        return None
    finally:
        loader.dispose()
    return None


def _child(node: yaml.Node, key: str | int) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode) and isinstance(key, str):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v  # type: ignore[no-any-return]
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
        return node.value[key]  # type: ignore[no-any-return]
    return None


def _loc(path: str, mark: Any) -> Location:
    if mark is None:
        return Location(path)
    return Location(path, mark.line + 1, mark.column + 1)


class _Builder:
    def __init__(self, path: str, loader: Any) -> None:
        self.path = path
        self.loader = loader
        self.count = 0

    def check_size(self, node: yaml.Node, sizes: dict[int, int]) -> int:
        """How many values ``node`` expands to, aliases included; refuses a bomb at once.

        Aliases share nodes, so each node is sized once: the check costs the size of the
        document as written, and names the first value that expands too far.
        """
        key = id(node)
        known = sizes.get(key)
        if known is not None:
            return known
        sizes[key] = 1  # a node that contains itself counts once; build() bounds its depth
        total = 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += self.check_size(k, sizes) + self.check_size(v, sizes)
        elif isinstance(node, yaml.SequenceNode):
            for v in node.value:
                total += self.check_size(v, sizes)
        if total > MAX_VALUES:
            raise YamlError(
                ConfigError(
                    _loc(self.path, node.start_mark),
                    f"document expands to more than {MAX_VALUES} values (aliases?)",
                )
            )
        sizes[key] = total
        return total

    def build(self, node: yaml.Node, depth: int = 0) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise YamlError(
                ConfigError(
                    _loc(self.path, node.start_mark),
                    f"document expands to more than {MAX_VALUES} values (aliases?)",
                )
            )
        if depth > MAX_DEPTH:
            raise YamlError(
                ConfigError(
                    _loc(self.path, node.start_mark), f"nesting deeper than {MAX_DEPTH} levels"
                )
            )
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)
            out: dict[Any, Any] = {}
            for knode, vnode in node.value:
                # Keys are names: kept as written (``on:`` is the key "on", not True).
                key = knode.value if isinstance(knode, yaml.ScalarNode) else None
                if key is None:
                    raise YamlError(
                        ConfigError(_loc(self.path, knode.start_mark), "a key must be a scalar")
                    )
                if key in out:
                    raise YamlError(
                        ConfigError(_loc(self.path, knode.start_mark), f"duplicate key {key!r}")
                    )
                out[key] = self.build(vnode, depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, depth + 1) for v in node.value]
        value = self.loader.construct_object(node, deep=True)
        if isinstance(value, (datetime.date, datetime.datetime)):
            return node.value  # keep timestamps as written: proto JSON wants strings
        if isinstance(value, bytes):
            raise YamlError(
                ConfigError(_loc(self.path, node.start_mark), "binary values are not supported")
            )
        return value


def _reader_error(path: str, text: str | bytes, e: Any) -> ConfigError:
    """A character YAML does not allow (NUL, other control characters), located."""
    pos = int(e.position)
    if isinstance(text, str):
        line = text.count("\n", 0, pos) + 1
        column = pos - (text.rfind("\n", 0, pos) + 1) + 1
    else:
        line = column = 0
    char = e.character if isinstance(e.character, int) else ord(str(e.character)[:1] or "\0")
    hint = " (UTF-16 text? save the file as UTF-8)" if char == 0 else ""
    return ConfigError(
        Location(path, line, column),
        f"invalid YAML: control character U+{char:04X} is not allowed{hint}",
    )


class _Slow(Exception):
    """The fast builder met something only the general one handles (or an error to word)."""


class _FastLoader(_Base):  # type: ignore[misc]
    """The C composer with resolution left to ``_fast_values``: libyaml calls ``resolve``
    for every untagged node, and ``slice`` (a C constructor taking the same three arguments)
    keeps them as ``slice(kind, value, (plain, quoted))`` at a fraction of a Python call's
    cost. Nodes given an explicit tag keep it as a string (``_fast_values`` then gives up).
    The composer also calls ``descend_resolver(parent, index)`` and ``ascend_resolver()``
    around every node, which only path resolvers use (there are none): C no-ops too."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.resolve = slice
        self.descend_resolver = slice
        self.ascend_resolver = tuple


def _bind() -> Any:
    """The compiled fast path (``_yamlc.c``, built by setup.py where a C compiler and
    libyaml's header are), tied to the libyaml of PyYAML's own C module; None without it."""
    if os.environ.get("XDSPLANE_YAML_NO_C"):  # tests and benchmarks: the Python paths
        return None
    try:
        from xdsplane.config import _yamlc

        _yamlc.bind(str(importlib.import_module("yaml._yaml").__file__))
    except (ImportError, AttributeError, OSError, TypeError):
        return None
    return _yamlc


_C: Any = _bind()
_NOTED: frozenset[str] = frozenset()


def note_keys(keys: frozenset[str]) -> None:
    """Have the C path list these keys' values as it parses (``Document.noted``): a check
    that looks for a few keys anywhere then need not walk every value (tlsrules.py)."""
    global _NOTED
    _NOTED = _NOTED | keys


_Mark: Any = getattr(getattr(yaml, "_yaml", None), "Mark", yaml.Mark)
_SCALARS: Any = _Loader("")  # resolves and constructs plain scalars for the memo below
_PLAIN: dict[str, Any] = {}  # plain scalar as written -> its value (immutable values only)
_PLAIN_LIMIT = 100_000


def _plain(text: str) -> Any:
    """The value of a plain (unquoted) scalar, as ``_Loader`` resolves and constructs it."""
    tag = _SCALARS.resolve(yaml.ScalarNode, text, (True, False))
    try:
        value = _SCALARS.yaml_constructors[tag](_SCALARS, yaml.ScalarNode(tag, text))
    except Exception:  # a number too long: the general builder words the error
        raise _Slow from None
    if not isinstance(value, (str, int, float, type(None))):  # bool is an int
        raise _Slow
    if len(_PLAIN) >= _PLAIN_LIMIT:
        _PLAIN.clear()
    _PLAIN[text] = value
    return value


_NOTHING = object()


def _fast_values(root: yaml.Node, depth: int) -> tuple[Any, dict[int, int]]:
    """The value of a document composed by ``_FastLoader`` and the size of each mapping and
    list in it (as ``_Builder.check_size`` counts: keys included), in one pass.

    Raises _Slow on anything but plain data: an alias (a node met twice), an explicit tag,
    a duplicate or non-scalar key, nesting near ``MAX_DEPTH``, more than ``MAX_VALUES``
    values. The caller then parses with the general builder, which gives the same value or
    the error worded as always."""
    sizes: dict[int, int] = {}
    counter = 0
    plain = _PLAIN
    scalar_node: Any = yaml.ScalarNode
    mapping_node: Any = yaml.MappingNode

    def scalar(node: Any) -> Any:
        tag = node.tag
        if tag.__class__ is not slice:
            raise _Slow
        if tag.step[0]:
            value = plain.get(node.value, _NOTHING)
            return _plain(node.value) if value is _NOTHING else value
        return node.value

    def container(node: Any, level: int) -> Any:
        nonlocal counter
        key = id(node)
        if key in sizes or level >= MAX_DEPTH:
            raise _Slow
        sizes[key] = 0
        start = counter
        items = node.value
        if node.__class__ is mapping_node:
            counter += 2 * len(items)
            if counter >= MAX_VALUES:
                raise _Slow
            out: Any = {}
            for knode, vnode in items:
                if knode.__class__ is not scalar_node or knode.tag.__class__ is not slice:
                    raise _Slow
                if vnode.__class__ is scalar_node:  # scalar() inlined: most values
                    tag = vnode.tag
                    value = vnode.value
                    if tag.__class__ is not slice:
                        raise _Slow
                    if tag.step[0]:
                        found = plain.get(value, _NOTHING)
                        value = _plain(value) if found is _NOTHING else found
                    out[knode.value] = value
                else:
                    out[knode.value] = container(vnode, level + 1)
            if len(out) != len(items):
                raise _Slow  # a duplicate key
        else:
            counter += len(items)
            if counter >= MAX_VALUES:
                raise _Slow
            out = [
                scalar(v) if v.__class__ is scalar_node else container(v, level + 1) for v in items
            ]
        sizes[key] = 1 + counter - start
        return out

    if root.__class__ is scalar_node:
        raise _Slow
    return container(root, depth), sizes


def _parse_fast(
    text: str | bytes, path: str, depth: int
) -> tuple[list[Document], list[dict[int, int]]]:
    loader = _FastLoader(text)
    docs: list[Document] = []
    sizes: list[dict[int, int]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            value, known = _fast_values(node, depth)
            sizes.append(known)
            docs.append(Document(path, value, node))
    finally:
        loader.dispose()
    return docs, sizes


def parse(
    text: str | bytes,
    path: str,
    *,
    sizes: list[dict[int, int]] | None = None,
    depth: int = 0,
) -> list[Document]:
    """Parse every document in ``text``; raises YamlError with the position of the problem.

    ``sizes``, when given, receives per document how many values each mapping and list
    expands to (by ``id(node)``, for the containers of ``Document.top``); ``depth`` is the
    nesting the documents start at (a part of a file parsed alone, ``pipeline/chunks.py``,
    is bounded as it would be in its file).

    Plain data (no alias, anchor or explicit tag, no error) takes a fast path: the C one
    (``_yamlc``, values straight from libyaml's events) when it is built, else
    ``_parse_fast`` (PyYAML's nodes); anything else, and every error, is parsed again by
    the general builder (``_parse_general``), whose values, positions and errors the fast
    paths reproduce (tests/test_yaml_fast.py).
    """
    if _C is not None:
        try:
            found = _parse_c(text, path, depth)
        except Exception:  # a scalar the resolver gives up on, text not UTF-8
            found = None
        if found is None:
            return _parse_general(text, path, sizes=sizes, depth=depth)
        docs, known = found
    else:
        try:
            docs, known = _parse_fast(text, path, depth)
        except Exception:  # _Slow, or an error the general builder words as always
            return _parse_general(text, path, sizes=sizes, depth=depth)
    if sizes is not None:
        sizes.extend(known)
    return docs


def _parse_c(
    text: str | bytes, path: str, depth: int
) -> tuple[list[Document], list[dict[int, int]]] | None:
    """``_parse_fast`` by ``_yamlc``: None where that gives up (not plain data, an error)."""
    assert _C is not None
    data = text.encode("utf-8") if isinstance(text, str) else text
    noted = _NOTED
    found = _C.load(data, _PLAIN, _plain, depth, MAX_DEPTH, MAX_VALUES, noted)
    if found is None:
        return None
    name = "<unicode string>" if isinstance(text, str) else "<byte string>"
    docs: list[Document] = []
    sizes: list[dict[int, int]] = []
    for n, (value, shape, pairs) in enumerate(found):
        known: dict[int, int] = {}
        top = _shallow(shape, name, known)
        docs.append(Document(path, value, None, _top=top, _source=(text, n), _noted=(noted, pairs)))
        sizes.append(known)
    return docs, sizes


def _shallow(shape: Any, name: str, sizes: dict[int, int]) -> yaml.Node:
    """The nodes ``_yamlc`` describes in ``shape`` (see _yamlc.c), with their sizes."""
    kind, index, line, column, flow, size, children, text = shape
    mark = _Mark(name, index, line, column, None, None)
    if kind == 0:
        return yaml.ScalarNode("tag:yaml.org,2002:str", text, mark, mark)
    node: yaml.Node
    if kind == 1:
        items = [_shallow(c, name, sizes) for c in children or ()]
        node = yaml.SequenceNode("tag:yaml.org,2002:seq", items, mark, mark, flow)
    else:
        pairs = [(_shallow(k, name, sizes), _shallow(v, name, sizes)) for k, v in children or ()]
        node = yaml.MappingNode("tag:yaml.org,2002:map", pairs, mark, mark, flow)
    sizes[id(node)] = size
    return node


def _parse_general(
    text: str | bytes,
    path: str,
    *,
    sizes: list[dict[int, int]] | None = None,
    depth: int = 0,
) -> list[Document]:
    """``parse`` by the general builder: aliases bounded, every error located."""
    loader = _Loader(text)
    docs: list[Document] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            builder = _Builder(path, loader)
            known: dict[int, int] = {}
            builder.check_size(node, known)
            value = builder.build(node, depth)
            if sizes is not None:
                sizes.append(known)
            docs.append(Document(path, value, node))
    except yaml.reader.ReaderError as e:
        raise YamlError(_reader_error(path, text, e)) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context or "invalid YAML"
        raise YamlError(ConfigError(_loc(path, mark), f"invalid YAML: {problem}")) from None
    except yaml.YAMLError as e:
        raise YamlError(ConfigError(Location(path), f"invalid YAML: {e}")) from None
    except RecursionError:
        raise YamlError(ConfigError(Location(path), "invalid YAML: nested too deeply")) from None
    finally:
        loader.dispose()
    return docs

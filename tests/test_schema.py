"""`xdsplane schema` and docs/policy.md against the policy models, so neither can drift.

The JSON Schema is checked with a small validator below (the subset of JSON Schema that
pydantic emits; an unknown keyword fails the test), and also with the `jsonschema` package
when it happens to be installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from xdsplane.config.yamlsrc import parse
from xdsplane.policy.model import PolicyFile
from xdsplane.schema import DIALECT, TITLE, dumps, policy_schema

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "policy.md"
CORPUS = Path(__file__).resolve().parent / "policy_corpus"


def run_schema() -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "xdsplane", "schema"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def models() -> list[type[BaseModel]]:
    """Every model reachable from PolicyFile, in the order first met."""
    seen: list[type[BaseModel]] = []

    def walk(t: Any) -> None:
        if isinstance(t, type) and issubclass(t, BaseModel):
            if t in seen:
                return
            seen.append(t)
            for f in t.model_fields.values():
                walk(f.annotation)
        for a in get_args(t):
            walk(a)

    walk(PolicyFile)
    return seen


# -- a small JSON Schema validator (the subset pydantic emits) -------------------------------

_IGNORED = {"title", "description", "default", "examples", "$schema", "$defs"}
_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "") -> list[str]:
    """Problems found, as 'path: what'; empty when ``value`` is valid."""
    out: list[str] = []
    for key, want in schema.items():
        if key in _IGNORED:
            continue
        if key == "$ref":
            assert want.startswith("#/$defs/"), want
            out += validate(value, root["$defs"][want[len("#/$defs/") :]], root, at)
        elif key == "type":
            names = want if isinstance(want, list) else [want]
            if not any(_is_type(value, n) for n in names):
                out.append(f"{at}: not {want}")
        elif key == "enum":
            if value not in want or any(type(value) is not type(w) for w in want if w == value):
                out.append(f"{at}: {value!r} not in {want}")
        elif key == "const":
            if value != want:
                out.append(f"{at}: {value!r} is not {want!r}")
        elif key == "anyOf":
            tried = [validate(value, s, root, at) for s in want]
            if all(tried):
                closest: list[str] = min(tried, key=len)  # the nearest branch says why
                out += closest
        elif key == "allOf":
            for s in want:
                out += validate(value, s, root, at)
        elif key == "properties":
            if isinstance(value, dict):
                for name, sub in want.items():
                    if name in value:
                        out += validate(value[name], sub, root, f"{at}.{name}")
        elif key == "additionalProperties":
            if isinstance(value, dict):
                extra = [k for k in value if k not in schema.get("properties", {})]
                for k in extra:
                    if want is False:
                        out.append(f"{at}: unknown key {k!r}")
                    elif isinstance(want, dict):
                        out += validate(value[k], want, root, f"{at}.{k}")
        elif key == "propertyNames":
            if isinstance(value, dict):
                for k in value:
                    out += validate(k, want, root, f"{at}[{k!r}]")
        elif key == "required":
            if isinstance(value, dict):
                out += [f"{at}: missing {k!r}" for k in want if k not in value]
        elif key == "items":
            if isinstance(value, list):
                for i, item in enumerate(value):
                    out += validate(item, want, root, f"{at}[{i}]")
        elif key in ("minItems", "minProperties", "minLength"):
            if isinstance(value, (list, dict, str)) and len(value) < want:
                out.append(f"{at}: shorter than {want}")
        elif key in ("maxItems", "maxProperties", "maxLength"):
            if isinstance(value, (list, dict, str)) and len(value) > want:
                out.append(f"{at}: longer than {want}")
        elif key == "pattern":
            if isinstance(value, str) and not re.search(want, value):
                out.append(f"{at}: {value!r} does not match {want}")
        elif key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if _is_type(value, "number"):
                ok = {
                    "minimum": value >= want,
                    "maximum": value <= want,
                    "exclusiveMinimum": value > want,
                    "exclusiveMaximum": value < want,
                }[key]
                if not ok:
                    out.append(f"{at}: {value} violates {key} {want}")
        else:
            raise AssertionError(f"the test validator does not know JSON Schema keyword {key!r}")
    return out


def documents(path: Path, text: str | None = None) -> list[Any]:
    return [d.value for d in parse(path.read_text() if text is None else text, str(path))]


def doc_blocks() -> list[tuple[str, str]]:
    """The ```yaml blocks of docs/policy.md: (label, text)."""
    text = DOCS.read_text()
    blocks = re.findall(r"^```yaml\n(.*?)^```$", text, flags=re.S | re.M)
    return [(f"docs/policy.md#{i}", b) for i, b in enumerate(blocks)]


def samples() -> list[Path]:
    found = [
        *sorted((ROOT / "snapshots").glob("*.yaml")),
        *sorted((ROOT / "docs" / "examples").glob("*.yaml")),
        *sorted((ROOT / "tests" / "golden").glob("*/*.yaml")),
        *sorted((ROOT / "tests" / "corpus" / "good").glob("*.yaml")),
    ]
    return [p for p in found if p.exists()]


# -- the schema ------------------------------------------------------------------------------


def test_cli_prints_the_schema_as_stable_json() -> None:
    r = run_schema()
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    schema = json.loads(r.stdout)
    assert r.stdout == dumps()
    assert run_schema().stdout == r.stdout
    assert r.stdout == json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert schema["$schema"] == DIALECT
    assert schema["title"] == TITLE
    assert schema["type"] == "object"


def test_schema_lists_every_key_of_every_model() -> None:
    schema = policy_schema()
    assert set(schema["properties"]) == set(PolicyFile.model_fields)
    assert schema["additionalProperties"] is False
    for model in models():
        if model is PolicyFile:
            continue
        d = schema["$defs"][model.__name__]
        assert set(d["properties"]) == set(model.model_fields), model.__name__
        assert d["additionalProperties"] is False, model.__name__
        required = {n for n, f in model.model_fields.items() if f.is_required()}
        assert set(d.get("required", [])) == required, model.__name__


def test_validator_knows_every_keyword() -> None:
    """Run the validator over the schema itself as data: it raises on unknown keywords."""
    schema = policy_schema()
    assert validate({}, schema, schema) == []
    for d in schema["$defs"].values():
        validate({}, d, schema)


@pytest.mark.parametrize("path", samples(), ids=lambda p: str(p.relative_to(ROOT)))
def test_samples_are_valid(path: Path) -> None:
    schema = policy_schema()
    docs = documents(path)
    assert docs
    for doc in docs:
        assert validate(doc, schema, schema) == []


@pytest.mark.parametrize("label,text", doc_blocks(), ids=[b[0] for b in doc_blocks()])
def test_docs_examples_are_valid(label: str, text: str) -> None:
    schema = policy_schema()
    for doc in documents(Path(label), text):
        problems = validate(doc, schema, schema)
        if text.startswith("# error"):
            assert problems, "an example marked '# error' should not pass the schema"
        else:
            assert problems == [], label


def _unknown_key_cases() -> list[Path]:
    out = []
    for case in sorted(CORPUS.iterdir()):
        expected = case / "expected.txt"
        if expected.exists() and "unknown key" in expected.read_text():
            out.extend(sorted(case.glob("*.yaml")))
    return out


@pytest.mark.parametrize("path", _unknown_key_cases(), ids=lambda p: p.parent.name)
def test_schema_rejects_unknown_keys(path: Path) -> None:
    schema = policy_schema()
    problems = [p for doc in documents(path) for p in validate(doc, schema, schema)]
    assert any("unknown key" in p for p in problems), problems


@pytest.mark.parametrize(
    "doc",
    [
        {"listeners": [{"name": "Bad Name", "address": "0.0.0.0:80", "redirect_to_https": True}]},
        {"upstreams": {"a": {"endpoints": ["1.2.3.4:80"], "connect_timeout": "5 seconds"}}},
        {"upstreams": {"a": {"endpoints": ["1.2.3.4:80"], "lb": "fastest"}}},
        {"upstreams": {"A": {"endpoints": ["1.2.3.4:80"]}}},
        {"upstreams": {"a": {"endpoints": []}}},
        {"listeners": [{"name": "a", "address": "0.0.0.0:80", "https_port": "443"}]},
        {"listeners": [{"name": "a", "address": "0.0.0.0:80", "tls": {"min_version": 1.2}}]},
        {"nodes": []},
        {"access_log": {"format": "xml"}},
    ],
)
def test_schema_rejects_bad_values(doc: dict[str, Any]) -> None:
    schema = policy_schema()
    assert validate(doc, schema, schema) != []


def test_with_jsonschema() -> None:
    """An independent validator (jsonschema, a dev dependency) agrees with the samples."""
    import jsonschema

    schema = policy_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in samples():
        for doc in documents(path):
            validator.validate(doc)


# -- docs/policy.md --------------------------------------------------------------------------


def doc_default(field: Any) -> str:
    if field.is_required():
        return "*required*"
    value = field.get_default(call_default_factory=True)
    return "—" if value is None else f"`{json.dumps(value)}`"


def doc_tables() -> dict[str, list[list[str]]]:
    """Tables after ``<!-- fields: Model -->`` markers: model name -> rows of cells."""
    tables: dict[str, list[list[str]]] = {}
    current: list[list[str]] | None = None
    for line in DOCS.read_text().splitlines():
        m = re.fullmatch(r"<!-- fields: (\w+) -->", line.strip())
        if m:
            assert m.group(1) not in tables, f"two tables for {m.group(1)}"
            current = tables[m.group(1)] = []
            continue
        if current is not None:
            if line.startswith("|"):
                cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
                if cells[0] not in ("key", "---"):
                    current.append(cells)
            else:
                current = None
    return tables


def test_docs_have_a_table_for_every_model() -> None:
    tables = doc_tables()
    names = [m.__name__ for m in models()]
    assert sorted(tables) == sorted(names)


@pytest.mark.parametrize("model", models(), ids=lambda m: m.__name__)
def test_docs_table_lists_every_field_with_its_default(model: type[BaseModel]) -> None:
    rows = doc_tables()[model.__name__]
    documented = [r[0].strip("`") for r in rows]
    assert documented == list(model.model_fields), "keys (in model order)"
    for row in rows:
        assert len(row) == 4, row
        key, _type, default, meaning = row
        field = model.model_fields[key.strip("`")]
        assert default == doc_default(field), key
        assert meaning, f"{key}: say what it means"


def test_docs_name_the_naming_rules_and_the_escape_hatch() -> None:
    text = DOCS.read_text()
    for needle in (
        "yaml-language-server: $schema=",
        "xdsplane schema",
        "RouteConfiguration `L/H`",
        "Route `H/R`",
        "Cluster `U`",
        "## `resources:` the escape hatch",
        "node group",
        "## Validation: what is an error",
    ):
        assert needle in text, needle

"""The raw TLS floor's short cut (``tlsrules.check_raw``: the keys the C parse noted, or a
walk without paths) against the walk with paths it skips (``_walk_raw``, the oracle): the
same errors, at the same lines, on every YAML file of the corpora and on generated
documents with the TLS keys anywhere (legacy or not, of every type, nested, in lists)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdsplane.config import yamlsrc
from xdsplane.config.errors import ConfigError
from xdsplane.policy import tlsrules

ROOT = Path(__file__).resolve().parent.parent


def oracle(doc: yamlsrc.Document, items: Any) -> list[ConfigError]:
    errors: list[ConfigError] = []
    tlsrules._walk_raw(doc, items, ("resources",), errors)
    return errors


def shown(errors: list[ConfigError]) -> list[str]:
    return [str(e) for e in errors]


def agree(text: str) -> bool:
    """check_raw from the C parse and from the general one equal the oracle; True if the
    C parse noted the keys (the short cut taken)."""
    noted = False
    for parse in (yamlsrc.parse, yamlsrc._parse_general):
        try:
            docs = parse(text, "f.yaml")
        except yamlsrc.YamlError:
            return False
        for doc in docs:
            if not isinstance(doc.value, dict):
                continue
            items = doc.value.get("resources")
            want = shown(oracle(doc, items))
            assert shown(tlsrules.check_raw(doc, items, ("resources",))) == want
            noted = noted or doc.noted(tlsrules._WATCHED) is not None
    return noted


def test_the_c_parse_notes_the_keys() -> None:
    if yamlsrc._C is None:
        pytest.fail("the compiled YAML path is not built (setup.py)")
    doc = yamlsrc.parse("resources: [{tls_minimum_protocol_version: TLSv1_0}]\n", "f")[0]
    assert doc.noted(tlsrules._WATCHED) == [("tls_minimum_protocol_version", "TLSv1_0")]
    assert doc.noted(frozenset({"not noted"})) is None
    assert tlsrules.check_raw(doc, doc.value["resources"], ("resources",))


def test_corpus_files_give_the_same_errors() -> None:
    files = [
        p
        for folder in ("tests", "snapshots", "examples", "docs", "deploy")
        for p in sorted((ROOT / folder).rglob("*.y*ml"))
    ]
    assert len(files) > 100
    taken = sum(agree(p.read_text("utf-8", errors="replace")) for p in files)
    assert taken > len(files) // 2


tls_values = st.one_of(
    st.sampled_from(["TLSv1_0", "TLSv1_1", "TLSv1_2", "TLSv1_3", "TLS_AUTO", "v1_0"]),
    st.sampled_from([0, 1, 2, 3, 4, True, False, None, 1.0]),
    st.lists(
        st.sampled_from(
            ["ECDHE-RSA-AES128-GCM-SHA256", "AES128-SHA", "[A|B]", "nope", "DES-CBC3-SHA", 7]
        ),
        max_size=3,
    ),
    st.dictionaries(st.sampled_from(["tls_minimum_protocol_version", "x"]), st.just("TLSv1_0")),
)
tls_keys = st.sampled_from(
    [
        "tls_minimum_protocol_version",
        "tlsMinimumProtocolVersion",
        "tls_maximum_protocol_version",
        "tlsMaximumProtocolVersion",
        "cipher_suites",
        "cipherSuites",
        "name",
        "tls_params",
    ]
)
trees = st.recursive(
    st.dictionaries(tls_keys, tls_values, max_size=3),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(tls_keys | st.just("nodes"), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(trees, max_size=4), trees, st.booleans())
def test_generated_documents_give_the_same_errors(
    items: list[Any], outside: Any, flow: bool
) -> None:
    """TLS keys inside ``resources`` and outside it (noted all the same: never fewer walks)."""
    text = yaml.safe_dump({"other": outside, "resources": items}, default_flow_style=flow)
    assert agree(text) or yamlsrc._C is None

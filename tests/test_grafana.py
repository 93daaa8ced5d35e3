"""The Grafana dashboard (deploy/grafana/billing-edge.json): it loads as dashboard JSON
(uid, title, schemaVersion, a datasource variable, panels with a type, a gridPos and
PromQL targets, no duplicate id, no overlap) and each expression parses with Prometheus' own
``promtool`` (as the recording rules of a generated rules file). That every metric name
exists in a real Envoy's /stats/prometheus, a real ``xdsplane serve``'s and the guard's
/metrics is checked in tests/test_siem.py, after traffic on the sample.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from test_alert_rules import run

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "billing-edge.json"
DOC = ROOT / "docs" / "observability.md"

# Grafana's range variables, replaced by a duration for promtool.
GRAFANA_RANGES = ("$__rate_interval", "$__interval", "$__range")

# PromQL words that are not metric names (functions, aggregations, keywords).
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "by", "without",
    "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset",
    "histogram_quantile", "topk", "bottomk", "abs", "clamp_min", "clamp_max", "time",
    "vector", "scalar", "label_replace", "absent", "delta", "deriv", "changes", "resets",
}  # fmt: skip


def load() -> dict[str, Any]:
    found: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return found


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows included."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def exprs(dash: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dash) for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: the identifiers left once label matchers,
    label lists (by/without/on/ignoring), strings, durations and PromQL words are gone."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {w for w in words if w not in PROMQL_WORDS}


def dashboard_metric_names() -> set[str]:
    return {name for e in exprs(load()) for name in metric_names(e)}


def dashboard_name_patterns() -> set[str]:
    """The regular expressions of ``{__name__=~"..."}`` selectors."""
    return {p for e in exprs(load()) for p in re.findall(r'__name__=~"([^"]+)"', e)}


def test_it_is_a_dashboard() -> None:
    dash = load()
    assert isinstance(dash["uid"], str) and re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dash["uid"])
    assert dash["title"]
    assert isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), ids
    for p in panels(dash):
        assert p["type"] and isinstance(p["type"], str), p
        grid = p["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"] == p["datasource"], p["title"]


def test_panels_do_not_overlap() -> None:
    cells: dict[tuple[int, int], str] = {}
    for p in panels(load()):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, (p["title"], cells.get((x, y)))
                cells[(x, y)] = p["title"]


def test_it_shows_what_the_issue_asks_for() -> None:
    names = dashboard_metric_names()
    for wanted in (
        "envoy_http_downstream_rq_total",  # requests
        "envoy_http_rbac_denied",  # refusals by reason ...
        "envoy_http_jwt_authn_denied",
        "envoy_http_ext_authz_denied",
        "xdsplane_guard_decisions_total",
        "envoy_http_rbac_shadow_denied",  # missing certificates
        "xdsplane_certificate_expiry_seconds",  # certificate expiry
        "envoy_server_days_until_first_cert_expiring",
        "xdsplane_acks_total",  # xDS
        "xdsplane_nacks_total",
    ):
        assert wanted in names, wanted
    assert dashboard_name_patterns() == {"envoy_.+_http_local_rate_limit_rate_limited"}


def test_metric_names_are_read_from_expressions() -> None:
    """The extractor the metric-name check relies on."""
    expr = (
        'sum by (a, b) (rate(envoy_x_total{le="0.5",b=~"x|y"}[5m])) / on (a) '
        "group_left() xdsplane_y > bool 3 or absent(z:recorded)"
    )
    assert metric_names(expr) == {"envoy_x_total", "xdsplane_y", "z:recorded"}


def test_every_expression_parses_with_promtool(tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(exprs(load())):
        for var in GRAFANA_RANGES:
            expr = expr.replace(var, "5m")
        assert "$" not in expr, expr  # no other Grafana variable
        rules.append({"record": f"dashboard:expr_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run("check", "rules", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout, done.stdout


def test_promtool_refuses_a_broken_expression(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    bad = {"record": "dashboard:bad", "expr": "sum by (a (rate(x[5m]))"}
    path.write_text(json.dumps({"groups": [{"name": "d", "rules": [bad]}]}))
    assert run("check", "rules", str(path), cwd=tmp_path).returncode != 0


def test_the_doc_names_the_dashboard() -> None:
    doc = DOC.read_text(encoding="utf-8")
    assert "deploy/grafana/billing-edge.json" in doc
    assert load()["uid"] in doc

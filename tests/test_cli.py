"""The command line: render, bootstrap and --help, run as `python -m xdsplane`."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401 (@type)
from google.protobuf import json_format

from xdsplane import cli

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "corpus"


def run_cli(*args: str, cwd: Path = CORPUS) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "xdsplane", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stdout + r.stderr, r.stderr


# -- render ----------------------------------------------------------------------------------


def test_render_redacts_private_keys() -> None:
    key_text = (CORPUS / "good" / "edge.yaml").read_text()
    assert "BEGIN PRIVATE KEY" in key_text  # the fixture does hold a key
    r = run_cli("render", "good", "--node", "edge-1")
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert "PRIVATE KEY" not in r.stdout
    assert "PRIVATE KEY" not in r.stderr
    out = json.loads(r.stdout)
    assert out["node"] == "edge-1"
    (secret,) = out["resources"]["SDS"]["resources"]
    tls = secret["resource"]["tls_certificate"]
    assert re.fullmatch(r"<redacted sha256:[0-9a-f]{8}\.\.\.>", tls["private_key"])
    assert "BEGIN CERTIFICATE" in tls["certificate_chain"]["inline_string"]  # not a secret


def test_render_picks_the_node_group() -> None:
    r = run_cli("render", "good", "--node", "canary-7")
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["group"] == "canary-*"
    names = [c["name"] for c in out["resources"]["CDS"]["resources"]]
    assert sorted(names) == ["billing", "canary"]
    # versions in render are the ones served
    assert all(out["resources"][t]["version"] for t in ("SDS", "CDS", "EDS", "LDS", "RDS"))


def test_render_for_a_node_no_file_selects(tmp_path: Path) -> None:
    d = tmp_path / "only-canary"
    d.mkdir()
    shutil.copy(CORPUS / "good" / "canary.yaml", d / "canary.yaml")
    r = run_cli("render", "only-canary", "--node", "edge-1", cwd=tmp_path)
    no_traceback(r)
    assert r.returncode == 1
    assert r.stdout == ""
    assert "edge-1" in r.stderr
    assert "selects" in r.stderr or "no file" in r.stderr


def test_render_of_a_broken_folder_prints_the_errors() -> None:
    r = run_cli("render", "missing-type", "--node", "edge-1", cwd=CORPUS / "broken")
    no_traceback(r)
    assert r.returncode == 1
    assert r.stdout == ""
    expected = (CORPUS / "broken" / "missing-type" / "expected.txt").read_text()
    assert expected.strip() in r.stderr


# -- bootstrap -------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [False, True])
def test_bootstrap_parses_as_an_envoy_bootstrap(delta: bool) -> None:
    args = ["bootstrap", "--node", "edge-1", "--xds-address", "127.0.0.1:18001"]
    if delta:
        args.append("--delta")
    r = run_cli(*args)
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(r.stdout)
    bs = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(data, bs)
    assert bs.node.id == "edge-1"
    assert bs.node.cluster == "edge-1"
    ads = bs.dynamic_resources.ads_config
    assert ads.api_type == (ads.DELTA_GRPC if delta else ads.GRPC)
    assert ads.set_node_on_first_message_only
    assert bs.dynamic_resources.lds_config.HasField("ads")
    assert bs.dynamic_resources.cds_config.HasField("ads")
    (xds,) = bs.static_resources.clusters
    assert ads.grpc_services[0].envoy_grpc.cluster_name == xds.name
    # Envoy's default reconnect backoff grows to 30 s: the bootstrap caps it (test_faults
    # measures Envoy back on a restarted server within the cap).
    backoff = ads.grpc_services[0].envoy_grpc.retry_policy.retry_back_off
    assert (backoff.base_interval.ToMilliseconds(), backoff.max_interval.ToMilliseconds()) == (
        100,
        500,
    )
    sock = xds.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sock.address, sock.port_value) == ("127.0.0.1", 18001)


def test_bootstrap_reconnect_max() -> None:
    r = run_cli("bootstrap", "--node", "n", "--reconnect-max", "2")
    assert r.returncode == 0, r.stderr
    grpc_service = yaml.safe_load(r.stdout)["dynamic_resources"]["ads_config"]["grpc_services"]
    backoff = grpc_service[0]["envoy_grpc"]["retry_policy"]["retry_back_off"]
    assert backoff == {"base_interval": "0.100s", "max_interval": "2.000s"}
    r = run_cli("bootstrap", "--node", "n", "--reconnect-max", "0")
    assert r.returncode == 2 and "positive" in r.stderr, r.stderr


def test_bootstrap_with_replicas_and_a_hostname() -> None:
    r = run_cli(
        "bootstrap",
        "--node",
        "n",
        "--cluster",
        "edge",
        "--xds-address",
        "cp-0.example:18000",
        "--xds-address",
        "cp-1.example:18000",
    )
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    bs = bootstrap_pb2.Bootstrap()
    json_format.ParseDict(yaml.safe_load(r.stdout), bs)
    assert bs.node.cluster == "edge"
    (xds,) = bs.static_resources.clusters
    assert xds.type == xds.STRICT_DNS
    assert len(xds.load_assignment.endpoints[0].lb_endpoints) == 2


def test_bootstrap_rejects_a_bad_address() -> None:
    r = run_cli("bootstrap", "--node", "n", "--xds-address", "no-port")
    no_traceback(r)
    assert r.returncode == 2
    assert "HOST:PORT" in r.stderr


# -- help ------------------------------------------------------------------------------------


def _subcommands(p: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found.extend(_subcommands(sub, (*prefix, name)))
    return found


SUBCOMMANDS = _subcommands(cli.parser())


def test_the_known_subcommands_exist() -> None:
    top = {c[0] for c in SUBCOMMANDS}
    assert {"serve", "validate", "render", "bootstrap"} <= top


def test_top_level_help() -> None:
    r = run_cli("--help")
    no_traceback(r)
    assert r.returncode == 0
    assert r.stdout.startswith("usage: xdsplane")
    for command in {c[0] for c in SUBCOMMANDS}:
        assert command in r.stdout


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_help_for_every_subcommand(command: tuple[str, ...]) -> None:
    r = run_cli(*command, "--help")
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: xdsplane {' '.join(command)}")
    assert r.stderr == ""


def test_no_command_is_a_usage_error() -> None:
    r = run_cli()
    no_traceback(r)
    assert r.returncode == 2
    assert "usage:" in r.stderr


def test_render_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    d = tmp_path / "many"
    d.mkdir()
    items = "".join(
        f"""
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: c{i}
    connect_timeout: 1s
"""
        for i in range(3000)
    )
    (d / "clusters.yaml").write_text("resources:" + items)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    p = subprocess.Popen(
        [sys.executable, "-m", "xdsplane", "render", "many", "--node", "n"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.readline() == "{\n"  # like `| head -1`: read a little, then hang up
    p.stdout.close()
    err = p.stderr.read()
    p.wait(timeout=60)
    assert "Traceback" not in err, err

"""ECDS resources in a folder: raw TypedExtensionConfig resources, references to them, and
Envoy's own verdict on them (``validate --envoy`` inlines them into the static bootstrap).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xdsplane import cli
from xdsplane.config.errors import ConfigErrors
from xdsplane.envoycheck import bootstrap_json
from xdsplane.pipeline import FolderLoader
from xdsplane.types import ResourceType

HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
JWT = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"

LISTENER = f"""\
resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: raw
    address: {{socket_address: {{address: 127.0.0.1, port_value: 10000}}}}
    filter_chains:
      - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": {HCM}HttpConnectionManager
              stat_prefix: raw
              route_config:
                name: raw
                virtual_hosts:
                  - name: all
                    domains: ["*"]
                    routes: [{{match: {{prefix: /}}, direct_response: {{status: 200}}}}]
              http_filters:
                - name: auth
                  config_discovery:
                    config_source: {{ads: {{}}, resource_api_version: V3}}
                    type_urls: [{JWT}]
                - name: envoy.filters.http.router
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""

EXTENSION = f"""\
  - "@type": type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig
    name: auth
    typed_config:
      "@type": {JWT}
      requirement_map:
        r: {{provider_name: idp}}
      providers:
        idp: {{issuer: https://idp.example.com, local_jwks: {{inline_string: '{{"keys": []}}'}}}}
"""


needs_envoy = pytest.mark.envoy  # conftest: skipped without Envoy 1.40, failed in CI


def folder(tmp_path: Path, text: str) -> Path:
    d = tmp_path / "raw"
    d.mkdir()
    (d / "snap.yaml").write_text(text)
    return d


def with_extension() -> str:
    """The listener and its filter's configuration, whose JWKS has no key (Envoy refuses)."""
    return LISTENER + EXTENSION


def test_a_raw_typed_extension_config_is_served_over_ecds(tmp_path: Path) -> None:
    snapshot = FolderLoader(folder(tmp_path, with_extension())).load().groups[0].snapshot
    (ext,) = snapshot.of(ResourceType.EXTENSION).values()
    assert ext.name == "auth"
    assert ext.message.typed_config.type_url == JWT
    assert ext.source.endswith("snap.yaml:25:5"), ext.source


def test_a_filter_naming_a_missing_configuration_is_refused(tmp_path: Path) -> None:
    d = folder(tmp_path, LISTENER)
    with pytest.raises(ConfigErrors) as e:
        FolderLoader(d).load()
    assert str(e.value).splitlines() == [
        f"{d}/snap.yaml:2:5: LDS 'raw' references filter configuration 'auth', "
        "which no file defines"
    ]


def test_the_static_bootstrap_inlines_ecds(tmp_path: Path) -> None:
    snapshot = FolderLoader(folder(tmp_path, with_extension())).load().groups[0].snapshot
    data = json.loads(bootstrap_json(snapshot))
    assert '"ads"' not in json.dumps(data) and "config_discovery" not in json.dumps(data)
    hcm = data["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    auth = hcm["typed_config"]["http_filters"][0]
    assert auth["name"] == "auth"
    assert auth["typed_config"]["@type"] == JWT
    assert auth["typed_config"]["requirement_map"] == {"r": {"provider_name": "idp"}}


@pytest.mark.envoy
@needs_envoy
def test_envoy_accepts_a_policy_with_jwt_routes(capsys: pytest.CaptureFixture[str]) -> None:
    golden = Path(__file__).parent / "golden" / "jwt"
    assert cli.main(["validate", str(golden), "--envoy"]) == 0
    assert "ECDS 1" in capsys.readouterr().err


@pytest.mark.envoy
@needs_envoy
def test_a_configuration_envoy_refuses_is_blamed_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = folder(tmp_path, with_extension())
    assert cli.main(["validate", str(d)]) == 0  # our own checks let it through
    capsys.readouterr()
    assert cli.main(["validate", str(d), "--envoy"]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{d}/snap.yaml:25:5: envoy rejects filter configuration 'auth': "
        "Provider 'idp' in jwt_authn config has invalid local jwks: "
        "Jwks doesn't have any valid public key"
    ]

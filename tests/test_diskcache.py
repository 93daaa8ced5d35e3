"""The disk cache of built raw resources (``serve --cache-dir``, ``pipeline/diskcache.py``).

A start from the cache gives exactly what a cold load gives; entries that are truncated,
garbled, swapped or written by another version are detected and rebuilt; the cache folder
is refused when another user owns it or anyone else may write to it; key material is never
written to it.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from harness import ProcessGroup, XdsServer
from test_incremental import ROUTES, base_entries, cluster, load, outcome, text_of, write

import xdsplane.pipeline.diskcache as diskcache
from xdsplane.pipeline import FolderLoader
from xdsplane.pipeline.diskcache import CacheDirError

PEM_KEY = "\n          ".join(
    ["-----BEGIN PRIVATE KEY-----", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC", "-----END PRIVATE KEY-----"]
)
SECRET_FILE = f"""resources:
  - "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret
    name: client
    tls_certificate:
      certificate_chain: {{inline_string: "cert"}}
      private_key:
        inline_string: |
          {PEM_KEY}
"""
INLINE_KEY_CLUSTER = """resources:
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: inline
    type: STATIC
    connect_timeout: 1s
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:
          tls_certificates:
            - certificate_chain: {inline_string: "cert"}
              private_key: {inline_string: "SECRETKEYMATERIAL"}
"""


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "policies"
    root.mkdir()
    (root / "routes.yaml").write_text(ROUTES)
    (root / "big.yaml").write_text(text_of(base_entries(40), ""))
    (root / "secrets.yaml").write_text(SECRET_FILE)
    (root / "inline.yaml").write_text(INLINE_KEY_CLUSTER)
    return root


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("*.entry"))


def test_a_start_from_the_cache_equals_a_cold_load(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cold = outcome(load(FolderLoader(folder)))
    assert isinstance(cold, tuple) and cold[0] == "ok", cold
    first = FolderLoader(folder, cache_dir=cache)
    assert outcome(load(first)) == cold
    assert len(entries(cache)) == 2  # routes.yaml and big.yaml: not the two with keys
    warm = FolderLoader(folder, cache_dir=cache)
    assert outcome(load(warm)) == cold
    assert warm._disk is not None and warm._disk.cache.hits == 2
    # an edit inside the big file after a start from the cache: entries re-parsed alone
    entries_now = base_entries(40)
    entries_now[7] = cluster("c07", 33)
    write(folder / "big.yaml", text_of(entries_now, ""))
    assert outcome(load(warm)) == outcome(load(FolderLoader(folder)))


def test_key_material_is_never_written(folder: Path, tmp_path: Path) -> None:
    """A Secret and a cluster with an inline private key are parsed every time, never
    cached: no byte of either key is in the cache folder."""
    cache = tmp_path / "cache"
    FolderLoader(folder, cache_dir=cache).load()
    blob = b"".join(p.read_bytes() for p in cache.rglob("*") if p.is_file())
    assert blob and b"PRIVATE KEY" not in blob and b"SECRETKEYMATERIAL" not in blob
    assert b"MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" not in blob


@pytest.mark.parametrize("damage", ["truncate", "garble", "swap", "empty", "junk"])
def test_damaged_entries_are_detected_and_rebuilt(
    folder: Path, tmp_path: Path, damage: str
) -> None:
    cache = tmp_path / "cache"
    cold = outcome(load(FolderLoader(folder)))
    FolderLoader(folder, cache_dir=cache).load()
    found = entries(cache)
    assert len(found) == 2
    a, b = found
    data_a, data_b = a.read_bytes(), b.read_bytes()
    if damage == "truncate":
        a.write_bytes(data_a[: len(data_a) // 2])
    elif damage == "garble":
        middle = len(data_a) // 2
        a.write_bytes(data_a[:middle] + bytes([data_a[middle] ^ 0x40]) + data_a[middle + 1 :])
    elif damage == "swap":
        a.write_bytes(data_b)
        b.write_bytes(data_a)
    elif damage == "empty":
        a.write_bytes(b"")
    else:
        a.write_bytes(b"XDSPC001" + os.urandom(200))
    loader = FolderLoader(folder, cache_dir=cache)
    assert outcome(load(loader)) == cold
    assert loader._disk is not None and loader._disk.cache.corrupt >= 1
    # rewritten: the next start reads every entry again
    again = FolderLoader(folder, cache_dir=cache)
    assert outcome(load(again)) == cold
    assert again._disk is not None and again._disk.cache.hits == 2


def test_entries_of_another_version_are_not_read(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry written by another xdsplane, xds-protos or protobuf is a miss (another
    key), and is removed once the folder is loaded."""
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        m.setattr(diskcache, "version_tag", lambda: "format 1; xdsplane 0.0.1; other")
        FolderLoader(folder, cache_dir=cache).load()
    old = entries(cache)
    assert len(old) == 2
    loader = FolderLoader(folder, cache_dir=cache)
    assert outcome(load(loader)) == outcome(load(FolderLoader(folder)))
    assert loader._disk is not None and loader._disk.cache.hits == 0
    assert not set(old) & set(entries(cache)) and len(entries(cache)) == 2


def test_an_entry_copied_under_another_key_is_refused(folder: Path, tmp_path: Path) -> None:
    """An entry holds its key and its file's path: copied over another file's entry, it is
    detected (not served as that file)."""
    cache = tmp_path / "cache"
    FolderLoader(folder, cache_dir=cache).load()
    a, b = entries(cache)
    shutil.copy(a, b)
    loader = FolderLoader(folder, cache_dir=cache)
    assert outcome(load(loader)) == outcome(load(FolderLoader(folder)))
    assert loader._disk is not None and loader._disk.cache.corrupt == 1


def test_a_folder_others_may_write_to_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(CacheDirError, match="writable by others"):
        diskcache.open_dir(shared)
    shared.chmod(0o770)
    with pytest.raises(CacheDirError, match="writable by others"):
        diskcache.open_dir(shared)


def test_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/")  # owned by root, not by this user
    with pytest.raises(CacheDirError, match="not by this user"):
        diskcache.open_dir(theirs)


def test_a_new_cache_folder_and_its_entries_are_private(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "new" / "cache"
    FolderLoader(folder, cache_dir=cache).load()
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    for p in entries(cache):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700


async def _cds(address: str) -> tuple[str, list[bytes]]:
    """The CDS a real grpcio SotW client gets: (version, the serialized clusters)."""
    import grpc
    from ads_client import Stream
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    async with grpc.aio.insecure_channel(address) as channel:
        stream = Stream.open(channel, "sotw")
        await stream.write(
            discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id="edge", cluster="edge"),
                type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster",
            )
        )
        response = await stream.read(timeout=30)
        stream.cancel()
        return response.version_info, sorted(a.value for a in response.resources)


def test_serve_with_a_cache_dir_serves_the_same_after_a_restart(
    procs: ProcessGroup, folder: Path, tmp_path: Path
) -> None:
    """`xdsplane serve --cache-dir`: the first run writes entries (0600), a restart serves
    the very same clusters and version to a real gRPC client as a run without the cache."""
    import asyncio

    (folder / "secrets.yaml").unlink()  # its Secret would be unused by what is served
    (folder / "inline.yaml").unlink()
    cache = tmp_path / "cache"
    plain = XdsServer(procs, folder, name="plain").start(timeout=60)
    expected = asyncio.run(_cds(plain.xds_address))
    assert expected[1], "no clusters served"
    for run in ("first", "second"):
        server = XdsServer(procs, folder, name=run, extra_args=["--cache-dir", str(cache)])
        server.start(timeout=60)
        assert asyncio.run(_cds(server.xds_address)) == expected
        server.proc.stop()
        assert len(entries(cache)) == 2
        assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in entries(cache))


def test_serve_refuses_a_cache_dir_others_may_write_to(
    procs: ProcessGroup, folder: Path, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    server = XdsServer(procs, folder, extra_args=["--cache-dir", str(shared)])
    server.launch()
    code = server.proc.wait(timeout=60)
    assert code == 2, code
    log = server.proc.tail()
    assert f"not starting: --cache-dir {shared}: writable by others" in log, log
    assert not list(shared.iterdir())  # nothing written to it

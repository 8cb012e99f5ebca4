"""A real client against a real regmirror process: skopeo pushes, pulls, lists and deletes.

Every image is generated (tests/support/oci_layout.py), pushed from an OCI layout into
regmirror, and read back; what comes back must be byte-identical to what went in.
skopeo runs with a permissive policy, an empty registries.conf and an empty auth file
from the test's temp directory, so no host configuration takes part.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import pytest

from tests.support.oci_layout import (
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    build_image,
    build_index,
    read_layout,
    sha256,
    write_image_layout,
    write_index_layout,
)
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    distribution_registry,
    regmirror_server,
)
from tests.support.skopeo import (
    ACCEPT,
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    Skopeo,
    skopeo,
)

__all__ = ["skopeo"]  # a pytest fixture

pytestmark = pytest.mark.skipif(
    shutil.which("skopeo") is None,
    reason="skopeo not installed (Debian package skopeo; tests/run.sh installs it)",
)


@pytest.fixture
def server(regmirror_server: Callable[..., ServerProcess]) -> ServerProcess:  # noqa: F811
    return regmirror_server()


@pytest.fixture(scope="module")
def image() -> Image:
    return build_image(seed=7)


def http_get(url: str, accept: str = ACCEPT) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def assert_served(server: ServerProcess, repo: str, reference: str, manifest: bytes) -> None:
    """regmirror answers ``reference`` with exactly ``manifest`` and its digest."""
    status, headers, body = http_get(f"{server.url}/v2/{repo}/manifests/{reference}")
    assert status == 200, body
    assert body == manifest
    assert headers["Docker-Content-Digest"] == sha256(manifest)
    assert headers["Content-Type"] == json.loads(manifest)["mediaType"]


def assert_blobs_served(server: ServerProcess, repo: str, blobs: dict[str, bytes]) -> None:
    for digest, data in blobs.items():
        status, headers, body = http_get(f"{server.url}/v2/{repo}/blobs/{digest}", "*/*")
        assert status == 200, (digest, body[:300])
        assert sha256(body) == digest
        assert body == data
        assert headers["Docker-Content-Digest"] == digest


def push_image(skopeo: Skopeo, tmp_path: Path, image: Image, destination: str) -> None:
    layout = write_image_layout(tmp_path / "src", image, "v1")
    skopeo.copy(f"oci:{layout.path}:v1", destination, "--preserve-digests")


def test_oci_image_round_trips_byte_identical(
    skopeo: Skopeo, server: ServerProcess, image: Image, tmp_path: Path
) -> None:
    push_image(skopeo, tmp_path, image, f"docker://{server.host_port}/library/app:v1")
    assert_served(server, "library/app", "v1", image.manifest.data)
    assert_served(server, "library/app", image.manifest.digest, image.manifest.data)
    assert_blobs_served(server, "library/app", image.blobs)

    out = tmp_path / "out"
    skopeo.copy(
        f"docker://{server.host_port}/library/app:v1", f"oci:{out}:copy", "--preserve-digests"
    )
    pulled = read_layout(out)
    descriptor = pulled.ref("copy")
    assert descriptor["digest"] == image.manifest.digest
    assert descriptor["size"] == image.manifest.size
    assert descriptor["mediaType"] == OCI_MANIFEST
    assert pulled.blobs[image.manifest.digest] == image.manifest.data
    for digest, data in image.blobs.items():
        assert pulled.blobs[digest] == data, digest
    assert set(pulled.blobs) == {image.manifest.digest, *image.blobs}


def test_multi_platform_index_round_trips_with_all(
    skopeo: Skopeo, server: ServerProcess, tmp_path: Path
) -> None:
    multi = build_index(("linux/amd64", "linux/arm64"))
    layout = write_index_layout(tmp_path / "src", multi, "multi")
    destination = f"docker://{server.host_port}/team/multi:1.0"
    skopeo.copy(f"oci:{layout.path}:multi", destination, "--all", "--preserve-digests")

    assert_served(server, "team/multi", "1.0", multi.index.data)
    for child in multi.images:
        assert_served(server, "team/multi", child.manifest.digest, child.manifest.data)
        assert_blobs_served(server, "team/multi", child.blobs)

    out = tmp_path / "out"
    skopeo.copy(destination, f"oci:{out}:back", "--all", "--preserve-digests")
    pulled = read_layout(out)
    descriptor = pulled.ref("back")
    assert (descriptor["digest"], descriptor["mediaType"]) == (multi.index.digest, OCI_INDEX)
    assert pulled.blobs[multi.index.digest] == multi.index.data
    expected = {multi.index.digest: multi.index.data, **multi.blobs}
    assert pulled.blobs == expected

    # A single-platform pull through the index picks the requested child.
    arm = tmp_path / "arm"
    skopeo.run(
        "--override-arch",
        "arm64",
        "--override-os",
        "linux",
        "copy",
        "--src-tls-verify=false",
        destination,
        f"oci:{arm}:arm",
    )
    assert read_layout(arm).ref("arm")["digest"] == multi.images[1].manifest.digest


def test_docker_schema2_conversion_round_trips(
    skopeo: Skopeo,
    server: ServerProcess,
    distribution_registry: Callable[..., ServerProcess],  # noqa: F811
    image: Image,
    tmp_path: Path,
) -> None:
    reference = distribution_registry()
    layout = write_image_layout(tmp_path / "src", image, "v1")
    for target in (server, reference):
        skopeo.copy(
            f"oci:{layout.path}:v1", f"docker://{target.host_port}/conv/app:s2", "--format", "v2s2"
        )

    raw = skopeo.run(
        "inspect", "--tls-verify=false", "--raw", f"docker://{server.host_port}/conv/app:s2"
    )
    manifest_bytes = raw.stdout.encode()
    manifest = json.loads(manifest_bytes)
    assert manifest["mediaType"] == DOCKER_MANIFEST
    assert manifest["config"]["mediaType"] == DOCKER_CONFIG
    assert manifest["config"]["digest"] == image.config.digest
    assert [layer["mediaType"] for layer in manifest["layers"]] == [DOCKER_LAYER_GZIP] * len(
        image.layers
    )
    assert [layer["digest"] for layer in manifest["layers"]] == [b.digest for b in image.layers]
    # skopeo's conversion is deterministic: registry:2 got the same manifest.
    _, _, from_reference = http_get(f"{reference.url}/v2/conv/app/manifests/s2")
    assert from_reference == manifest_bytes
    assert_served(server, "conv/app", "s2", manifest_bytes)
    assert_blobs_served(server, "conv/app", image.blobs)

    # dir: keeps the manifest as served, byte for byte.
    out = tmp_path / "dir-out"
    skopeo.copy(f"docker://{server.host_port}/conv/app:s2", f"dir:{out}", "--preserve-digests")
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    for digest, data in image.blobs.items():
        assert (out / digest.split(":", 1)[1]).read_bytes() == data

    # And back to OCI: skopeo rewrites the manifest and re-serialises the config; the
    # layers and the config's content must survive.
    oci_out = tmp_path / "oci-out"
    skopeo.copy(f"docker://{server.host_port}/conv/app:s2", f"oci:{oci_out}:v1", "--format", "oci")
    pulled = read_layout(oci_out)
    oci_manifest = json.loads(pulled.blobs[pulled.ref("v1")["digest"]])
    assert oci_manifest["mediaType"] == OCI_MANIFEST
    assert [layer["digest"] for layer in oci_manifest["layers"]] == [b.digest for b in image.layers]
    for layer in image.layers:
        assert pulled.blobs[layer.digest] == layer.data
    config = json.loads(pulled.blobs[oci_manifest["config"]["digest"]])
    assert config["rootfs"]["diff_ids"] == image.diff_ids


def test_inspect_raw_and_list_tags(
    skopeo: Skopeo, server: ServerProcess, image: Image, tmp_path: Path
) -> None:
    layout = write_image_layout(tmp_path / "src", image, "v1")
    repo = f"{server.host_port}/org/tools"
    for tag in ("v1", "latest", "2024.01"):
        skopeo.copy(f"oci:{layout.path}:v1", f"docker://{repo}:{tag}", "--preserve-digests")

    raw = skopeo.run("inspect", "--tls-verify=false", "--raw", f"docker://{repo}:latest")
    assert raw.stdout.encode() == image.manifest.data
    config = skopeo.run("inspect", "--tls-verify=false", "--config", "--raw", f"docker://{repo}:v1")
    assert config.stdout.encode() == image.config.data

    info: dict[str, Any] = json.loads(
        skopeo.run("inspect", "--tls-verify=false", f"docker://{repo}:2024.01").stdout
    )
    assert info["Digest"] == image.manifest.digest
    assert info["Architecture"] == "amd64" and info["Os"] == "linux"
    assert info["Layers"] == [layer.digest for layer in image.layers]
    assert info["Labels"] == {"test.seed": "7"}
    assert sorted(info["RepoTags"]) == ["2024.01", "latest", "v1"]

    tags = json.loads(skopeo.run("list-tags", "--tls-verify=false", f"docker://{repo}").stdout)
    assert tags["Repository"] == repo
    assert sorted(tags["Tags"]) == ["2024.01", "latest", "v1"]

    missing = skopeo.run(
        "inspect", "--tls-verify=false", "--raw", f"docker://{repo}:nope", check=False
    )
    assert missing.returncode != 0
    assert "manifest unknown" in missing.stderr.lower()


def test_copy_between_repositories_mounts_blobs(
    skopeo: Skopeo, server: ServerProcess, image: Image, tmp_path: Path
) -> None:
    source = f"docker://{server.host_port}/ci/build:abc"
    push_image(skopeo, tmp_path, image, source)
    # Before the copy prod/app does not reference the layers, so it must not serve them.
    for layer in image.layers:
        status, _, _ = http_get(f"{server.url}/v2/prod/app/blobs/{layer.digest}", "*/*")
        assert status == 404

    copied = skopeo.copy(
        source, f"docker://{server.host_port}/prod/app:1", "--preserve-digests", "--debug"
    )
    assert_served(server, "prod/app", "1", image.manifest.data)
    assert_blobs_served(server, "prod/app", image.blobs)
    # Every layer was mounted from ci/build, not uploaded again. (containers/image never
    # tries to reuse a config blob; it uploads the config, which is small.)
    log = copied.stderr
    for layer in image.layers:
        assert f"?from=ci%2Fbuild&mount={quote(layer.digest)}" in log, log[-4000:]
    assert log.count("... mount OK") == len(image.layers), log[-4000:]
    uploaded = re.findall(r"PUT \S+/blobs/uploads/\S+\?digest=([^\s\"]+)", log)
    assert [unquote(d) for d in uploaded] == [image.config.digest], log[-4000:]


def test_delete_by_tag_removes_the_manifest(
    skopeo: Skopeo, server: ServerProcess, image: Image, tmp_path: Path
) -> None:
    repo = f"{server.host_port}/gone/app"
    layout = write_image_layout(tmp_path / "src", image, "v1")
    skopeo.copy(f"oci:{layout.path}:v1", f"docker://{repo}:v1", "--preserve-digests")
    other = build_image(seed=99, layers=({"x": 10},))
    other_layout = write_image_layout(tmp_path / "other", other, "v1")
    skopeo.copy(f"oci:{other_layout.path}:v1", f"docker://{repo}:keep", "--preserve-digests")

    skopeo.run("delete", "--tls-verify=false", f"docker://{repo}:v1")

    status, _, _ = http_get(f"{server.url}/v2/gone/app/manifests/{image.manifest.digest}")
    assert status == 404
    status, _, _ = http_get(f"{server.url}/v2/gone/app/manifests/v1")
    assert status == 404
    gone = skopeo.run("inspect", "--tls-verify=false", "--raw", f"docker://{repo}:v1", check=False)
    assert gone.returncode != 0
    tags = json.loads(skopeo.run("list-tags", "--tls-verify=false", f"docker://{repo}").stdout)
    assert tags["Tags"] == ["keep"]

    # By digest too; the other image is untouched until then.
    assert_served(server, "gone/app", "keep", other.manifest.data)
    skopeo.run("delete", "--tls-verify=false", f"docker://{repo}@{other.manifest.digest}")
    status, _, _ = http_get(f"{server.url}/v2/gone/app/manifests/keep")
    assert status == 404


def test_registry2_pulls_through_regmirror(
    skopeo: Skopeo,
    server: ServerProcess,
    distribution_registry: Callable[..., ServerProcess],  # noqa: F811
    image: Image,
    tmp_path: Path,
) -> None:
    """distribution's proxy client is another real client: it must read regmirror whole."""
    push_image(skopeo, tmp_path, image, f"docker://{server.host_port}/library/app:v1")
    proxy = distribution_registry(proxy_url=server.url)

    out = tmp_path / "out"
    skopeo.copy(f"docker://{proxy.host_port}/library/app:v1", f"oci:{out}:v1", "--preserve-digests")
    pulled = read_layout(out)
    assert pulled.ref("v1")["digest"] == image.manifest.digest
    assert pulled.blobs == {image.manifest.digest: image.manifest.data, **image.blobs}

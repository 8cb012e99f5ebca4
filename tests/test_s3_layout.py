"""registry:2 (Debian's docker-registry 2.8) and regmirror share one S3 layout.

The real binary runs with its s3 driver against a moto server, under a
``rootdirectory``. What it writes for a pushed image must sit exactly where
:mod:`regmirror.layout` says, under the same prefix the S3 driver adds; and what the
S3 driver writes by that layout, registry:2 must serve.

Notes from running it (2.8.2): it has no ``forcepathstyle`` parameter (3.x added it);
with a ``regionendpoint`` it always addresses the bucket path-style. It panics at
startup when ``AWS_CA_BUNDLE`` is set (aws-sdk-go cannot load a bundle into its
wrapped HTTP transport); the moto fixture unsets it.
"""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from regmirror import layout
from regmirror.config import S3Settings
from regmirror.digest import Digest
from regmirror.storage.s3 import S3Driver
from tests.support.processes import (  # noqa: F401  (pytest fixture)
    ServerProcess,
    distribution_registry,
)
from tests.support.s3 import REGION, MotoS3, moto_s3  # noqa: F401  (pytest fixture)
from tests.support.s3_registry import registry2_storage

PREFIX = "someprefix"
REPO = "team/app"
TAG = "v1"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


@dataclass
class Image:
    config: bytes
    layer: bytes
    manifest: bytes

    @staticmethod
    def build(seed: str) -> Image:
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}, "seed": seed}
        ).encode()
        layer = f"layer bytes for {seed}".encode() * 100
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": DOCKER_MANIFEST,
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "size": len(config),
                    "digest": str_digest(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "size": len(layer),
                        "digest": str_digest(layer),
                    }
                ],
            }
        ).encode()
        return Image(config, layer, manifest)


def digest_of(data: bytes) -> Digest:
    return Digest("sha256", hashlib.sha256(data).hexdigest())


def str_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def request(
    method: str, url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=15) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def push_blob(registry: ServerProcess, data: bytes) -> None:
    status, headers, body = request("POST", f"{registry.url}/v2/{REPO}/blobs/uploads/")
    assert status == 202, body
    location = headers["Location"]
    if location.startswith("/"):
        location = registry.url + location
    separator = "&" if "?" in location else "?"
    status, _, body = request(
        "PUT",
        f"{location}{separator}digest={str_digest(data)}",
        data,
        {"Content-Type": "application/octet-stream"},
    )
    assert status == 201, body


def push_image(registry: ServerProcess, image: Image) -> None:
    push_blob(registry, image.config)
    push_blob(registry, image.layer)
    status, headers, body = request(
        "PUT",
        f"{registry.url}/v2/{REPO}/manifests/{TAG}",
        image.manifest,
        {"Content-Type": DOCKER_MANIFEST},
    )
    assert status == 201, body
    assert headers["Docker-Content-Digest"] == str_digest(image.manifest)


@pytest.fixture
async def driver_for(moto_s3: MotoS3) -> AsyncIterator[Callable[[str], S3Driver]]:  # noqa: F811
    drivers: list[S3Driver] = []

    def make(bucket: str) -> S3Driver:
        settings = S3Settings(
            bucket=bucket,
            prefix=f"/{PREFIX}",
            region=REGION,
            endpoint_url=moto_s3.endpoint_url,
            path_style=True,
        )
        drivers.append(S3Driver(settings))
        return drivers[-1]

    yield make
    for driver in drivers:
        await driver.close()


async def test_registry2_writes_exactly_the_regmirror_layout(
    moto_s3: MotoS3,  # noqa: F811
    distribution_registry: Callable[..., ServerProcess],  # noqa: F811
    driver_for: Callable[[str], S3Driver],
) -> None:
    bucket = moto_s3.new_bucket("registry2")
    image = Image.build("written by registry:2")
    registry = distribution_registry(storage=registry2_storage(moto_s3, bucket, PREFIX))

    push_image(registry, image)

    config, layer, manifest = (digest_of(b) for b in (image.config, image.layer, image.manifest))
    expected = {
        layout.blob_data(config),
        layout.blob_data(layer),
        layout.blob_data(manifest),
        layout.layer_link(REPO, config),
        layout.layer_link(REPO, layer),
        layout.revision_link(REPO, manifest),
        layout.tag_current_link(REPO, TAG),
        layout.tag_index_link(REPO, TAG, manifest),
    }
    assert set(moto_s3.keys(bucket)) == {f"{PREFIX}/{key}" for key in expected}

    # And regmirror's S3 driver reads it back through the same prefix.
    driver = driver_for(bucket)
    link = str_digest(image.manifest).encode()
    assert await driver.get(layout.tag_current_link(REPO, TAG)) == link
    assert await driver.get(layout.revision_link(REPO, manifest)) == link
    assert await driver.get(layout.layer_link(REPO, layer)) == str_digest(image.layer).encode()
    assert await driver.get(layout.blob_data(manifest)) == image.manifest
    assert await driver.get(layout.blob_data(layer)) == image.layer
    assert await driver.list(layout.tags(REPO)) == [TAG]
    assert await driver.list(layout.REPOSITORIES) == ["team"]


async def test_registry2_serves_what_the_s3_driver_wrote(
    moto_s3: MotoS3,  # noqa: F811
    distribution_registry: Callable[..., ServerProcess],  # noqa: F811
    driver_for: Callable[[str], S3Driver],
) -> None:
    bucket = moto_s3.new_bucket("regmirror")
    image = Image.build("written by regmirror")
    driver = driver_for(bucket)
    for blob in (image.config, image.layer, image.manifest):
        await driver.put(layout.blob_data(digest_of(blob)), blob)
    for blob in (image.config, image.layer):
        await driver.put(layout.layer_link(REPO, digest_of(blob)), str_digest(blob).encode())
    manifest = digest_of(image.manifest)
    link = str_digest(image.manifest).encode()
    await driver.put(layout.revision_link(REPO, manifest), link)
    await driver.put(layout.tag_index_link(REPO, TAG, manifest), link)
    await driver.put(layout.tag_current_link(REPO, TAG), link)

    registry = distribution_registry(storage=registry2_storage(moto_s3, bucket, PREFIX))

    status, headers, body = request(
        "GET", f"{registry.url}/v2/{REPO}/manifests/{TAG}", headers={"Accept": DOCKER_MANIFEST}
    )
    assert status == 200, body
    assert body == image.manifest
    assert headers["Docker-Content-Digest"] == str_digest(image.manifest)
    for blob in (image.config, image.layer):
        status, _, body = request("GET", f"{registry.url}/v2/{REPO}/blobs/{str_digest(blob)}")
        assert (status, body) == (200, blob)
    status, _, body = request("GET", f"{registry.url}/v2/{REPO}/tags/list")
    assert json.loads(body) == {"name": REPO, "tags": [TAG]}

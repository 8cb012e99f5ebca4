"""Fixtures and helpers for the HTTP API tests: a client on a fresh app, pushes, manifests.

Test modules import the fixtures they use, with the ones those depend on:
``from tests.support.api import client, data_dir, make_client``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse
from aiohttp.test_utils import TestClient
from yarl import URL

from regmirror.app import create_app
from regmirror.config import Settings
from regmirror.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"

# -- fixtures ----------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """The registry's data directory, one level below ``tmp_path`` so that anything
    written beside it (outside the data dir) can be detected."""
    return tmp_path / "data"


@pytest.fixture
def make_client(aiohttp_client: Any, data_dir: Path) -> Any:
    """``await make_client()``: a client on a new app over ``data_dir`` (a "restart")."""

    async def make(**settings: Any) -> TestClient:
        return await aiohttp_client(create_app(Settings(data_dir=str(data_dir), **settings)))

    return make


@pytest.fixture
async def client(make_client: Any) -> TestClient:
    return await make_client()


# -- bytes and digests -------------------------------------------------------


def blob_bytes(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible bytes."""
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, indent=2, sort_keys=True).encode()


# -- responses -----------------------------------------------------------------


async def error_code(response: ClientResponse) -> str:
    """The first error code of the spec's JSON envelope; fails if there is none."""
    assert response.content_type == "application/json", await response.text()
    body = await response.json()
    assert isinstance(body.get("errors"), list) and body["errors"], body
    for entry in body["errors"]:
        assert {"code", "message"} <= set(entry), entry
    return str(body["errors"][0]["code"])


async def assert_error(response: ClientResponse, status: int, code: str) -> None:
    assert response.status == status, await response.text()
    assert await error_code(response) == code
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def raw_request(
    client: TestClient, method: str, raw_path: str, **kwargs: Any
) -> ClientResponse:
    """Send ``raw_path`` exactly as written: no dot-segment removal, no re-encoding."""
    base = str(client.make_url("/")).rstrip("/")
    return await client.session.request(method, URL(base + raw_path, encoded=True), **kwargs)


# -- pushing -------------------------------------------------------------------


async def push_blob(client: TestClient, name: str, data: bytes) -> str:
    """Push ``data`` monolithically into ``name``; its digest."""
    digest = sha256(data)
    response = await client.post(f"/v2/{name}/blobs/uploads/?digest={digest}", data=data)
    assert response.status == 201, await response.text()
    return digest


async def start_upload(client: TestClient, name: str) -> str:
    """Open an upload session; its Location path."""
    response = await client.post(f"/v2/{name}/blobs/uploads/")
    assert response.status == 202, await response.text()
    return response.headers["Location"]


async def put_manifest(
    client: TestClient, name: str, reference: str, raw: Any, media_type: str | None
) -> ClientResponse:
    headers = {"Content-Type": media_type} if media_type else {}
    return await client.put(f"/v2/{name}/manifests/{reference}", data=raw, headers=headers)


async def get_blob_bytes(client: TestClient, name: str, digest: str) -> bytes:
    response = await client.get(f"/v2/{name}/blobs/{digest}")
    assert response.status == 200, await response.text()
    return await response.read()


# -- manifest builders ---------------------------------------------------------


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data), **extra}


def image_manifest(
    media_type: str,
    config: bytes,
    layers: list[bytes],
    *,
    config_type: str | None = None,
    layer_type: str | None = None,
    **extra: Any,
) -> bytes:
    """A Docker schema2 or OCI image manifest over the given config and layer bytes."""
    docker = media_type == DOCKER_MANIFEST
    config_type = config_type or (DOCKER_CONFIG if docker else OCI_CONFIG)
    layer_type = layer_type or (DOCKER_LAYER if docker else OCI_LAYER)
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": descriptor(config_type, config),
        "layers": [descriptor(layer_type, layer) for layer in layers],
        **extra,
    }
    return canonical(body)


def index_manifest(media_type: str, children: list[tuple[str, bytes]], **extra: Any) -> bytes:
    """A Docker manifest list or OCI index over ``(media type, raw manifest)`` children."""
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [
            descriptor(child_type, raw, platform={"architecture": f"arch{i}", "os": "linux"})
            for i, (child_type, raw) in enumerate(children)
        ],
        **extra,
    }
    return canonical(body)


def artifact_manifest(
    artifact_type: str,
    blobs: list[bytes],
    *,
    subject: tuple[str, bytes] | None = None,
    **extra: Any,
) -> bytes:
    """An OCI 1.1 artifact: an image manifest with ``artifactType`` and the empty config."""
    body: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor(OCI_EMPTY, EMPTY_JSON),
        "layers": [descriptor("application/octet-stream", blob) for blob in blobs],
        **extra,
    }
    if subject is not None:
        body["subject"] = descriptor(subject[0], subject[1])
    return canonical(body)


@dataclass(frozen=True)
class Image:
    name: str
    media_type: str
    raw: bytes
    config: bytes
    layers: list[bytes]

    @property
    def digest(self) -> str:
        return sha256(self.raw)


async def push_image(
    client: TestClient,
    name: str,
    reference: str | None = "latest",
    *,
    media_type: str = OCI_MANIFEST,
    seed: int = 0,
    **extra: Any,
) -> Image:
    """Push a config, two layers and a manifest of ``media_type``; tagged unless reference=None."""
    config = canonical({"architecture": "amd64", "os": "linux", "seed": seed})
    layers = [blob_bytes(3000 + i, seed * 100 + i) for i in range(2)]
    for blob in (config, *layers):
        await push_blob(client, name, blob)
    raw = image_manifest(media_type, config, layers, **extra)
    response = await put_manifest(client, name, reference or sha256(raw), raw, media_type)
    assert response.status == 201, await response.text()
    return Image(name, media_type, raw, config, layers)


async def push_index(
    client: TestClient, name: str, reference: str | None, *, media_type: str = OCI_INDEX
) -> tuple[bytes, list[Image]]:
    """Push two child images by digest and an index (or Docker list) over them."""
    child_type = DOCKER_MANIFEST if media_type == DOCKER_LIST else OCI_MANIFEST
    children = [
        await push_image(client, name, None, media_type=child_type, seed=seed) for seed in (1, 2)
    ]
    raw = index_manifest(media_type, [(c.media_type, c.raw) for c in children])
    response = await put_manifest(client, name, reference or sha256(raw), raw, media_type)
    assert response.status == 201, await response.text()
    return raw, children

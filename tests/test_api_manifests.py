"""Manifest PUT / GET / HEAD / DELETE by tag and digest, for every supported media type."""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import json

import pytest

from regmirror.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.support.api import (
    DOCKER_LAYER,
    assert_error,
    blob_bytes,
    canonical,
    client,  # noqa: F401  (fixtures)
    data_dir,  # noqa: F401
    descriptor,
    image_manifest,
    index_manifest,
    make_client,  # noqa: F401
    push_blob,
    push_image,
    push_index,
    put_manifest,
    sha256,
    sha512,
)

NAME = "lib/app"
IMAGE_TYPES = [DOCKER_MANIFEST, OCI_MANIFEST]
INDEX_TYPES = [DOCKER_LIST, OCI_INDEX]
ARTIFACT_TYPE = "application/vnd.example.sbom.v1+json"


async def push_artifact(client, name: str, reference: str) -> bytes:
    payload = blob_bytes(500, seed=99)
    await push_blob(client, name, b"{}")
    await push_blob(client, name, payload)
    raw = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "config": descriptor("application/vnd.oci.empty.v1+json", b"{}"),
            "layers": [descriptor("application/spdx+json", payload)],
        }
    )
    response = await put_manifest(client, name, reference, raw, OCI_MANIFEST)
    assert response.status == 201, await response.text()
    return raw


# -- push and pull, each media type -------------------------------------------


@pytest.mark.parametrize("media_type", IMAGE_TYPES)
async def test_put_image_manifest_by_tag_is_201_with_location_and_digest(client, media_type):
    config, layer = b'{"os":"linux"}', blob_bytes(2000)
    await push_blob(client, NAME, config)
    await push_blob(client, NAME, layer)
    raw = image_manifest(media_type, config, [layer])

    response = await put_manifest(client, NAME, "v1", raw, media_type)

    assert response.status == 201
    assert response.headers["Docker-Content-Digest"] == sha256(raw)
    assert response.headers["Location"] == f"/v2/{NAME}/manifests/{sha256(raw)}"


@pytest.mark.parametrize("media_type", IMAGE_TYPES)
async def test_get_image_manifest_by_tag_returns_bytes_and_media_type(client, media_type):
    image = await push_image(client, NAME, "v1", media_type=media_type)

    response = await client.get(f"/v2/{NAME}/manifests/v1", headers={"Accept": media_type})

    assert response.status == 200
    assert await response.read() == image.raw
    assert response.headers["Content-Type"] == media_type
    assert response.headers["Docker-Content-Digest"] == image.digest
    assert response.headers["ETag"] == f'"{image.digest}"'


@pytest.mark.parametrize("media_type", IMAGE_TYPES)
async def test_get_image_manifest_by_digest_returns_bytes_and_media_type(client, media_type):
    image = await push_image(client, NAME, None, media_type=media_type)

    response = await client.get(f"/v2/{NAME}/manifests/{image.digest}")

    assert response.status == 200
    assert sha256(await response.read()) == image.digest
    assert response.headers["Content-Type"] == media_type
    assert response.headers["Docker-Content-Digest"] == image.digest


@pytest.mark.parametrize("media_type", INDEX_TYPES)
async def test_index_by_tag_round_trips_with_media_type(client, media_type):
    raw, _ = await push_index(client, NAME, "multi", media_type=media_type)

    response = await client.get(f"/v2/{NAME}/manifests/multi")

    assert response.status == 200
    assert await response.read() == raw
    assert response.headers["Content-Type"] == media_type
    assert response.headers["Docker-Content-Digest"] == sha256(raw)


@pytest.mark.parametrize("media_type", INDEX_TYPES)
async def test_index_by_digest_round_trips_with_media_type(client, media_type):
    raw, _ = await push_index(client, NAME, None, media_type=media_type)

    response = await client.get(f"/v2/{NAME}/manifests/{sha256(raw)}")

    assert response.status == 200
    assert await response.read() == raw
    assert response.headers["Content-Type"] == media_type


@pytest.mark.parametrize("media_type", INDEX_TYPES)
async def test_index_children_are_pullable_by_digest(client, media_type):
    _, children = await push_index(client, NAME, "multi", media_type=media_type)

    for child in children:
        response = await client.get(f"/v2/{NAME}/manifests/{child.digest}")
        assert response.status == 200
        assert await response.read() == child.raw
        assert response.headers["Content-Type"] == child.media_type


async def test_oci_artifact_manifest_round_trips(client):
    raw = await push_artifact(client, NAME, "sbom")

    response = await client.get(f"/v2/{NAME}/manifests/sbom")

    assert response.status == 200
    assert await response.read() == raw
    assert response.headers["Content-Type"] == OCI_MANIFEST
    assert json.loads(raw)["artifactType"] == ARTIFACT_TYPE


async def test_manifest_without_media_type_field_is_served_by_shape(client):
    config, layer = b"{}", blob_bytes(100)
    await push_blob(client, NAME, config)
    await push_blob(client, NAME, layer)
    body = json.loads(image_manifest(OCI_MANIFEST, config, [layer]))
    del body["mediaType"]
    raw = canonical(body)

    response = await put_manifest(client, NAME, "bare", raw, OCI_MANIFEST)

    assert response.status == 201
    got = await client.get(f"/v2/{NAME}/manifests/bare")
    assert got.headers["Content-Type"] == OCI_MANIFEST


@pytest.mark.parametrize("media_type", [DOCKER_MANIFEST, OCI_INDEX])
async def test_manifest_media_type_survives_restart(make_client, media_type):
    first = await make_client()
    if media_type == OCI_INDEX:
        raw, _ = await push_index(first, NAME, "v1", media_type=media_type)
    else:
        raw = (await push_image(first, NAME, "v1", media_type=media_type)).raw
    await first.close()
    second = await make_client()

    response = await second.get(f"/v2/{NAME}/manifests/v1")

    assert response.status == 200
    assert await response.read() == raw
    assert response.headers["Content-Type"] == media_type


async def test_head_manifest_has_headers_and_no_body(client):
    image = await push_image(client, NAME, "v1")

    response = await client.head(f"/v2/{NAME}/manifests/v1")

    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == image.digest
    assert response.headers["Content-Type"] == OCI_MANIFEST
    assert response.headers["Content-Length"] == str(len(image.raw))
    assert response.headers["ETag"] == f'"{image.digest}"'
    assert await response.read() == b""


async def test_get_manifest_with_matching_if_none_match_is_304(client):
    image = await push_image(client, NAME, "v1")

    response = await client.get(
        f"/v2/{NAME}/manifests/v1", headers={"If-None-Match": f'"{image.digest}"'}
    )

    assert response.status == 304
    assert response.headers["ETag"] == f'"{image.digest}"'
    assert await response.read() == b""


async def test_get_manifest_with_other_if_none_match_is_200(client):
    image = await push_image(client, NAME, "v1")

    response = await client.get(
        f"/v2/{NAME}/manifests/v1", headers={"If-None-Match": f'"{sha256(b"x")}"'}
    )

    assert response.status == 200
    assert await response.read() == image.raw


async def test_put_by_digest_does_not_create_a_tag(client):
    image = await push_image(client, NAME, None)

    tags = await (await client.get(f"/v2/{NAME}/tags/list")).json()

    assert tags["tags"] == []
    assert (await client.get(f"/v2/{NAME}/manifests/{image.digest}")).status == 200


async def test_put_by_sha512_digest_stores_under_that_digest(client):
    config, layer = b"{}", blob_bytes(100)
    await push_blob(client, NAME, config)
    await push_blob(client, NAME, layer)
    raw = image_manifest(OCI_MANIFEST, config, [layer])

    response = await put_manifest(client, NAME, sha512(raw), raw, OCI_MANIFEST)

    assert response.status == 201
    assert response.headers["Docker-Content-Digest"] == sha512(raw)
    got = await client.get(f"/v2/{NAME}/manifests/{sha512(raw)}")
    assert got.status == 200
    assert await got.read() == raw


async def test_put_same_tag_again_moves_it(client):
    await push_image(client, NAME, "v1", seed=1)
    second = await push_image(client, NAME, "v1", seed=2)

    response = await client.get(f"/v2/{NAME}/manifests/v1")

    assert response.headers["Docker-Content-Digest"] == second.digest
    assert await response.read() == second.raw


async def test_foreign_layer_with_urls_need_not_be_pushed(client):
    config = b"{}"
    await push_blob(client, NAME, config)
    foreign = descriptor(
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        b"windows base layer",
        urls=["https://example.invalid/layer"],
    )
    body = json.loads(image_manifest(DOCKER_MANIFEST, config, []))
    body["layers"] = [foreign]
    raw = canonical(body)

    response = await put_manifest(client, NAME, "win", raw, DOCKER_MANIFEST)

    assert response.status == 201


# -- references ----------------------------------------------------------------


async def test_put_manifest_with_missing_layer_is_manifest_blob_unknown(client):
    config, layer = b"{}", blob_bytes(100)
    await push_blob(client, NAME, config)
    raw = image_manifest(OCI_MANIFEST, config, [layer])

    response = await put_manifest(client, NAME, "v1", raw, OCI_MANIFEST)

    await assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert (await response.json())["errors"][0]["detail"]["digest"] == sha256(layer)
    await assert_error(await client.get(f"/v2/{NAME}/manifests/v1"), 404, "MANIFEST_UNKNOWN")


async def test_put_manifest_with_missing_config_is_manifest_blob_unknown(client):
    config, layer = b"{}", blob_bytes(100)
    await push_blob(client, NAME, layer)
    raw = image_manifest(DOCKER_MANIFEST, config, [layer], layer_type=DOCKER_LAYER)

    response = await put_manifest(client, NAME, "v1", raw, DOCKER_MANIFEST)

    await assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")


async def test_put_manifest_with_layer_only_in_another_repository_is_manifest_blob_unknown(
    client,
):
    config, layer = b"{}", blob_bytes(100)
    await push_blob(client, NAME, config)
    await push_blob(client, "other/repo", layer)
    raw = image_manifest(OCI_MANIFEST, config, [layer])

    response = await put_manifest(client, NAME, "v1", raw, OCI_MANIFEST)

    await assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")


@pytest.mark.parametrize("media_type", INDEX_TYPES)
async def test_put_index_with_missing_child_is_manifest_blob_unknown(client, media_type):
    child_type = DOCKER_MANIFEST if media_type == DOCKER_LIST else OCI_MANIFEST
    pushed = await push_image(client, NAME, None, media_type=child_type, seed=1)
    missing = image_manifest(child_type, b"{}", [blob_bytes(10, seed=5)])
    raw = index_manifest(media_type, [(child_type, pushed.raw), (child_type, missing)])

    response = await put_manifest(client, NAME, "multi", raw, media_type)

    await assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert (await response.json())["errors"][0]["detail"]["digest"] == sha256(missing)


# -- invalid manifests -----------------------------------------------------------


async def test_put_by_digest_with_other_bytes_is_digest_invalid(client):
    image = await push_image(client, NAME, None, seed=1)
    other = image.raw + b"\n"

    response = await put_manifest(client, NAME, image.digest, other, OCI_MANIFEST)

    await assert_error(response, 400, "DIGEST_INVALID")


async def test_put_by_malformed_digest_is_digest_invalid(client):
    image = await push_image(client, NAME, None)

    response = await put_manifest(client, NAME, "sha256:abc", image.raw, OCI_MANIFEST)

    await assert_error(response, 400, "DIGEST_INVALID")


async def test_put_invalid_json_is_manifest_invalid(client):
    response = await put_manifest(client, NAME, "v1", b"{not json", OCI_MANIFEST)

    await assert_error(response, 400, "MANIFEST_INVALID")


async def test_put_non_object_json_is_manifest_invalid(client):
    response = await put_manifest(client, NAME, "v1", b"[1, 2]", OCI_MANIFEST)

    await assert_error(response, 400, "MANIFEST_INVALID")


@pytest.mark.parametrize(
    "body",
    [
        b'{"schemaVersion": 2, "annotations": ' + b"[" * 1000 + b"]" * 1000 + b"}",
        b"[" * 3_000_000,
        b'{"schemaVersion": 2, "config": {"size": 1' + b"0" * 5000 + b"}}",
    ],
    ids=["nested-1000", "3MB-of-brackets", "5000-digit-number"],
)
async def test_put_hostile_json_is_manifest_invalid_not_a_500(client, body):
    response = await put_manifest(client, NAME, "v1", body, OCI_MANIFEST)

    await assert_error(response, 400, "MANIFEST_INVALID")


async def test_put_non_utf8_body_is_manifest_invalid(client):
    response = await put_manifest(client, NAME, "v1", b"\xff\xfe{}", OCI_MANIFEST)

    await assert_error(response, 400, "MANIFEST_INVALID")


@pytest.mark.parametrize("version", [1, 3, "2", None])
async def test_put_wrong_schema_version_is_manifest_invalid(client, version):
    image = await push_image(client, NAME, None)
    body = json.loads(image.raw)
    body["schemaVersion"] = version

    response = await put_manifest(client, NAME, "v1", canonical(body), OCI_MANIFEST)

    await assert_error(response, 400, "MANIFEST_INVALID")


async def test_put_content_type_not_matching_media_type_is_manifest_invalid(client):
    image = await push_image(client, NAME, None, media_type=OCI_MANIFEST)

    response = await put_manifest(client, NAME, "v1", image.raw, DOCKER_MANIFEST)

    await assert_error(response, 400, "MANIFEST_INVALID")


@pytest.mark.parametrize(
    "content_type",
    [
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    ],
)
async def test_put_schema1_manifest_is_manifest_invalid(client, content_type):
    raw = canonical(
        {
            "schemaVersion": 1,
            "name": NAME,
            "tag": "v1",
            "architecture": "amd64",
            "fsLayers": [{"blobSum": sha256(b"x")}],
            "history": [{"v1Compatibility": "{}"}],
        }
    )

    response = await put_manifest(client, NAME, "v1", raw, content_type)

    await assert_error(response, 400, "MANIFEST_INVALID")


async def test_put_schema1_media_type_in_body_is_manifest_invalid(client):
    raw = canonical(
        {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v1+json"}
    )

    response = await put_manifest(client, NAME, "v1", raw, None)

    await assert_error(response, 400, "MANIFEST_INVALID")


async def test_put_unsupported_media_type_is_manifest_invalid(client):
    raw = canonical({"schemaVersion": 2, "mediaType": "application/vnd.example+json"})

    response = await put_manifest(client, NAME, "v1", raw, "application/vnd.example+json")

    await assert_error(response, 400, "MANIFEST_INVALID")


async def test_put_image_manifest_without_config_is_manifest_invalid(client):
    raw = canonical({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []})

    response = await put_manifest(client, NAME, "v1", raw, OCI_MANIFEST)

    await assert_error(response, 400, "MANIFEST_INVALID")


async def test_put_descriptor_with_bad_digest_is_manifest_invalid(client):
    raw = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "a/b", "digest": "sha256:../../etc", "size": 2},
            "layers": [],
        }
    )

    response = await put_manifest(client, NAME, "v1", raw, OCI_MANIFEST)

    await assert_error(response, 400, "MANIFEST_INVALID")


async def test_put_descriptor_with_negative_size_is_manifest_invalid(client):
    await push_blob(client, NAME, b"{}")
    body = json.loads(image_manifest(OCI_MANIFEST, b"{}", []))
    body["config"]["size"] = -1

    response = await put_manifest(client, NAME, "v1", canonical(body), OCI_MANIFEST)

    await assert_error(response, 400, "MANIFEST_INVALID")


async def test_put_manifest_over_4mib_is_413(client):
    raw = b'{"schemaVersion": 2, "pad": "' + b"x" * (4 * 1024 * 1024) + b'"}'

    response = await put_manifest(client, NAME, "v1", raw, OCI_MANIFEST)

    await assert_error(response, 413, "MANIFEST_INVALID")


async def test_put_streamed_manifest_over_4mib_without_length_is_413(client):
    raw = b'{"schemaVersion": 2, "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}'

    async def chunked():
        for i in range(0, len(raw), 65536):
            yield raw[i : i + 65536]

    response = await put_manifest(client, NAME, "v1", chunked(), OCI_MANIFEST)

    await assert_error(response, 413, "MANIFEST_INVALID")
    await assert_error(await client.get(f"/v2/{NAME}/manifests/v1"), 404, "MANIFEST_UNKNOWN")


async def test_put_manifest_of_exactly_4mib_is_accepted(client):
    await push_blob(client, NAME, b"{}")
    body = json.loads(image_manifest(OCI_MANIFEST, b"{}", []))
    body["annotations"] = {"pad": ""}
    size = len(canonical(body))
    body["annotations"]["pad"] = "x" * (4 * 1024 * 1024 - size)
    raw = canonical(body)
    assert len(raw) == 4 * 1024 * 1024

    response = await put_manifest(client, NAME, "v1", raw, OCI_MANIFEST)

    assert response.status == 201


@pytest.mark.parametrize("tag", ["-leading-dash", ".dot", "has+plus", "x" * 129])
async def test_put_invalid_tag_is_tag_invalid(client, tag):
    image = await push_image(client, NAME, None)

    response = await put_manifest(client, NAME, tag, image.raw, OCI_MANIFEST)

    await assert_error(response, 400, "TAG_INVALID")


@pytest.mark.parametrize(
    "reference", ["-bad", ".dot", "x" * 129, "sha256:abc", "sha999:abcd", "sha256:" + "A" * 64]
)
async def test_get_invalid_reference_is_manifest_unknown(client, reference):
    # A reference that cannot be spelled names no manifest: 404, as registry:2 and the
    # distribution-spec conformance suite expect (issue 7, finding 11).
    response = await client.get(f"/v2/{NAME}/manifests/{reference}")

    await assert_error(response, 404, "MANIFEST_UNKNOWN")


async def test_head_invalid_reference_is_404(client):
    response = await client.head(f"/v2/{NAME}/manifests/-bad")

    assert response.status == 404


@pytest.mark.parametrize("name", ["UPPER/case", "a//b", "-lead", "trail-", "a" * 256])
async def test_put_invalid_name_is_name_invalid(client, name):
    response = await put_manifest(client, name, "v1", b"{}", OCI_MANIFEST)

    await assert_error(response, 400, "NAME_INVALID")


async def test_get_invalid_name_is_name_invalid(client):
    response = await client.get("/v2/Bad_Name/manifests/latest")

    await assert_error(response, 400, "NAME_INVALID")


# -- unknown manifests -------------------------------------------------------------


async def test_get_unknown_tag_is_manifest_unknown(client):
    await push_image(client, NAME, "v1")

    response = await client.get(f"/v2/{NAME}/manifests/v2")

    await assert_error(response, 404, "MANIFEST_UNKNOWN")


async def test_get_unknown_digest_is_manifest_unknown(client):
    response = await client.get(f"/v2/{NAME}/manifests/{sha256(b'nothing')}")

    await assert_error(response, 404, "MANIFEST_UNKNOWN")


async def test_manifest_of_another_repository_is_manifest_unknown(client):
    image = await push_image(client, "team-a/secret", "v1")

    response = await client.get(f"/v2/team-b/app/manifests/{image.digest}")

    await assert_error(response, 404, "MANIFEST_UNKNOWN")


async def test_head_unknown_manifest_is_404(client):
    response = await client.head(f"/v2/{NAME}/manifests/v1")

    assert response.status == 404
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


# -- deletion ----------------------------------------------------------------------


async def test_delete_manifest_by_digest_is_202_then_manifest_unknown(client):
    image = await push_image(client, NAME, "v1")

    response = await client.delete(f"/v2/{NAME}/manifests/{image.digest}")

    assert response.status == 202
    await assert_error(
        await client.get(f"/v2/{NAME}/manifests/{image.digest}"), 404, "MANIFEST_UNKNOWN"
    )


async def test_delete_manifest_removes_every_tag_pointing_to_it(client):
    image = await push_image(client, NAME, "v1", seed=1)
    for tag in ("v1.0", "stable"):
        await put_manifest(client, NAME, tag, image.raw, OCI_MANIFEST)
    other = await push_image(client, NAME, "other", seed=2)

    await client.delete(f"/v2/{NAME}/manifests/{image.digest}")

    for tag in ("v1", "v1.0", "stable"):
        await assert_error(await client.get(f"/v2/{NAME}/manifests/{tag}"), 404, "MANIFEST_UNKNOWN")
    tags = await (await client.get(f"/v2/{NAME}/tags/list")).json()
    assert tags["tags"] == ["other"]
    assert (await client.get(f"/v2/{NAME}/manifests/other")).headers[
        "Docker-Content-Digest"
    ] == other.digest


async def test_delete_tag_removes_only_the_tag(client):
    image = await push_image(client, NAME, "v1")
    await put_manifest(client, NAME, "v2", image.raw, OCI_MANIFEST)

    response = await client.delete(f"/v2/{NAME}/manifests/v1")

    assert response.status == 202
    await assert_error(await client.get(f"/v2/{NAME}/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    assert (await client.get(f"/v2/{NAME}/manifests/v2")).status == 200
    assert (await client.get(f"/v2/{NAME}/manifests/{image.digest}")).status == 200


async def test_delete_unknown_tag_is_manifest_unknown(client):
    await push_image(client, NAME, "v1")

    response = await client.delete(f"/v2/{NAME}/manifests/nope")

    await assert_error(response, 404, "MANIFEST_UNKNOWN")


async def test_delete_unknown_digest_is_manifest_unknown(client):
    response = await client.delete(f"/v2/{NAME}/manifests/{sha256(b'nothing')}")

    await assert_error(response, 404, "MANIFEST_UNKNOWN")


async def test_deleted_manifest_can_be_pushed_again(client):
    image = await push_image(client, NAME, "v1")
    await client.delete(f"/v2/{NAME}/manifests/{image.digest}")

    response = await put_manifest(client, NAME, "v1", image.raw, OCI_MANIFEST)

    assert response.status == 201
    got = await client.get(f"/v2/{NAME}/manifests/v1")
    assert await got.read() == image.raw


async def test_index_media_type_on_image_body_is_manifest_invalid(client):
    config, layer = b"{}", blob_bytes(100)
    body = json.loads(image_manifest(OCI_MANIFEST, config, [layer]))
    del body["mediaType"]

    response = await put_manifest(client, NAME, "v1", canonical(body), OCI_INDEX)

    await assert_error(response, 400, "MANIFEST_INVALID")

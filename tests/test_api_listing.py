"""Tag lists and the catalog with ``n`` / ``last`` pagination, and the OCI 1.1 referrers API."""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import json

import pytest

from regmirror.manifest import OCI_INDEX, OCI_MANIFEST
from tests.support.api import (
    OCI_EMPTY,
    artifact_manifest,
    assert_error,
    blob_bytes,
    canonical,
    client,  # noqa: F401  (fixtures)
    data_dir,  # noqa: F401
    descriptor,
    index_manifest,
    make_client,  # noqa: F401
    push_blob,
    push_image,
    put_manifest,
    sha256,
)

NAME = "lib/app"
SBOM = "application/vnd.example.sbom.v1+json"
SIGNATURE = "application/vnd.example.signature.v1+json"


async def tag_all(client, name: str, tags: list[str]) -> None:
    image = await push_image(client, name, None)
    for tag in tags:
        response = await put_manifest(client, name, tag, image.raw, OCI_MANIFEST)
        assert response.status == 201


async def push_referrer(client, name: str, subject, artifact_type: str, seed: int = 0, **extra):
    """Push an artifact whose subject is ``subject`` (an Image); its raw bytes."""
    payload = blob_bytes(200, seed=seed)
    await push_blob(client, name, b"{}")
    await push_blob(client, name, payload)
    raw = artifact_manifest(
        artifact_type, [payload], subject=(subject.media_type, subject.raw), **extra
    )
    response = await put_manifest(client, name, sha256(raw), raw, OCI_MANIFEST)
    assert response.status == 201, await response.text()
    return raw


# -- tags ------------------------------------------------------------------------


async def test_tags_list_returns_all_tags_in_lexical_order(client):
    await tag_all(client, NAME, ["v2", "latest", "v1", "a"])

    response = await client.get(f"/v2/{NAME}/tags/list")

    assert response.status == 200
    assert await response.json() == {"name": NAME, "tags": ["a", "latest", "v1", "v2"]}
    assert "Link" not in response.headers


async def test_tags_list_with_n_returns_first_page_and_link(client):
    await tag_all(client, NAME, ["a", "b", "c", "d", "e"])

    response = await client.get(f"/v2/{NAME}/tags/list?n=2")

    assert (await response.json())["tags"] == ["a", "b"]
    assert response.headers["Link"] == f'</v2/{NAME}/tags/list?n=2&last=b>; rel="next"'


async def test_tags_list_follows_link_to_last_page(client):
    await tag_all(client, NAME, ["a", "b", "c", "d", "e"])

    seen, url = [], f"/v2/{NAME}/tags/list?n=2"
    while url:
        response = await client.get(url)
        seen += (await response.json())["tags"]
        link = response.headers.get("Link")
        url = link[1 : link.index(">")] if link else None

    assert seen == ["a", "b", "c", "d", "e"]


async def test_tags_list_with_last_starts_after_it(client):
    await tag_all(client, NAME, ["a", "b", "c", "d"])

    response = await client.get(f"/v2/{NAME}/tags/list?last=b")

    assert (await response.json())["tags"] == ["c", "d"]
    assert "Link" not in response.headers


async def test_tags_list_with_n_covering_the_rest_has_no_link(client):
    await tag_all(client, NAME, ["a", "b", "c"])

    response = await client.get(f"/v2/{NAME}/tags/list?n=2&last=a")

    assert (await response.json())["tags"] == ["b", "c"]
    assert "Link" not in response.headers


async def test_tags_list_with_n_zero_is_empty(client):
    await tag_all(client, NAME, ["a", "b"])

    response = await client.get(f"/v2/{NAME}/tags/list?n=0")

    assert response.status == 200
    assert (await response.json())["tags"] == []


@pytest.mark.parametrize("n", ["-1", "abc", "1.5", ""])
async def test_tags_list_with_bad_n_is_pagination_number_invalid(client, n):
    await tag_all(client, NAME, ["a"])

    response = await client.get(f"/v2/{NAME}/tags/list?n={n}")

    await assert_error(response, 400, "PAGINATION_NUMBER_INVALID")


async def test_tags_list_of_unknown_repository_is_name_unknown(client):
    response = await client.get("/v2/no/such/repo/tags/list")

    await assert_error(response, 404, "NAME_UNKNOWN")


async def test_tags_list_of_repository_with_only_blobs_is_empty(client):
    await push_blob(client, NAME, b"layer")

    response = await client.get(f"/v2/{NAME}/tags/list")

    assert response.status == 200
    assert await response.json() == {"name": NAME, "tags": []}


async def test_tags_list_with_invalid_name_is_name_invalid(client):
    response = await client.get("/v2/Bad/tags/list")

    await assert_error(response, 400, "NAME_INVALID")


# -- catalog -----------------------------------------------------------------------


async def test_catalog_lists_repositories_sorted(client):
    for name in ("zeta", "alpha/one", "alpha", "mid/deep/name"):
        await push_blob(client, name, b"layer")

    response = await client.get("/v2/_catalog")

    assert response.status == 200
    assert await response.json() == {
        "repositories": ["alpha", "alpha/one", "mid/deep/name", "zeta"]
    }


async def test_catalog_of_empty_registry_is_empty(client):
    response = await client.get("/v2/_catalog")

    assert response.status == 200
    assert await response.json() == {"repositories": []}


async def test_catalog_with_n_returns_first_page_and_link(client):
    for name in ("a", "b", "c"):
        await push_blob(client, name, b"layer")

    response = await client.get("/v2/_catalog?n=2")

    assert (await response.json())["repositories"] == ["a", "b"]
    assert response.headers["Link"] == '</v2/_catalog?n=2&last=b>; rel="next"'


async def test_catalog_with_last_starts_after_it(client):
    for name in ("a", "b", "c"):
        await push_blob(client, name, b"layer")

    response = await client.get("/v2/_catalog?n=2&last=b")

    assert (await response.json())["repositories"] == ["c"]
    assert "Link" not in response.headers


async def test_catalog_with_bad_n_is_pagination_number_invalid(client):
    response = await client.get("/v2/_catalog?n=-5")

    await assert_error(response, 400, "PAGINATION_NUMBER_INVALID")


# -- referrers ---------------------------------------------------------------------


async def test_put_manifest_with_subject_answers_oci_subject_header(client):
    subject = await push_image(client, NAME, "v1")
    payload = blob_bytes(10)
    await push_blob(client, NAME, b"{}")
    await push_blob(client, NAME, payload)
    raw = artifact_manifest(SBOM, [payload], subject=(subject.media_type, subject.raw))

    response = await put_manifest(client, NAME, sha256(raw), raw, OCI_MANIFEST)

    assert response.status == 201
    assert response.headers["OCI-Subject"] == subject.digest


async def test_put_manifest_without_subject_has_no_oci_subject_header(client):
    await push_blob(client, NAME, b"{}")
    raw = artifact_manifest(SBOM, [])

    response = await put_manifest(client, NAME, "plain", raw, OCI_MANIFEST)

    assert response.status == 201
    assert "OCI-Subject" not in response.headers


async def test_referrers_lists_descriptors_of_manifests_with_that_subject(client):
    subject = await push_image(client, NAME, "v1")
    sbom = await push_referrer(client, NAME, subject, SBOM, seed=1, annotations={"k": "v"})
    signature = await push_referrer(client, NAME, subject, SIGNATURE, seed=2)

    response = await client.get(f"/v2/{NAME}/referrers/{subject.digest}")

    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in response.headers
    index = await response.json()
    assert index["schemaVersion"] == 2 and index["mediaType"] == OCI_INDEX
    by_digest = {entry["digest"]: entry for entry in index["manifests"]}
    assert by_digest == {
        sha256(sbom): {
            "mediaType": OCI_MANIFEST,
            "digest": sha256(sbom),
            "size": len(sbom),
            "artifactType": SBOM,
            "annotations": {"k": "v"},
        },
        sha256(signature): {
            "mediaType": OCI_MANIFEST,
            "digest": sha256(signature),
            "size": len(signature),
            "artifactType": SIGNATURE,
        },
    }


async def test_referrers_filtered_by_artifact_type_sets_filters_applied(client):
    subject = await push_image(client, NAME, "v1")
    sbom = await push_referrer(client, NAME, subject, SBOM, seed=1)
    await push_referrer(client, NAME, subject, SIGNATURE, seed=2)

    response = await client.get(
        f"/v2/{NAME}/referrers/{subject.digest}", params={"artifactType": SBOM}
    )

    assert response.status == 200
    assert response.headers["OCI-Filters-Applied"] == "artifactType"
    assert [e["digest"] for e in (await response.json())["manifests"]] == [sha256(sbom)]


async def test_referrers_filter_matching_nothing_is_empty_with_filters_applied(client):
    subject = await push_image(client, NAME, "v1")
    await push_referrer(client, NAME, subject, SBOM)

    response = await client.get(
        f"/v2/{NAME}/referrers/{subject.digest}?artifactType=application/none"
    )

    assert response.headers["OCI-Filters-Applied"] == "artifactType"
    assert (await response.json())["manifests"] == []


async def test_referrers_of_unknown_subject_is_empty_index(client):
    response = await client.get(f"/v2/{NAME}/referrers/{sha256(b'no such subject')}")

    assert response.status == 200
    assert response.headers["Content-Type"] == OCI_INDEX
    assert await response.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


async def test_referrer_may_be_pushed_before_its_subject(client):
    config, layer = b'{"late": true}', blob_bytes(50, seed=8)
    subject_raw = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config),
            "layers": [],
        }
    )
    await push_blob(client, NAME, b"{}")
    await push_blob(client, NAME, layer)
    raw = artifact_manifest(SBOM, [layer], subject=(OCI_MANIFEST, subject_raw))

    response = await put_manifest(client, NAME, sha256(raw), raw, OCI_MANIFEST)

    assert response.status == 201
    listed = await (await client.get(f"/v2/{NAME}/referrers/{sha256(subject_raw)}")).json()
    assert [e["digest"] for e in listed["manifests"]] == [sha256(raw)]


async def test_referrer_without_artifact_type_reports_config_media_type(client):
    subject = await push_image(client, NAME, "v1")
    config = b'{"signed": true}'
    await push_blob(client, NAME, config)
    raw = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(SIGNATURE, config),
            "layers": [],
            "subject": descriptor(subject.media_type, subject.raw),
        }
    )
    await put_manifest(client, NAME, sha256(raw), raw, OCI_MANIFEST)

    listed = await (await client.get(f"/v2/{NAME}/referrers/{subject.digest}")).json()

    assert [e["artifactType"] for e in listed["manifests"]] == [SIGNATURE]


async def test_index_with_subject_is_listed_as_referrer(client):
    subject = await push_image(client, NAME, "v1", seed=1)
    child = await push_image(client, NAME, None, seed=2)
    raw = index_manifest(
        OCI_INDEX,
        [(child.media_type, child.raw)],
        artifactType=SBOM,
        subject=descriptor(subject.media_type, subject.raw),
    )
    response = await put_manifest(client, NAME, sha256(raw), raw, OCI_INDEX)
    assert response.headers["OCI-Subject"] == subject.digest

    listed = await (await client.get(f"/v2/{NAME}/referrers/{subject.digest}")).json()

    assert listed["manifests"] == [
        {"mediaType": OCI_INDEX, "digest": sha256(raw), "size": len(raw), "artifactType": SBOM}
    ]


async def test_deleted_referrer_is_no_longer_listed(client):
    subject = await push_image(client, NAME, "v1")
    raw = await push_referrer(client, NAME, subject, SBOM)

    await client.delete(f"/v2/{NAME}/manifests/{sha256(raw)}")

    listed = await (await client.get(f"/v2/{NAME}/referrers/{subject.digest}")).json()
    assert listed["manifests"] == []


async def test_referrers_are_scoped_to_the_repository(client):
    subject = await push_image(client, "team-a/app", "v1")
    await push_referrer(client, "team-a/app", subject, SBOM)

    listed = await (await client.get(f"/v2/team-b/app/referrers/{subject.digest}")).json()

    assert listed["manifests"] == []


async def test_referrers_survive_restart(make_client):
    first = await make_client()
    subject = await push_image(first, NAME, "v1")
    raw = await push_referrer(first, NAME, subject, SBOM)
    await first.close()
    second = await make_client()

    listed = await (await second.get(f"/v2/{NAME}/referrers/{subject.digest}")).json()

    assert listed["manifests"][0]["digest"] == sha256(raw)
    assert listed["manifests"][0]["artifactType"] == SBOM


async def test_referrers_with_malformed_digest_is_digest_invalid(client):
    response = await client.get(f"/v2/{NAME}/referrers/sha256:xyz")

    await assert_error(response, 400, "DIGEST_INVALID")


async def test_referrers_with_invalid_name_is_name_invalid(client):
    response = await client.get(f"/v2/BAD/referrers/{sha256(b'x')}")

    await assert_error(response, 400, "NAME_INVALID")


def test_empty_descriptor_media_type_is_the_oci_empty_type():
    assert json.loads(artifact_manifest(SBOM, []))["config"]["mediaType"] == OCI_EMPTY

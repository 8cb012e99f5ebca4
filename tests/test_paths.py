"""Nothing a client sends reaches a path outside the data directory.

Names, digests, tags, upload ids and query parameters are sent raw (no client-side
dot-segment removal or re-encoding) with ``..``, ``%2e%2e``, absolute paths, encoded
slashes and NUL bytes. Each must be refused with the JSON error envelope, never a
500, and nothing may be created, changed or removed beside the data directory.
"""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.support.api import (
    client,  # noqa: F401  (fixtures)
    data_dir,  # noqa: F401
    error_code,
    make_client,  # noqa: F401
    push_image,
    raw_request,
    sha256,
    start_upload,
)

DIGEST = sha256(b"victim")
UUID = "0" * 32

# Spellings of "go up and out" in one path segment (or spanning segments).
ESCAPES = [
    "..",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "..%2F..%2F..%2Fvictim",
    "..%2f..%2fvictim",
    "%2e%2e%2f%2e%2e%2fvictim",
    "%2Fetc%2Fpasswd",
    "..%5C..%5Cvictim",
    "victim%00",
    ".",
]

NAMES = [
    "..",
    "%2e%2e",
    "../victim",
    "a/../../victim",
    "a%2F..%2F..%2F..%2Fvictim",
    "%2Fetc%2Fpasswd",
    "/etc/passwd",
    "a/./b",
    "a%00b",
    "_layers",
    "a/_manifests",
    "x" * 300,
]


def requests_for_name(name: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v2/{name}/tags/list"),
        ("GET", f"/v2/{name}/manifests/latest"),
        ("HEAD", f"/v2/{name}/manifests/latest"),
        ("PUT", f"/v2/{name}/manifests/latest"),
        ("DELETE", f"/v2/{name}/manifests/latest"),
        ("GET", f"/v2/{name}/blobs/{DIGEST}"),
        ("DELETE", f"/v2/{name}/blobs/{DIGEST}"),
        ("POST", f"/v2/{name}/blobs/uploads/"),
        ("POST", f"/v2/{name}/blobs/uploads/?digest={DIGEST}"),
        ("PATCH", f"/v2/{name}/blobs/uploads/{UUID}"),
        ("GET", f"/v2/{name}/referrers/{DIGEST}"),
    ]


def requests_for_segment(segment: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v2/lib/app/manifests/{segment}"),
        ("PUT", f"/v2/lib/app/manifests/{segment}"),
        ("DELETE", f"/v2/lib/app/manifests/{segment}"),
        ("GET", f"/v2/lib/app/manifests/sha256:{segment}"),
        ("GET", f"/v2/lib/app/blobs/{segment}"),
        ("GET", f"/v2/lib/app/blobs/sha256:{segment}"),
        ("DELETE", f"/v2/lib/app/blobs/sha256:{segment}"),
        ("GET", f"/v2/lib/app/blobs/uploads/{segment}"),
        ("PATCH", f"/v2/lib/app/blobs/uploads/{segment}"),
        ("PUT", f"/v2/lib/app/blobs/uploads/{segment}?digest={DIGEST}"),
        ("DELETE", f"/v2/lib/app/blobs/uploads/{segment}"),
        ("GET", f"/v2/lib/app/referrers/sha256:{segment}"),
        ("POST", f"/v2/lib/app/blobs/uploads/?digest=sha256:{segment}"),
        ("POST", f"/v2/lib/app/blobs/uploads/?mount={DIGEST}&from={segment}"),
        ("POST", f"/v2/lib/app/blobs/uploads/?mount=sha256:{segment}&from=lib/app"),
    ]


CASES = sorted(
    {case for name in NAMES for case in requests_for_name(name)}
    | {case for segment in ESCAPES for case in requests_for_segment(segment)}
)


def snapshot(root: Path, data_dir: Path) -> dict[Path, str]:
    """Every path under ``root`` but outside ``data_dir``, with a hash of each file."""
    found = {}
    for path in root.rglob("*"):
        if path == data_dir or data_dir in path.parents:
            continue
        found[path] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return found


@pytest.fixture
def outside(tmp_path: Path, data_dir: Path) -> Path:
    """A victim file beside the data directory, and one a few levels up."""
    (tmp_path / "victim").write_bytes(b"do not touch")
    (tmp_path / "victim.d").mkdir()
    (tmp_path / "victim.d" / "data").write_bytes(b"do not touch either")
    return tmp_path


async def assert_refused_and_contained(client, data_dir, outside, cases):
    before = snapshot(outside, data_dir)
    for method, path in cases:
        response = await raw_request(client, method, path, data=None if method == "GET" else b"{}")

        assert 400 <= response.status < 500, (method, path, response.status, await response.text())
        if method != "HEAD":
            assert await error_code(response), (method, path)
    assert snapshot(outside, data_dir) == before


@pytest.mark.parametrize("name", NAMES)
async def test_hostile_repository_name_is_refused_and_touches_nothing_outside(
    client, data_dir, outside, name
):
    await assert_refused_and_contained(client, data_dir, outside, requests_for_name(name))


@pytest.mark.parametrize("segment", ESCAPES)
async def test_hostile_reference_digest_or_upload_id_is_refused_and_touches_nothing_outside(
    client, data_dir, outside, segment
):
    await assert_refused_and_contained(client, data_dir, outside, requests_for_segment(segment))


async def test_no_hostile_request_caused_a_server_error(client, data_dir, outside):
    for method, path in CASES:
        await raw_request(client, method, path, data=b"{}")

    metrics = await (await client.get("/metrics")).text()

    assert 'status="500"' not in metrics
    assert snapshot(outside, data_dir) == {
        outside / "victim": hashlib.sha256(b"do not touch").hexdigest(),
        outside / "victim.d": "dir",
        outside / "victim.d" / "data": hashlib.sha256(b"do not touch either").hexdigest(),
    }


async def test_escapes_in_listing_parameters_are_only_compared_never_opened(client, data_dir):
    await push_image(client, "lib/app", "v1")

    for last in ("../../..", "%2e%2e%2f", "/etc/passwd"):
        response = await raw_request(client, "GET", f"/v2/lib/app/tags/list?n=1&last={last}")
        assert response.status == 200
        response = await raw_request(client, "GET", f"/v2/_catalog?n=1&last={last}")
        assert response.status == 200


async def test_escapes_in_artifact_type_filter_are_only_compared(client):
    image = await push_image(client, "lib/app", "v1")

    response = await raw_request(
        client, "GET", f"/v2/lib/app/referrers/{image.digest}?artifactType=..%2F..%2Fvictim"
    )

    assert response.status == 200
    assert (await response.json())["manifests"] == []


async def test_upload_ids_are_never_resolved_against_the_uploads_directory(client, data_dir):
    location = await start_upload(client, "lib/app")
    upload_id = location.rsplit("/", 1)[1]

    for probe in (f"..%2F{upload_id}", f"{upload_id}%2F..", f"{upload_id}%00", f"./{upload_id}"):
        response = await raw_request(client, "GET", f"/v2/lib/app/blobs/uploads/{probe}")
        assert response.status == 404
        assert await error_code(response) in ("BLOB_UPLOAD_UNKNOWN", "NOT_FOUND")
    assert (await client.get(location)).status == 204

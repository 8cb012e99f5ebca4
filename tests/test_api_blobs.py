"""Blob GET / HEAD / DELETE, Range requests, and repository scoping of blobs."""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import hashlib

import pytest

from tests.support.api import (
    assert_error,
    blob_bytes,
    client,  # noqa: F401  (fixtures)
    data_dir,  # noqa: F401
    make_client,  # noqa: F401
    push_blob,
    sha256,
)

DATA = blob_bytes(100_000, seed=7)


async def test_get_blob_returns_the_pushed_bytes(client):
    digest = await push_blob(client, "lib/app", DATA)

    response = await client.get(f"/v2/lib/app/blobs/{digest}")

    assert response.status == 200
    body = await response.read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(DATA).hexdigest()


async def test_get_blob_sets_digest_length_and_type_headers(client):
    digest = await push_blob(client, "lib/app", DATA)

    response = await client.get(f"/v2/lib/app/blobs/{digest}")

    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["Content-Length"] == str(len(DATA))
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_head_blob_has_headers_and_no_body(client):
    digest = await push_blob(client, "lib/app", DATA)

    response = await client.head(f"/v2/lib/app/blobs/{digest}")

    assert response.status == 200
    assert response.headers["Docker-Content-Digest"] == digest
    assert response.headers["Content-Length"] == str(len(DATA))
    assert await response.read() == b""


async def test_get_blob_range_is_206_with_the_requested_bytes(client):
    digest = await push_blob(client, "lib/app", DATA)

    response = await client.get(f"/v2/lib/app/blobs/{digest}", headers={"Range": "bytes=1000-4999"})

    assert response.status == 206
    assert await response.read() == DATA[1000:5000]
    assert response.headers["Content-Range"] == f"bytes 1000-4999/{len(DATA)}"
    assert response.headers["Content-Length"] == "4000"


async def test_get_blob_open_ended_range_runs_to_the_end(client):
    digest = await push_blob(client, "lib/app", DATA)

    response = await client.get(f"/v2/lib/app/blobs/{digest}", headers={"Range": "bytes=99000-"})

    assert response.status == 206
    assert await response.read() == DATA[99000:]
    assert response.headers["Content-Range"] == f"bytes 99000-{len(DATA) - 1}/{len(DATA)}"


async def test_get_blob_suffix_range_returns_the_last_bytes(client):
    digest = await push_blob(client, "lib/app", DATA)

    response = await client.get(f"/v2/lib/app/blobs/{digest}", headers={"Range": "bytes=-10"})

    assert response.status == 206
    assert await response.read() == DATA[-10:]


async def test_get_blob_unsatisfiable_range_is_416(client):
    digest = await push_blob(client, "lib/app", DATA)

    response = await client.get(
        f"/v2/lib/app/blobs/{digest}", headers={"Range": f"bytes={len(DATA)}-"}
    )

    assert response.status == 416
    assert response.headers["Content-Range"] == f"bytes */{len(DATA)}"


@pytest.mark.parametrize(
    "header",
    ["bytes=-0", "bytes=5-2", "bytes=" + "9" * 4400 + "-", f"bytes={len(DATA)}-{len(DATA) + 5}"],
    ids=["suffix-0", "backwards", "4400-digit-start", "past-the-end"],
)
async def test_get_blob_unsatisfiable_ranges_are_416_in_the_envelope(client, header):
    digest = await push_blob(client, "lib/app", DATA)

    response = await client.get(f"/v2/lib/app/blobs/{digest}", headers={"Range": header})

    await assert_error(response, 416, "BLOB_UNKNOWN")
    assert response.headers["Content-Range"] == f"bytes */{len(DATA)}"


@pytest.mark.parametrize("header", ["items=0-1", "bytes=0-1,4-5", "bytes=\xb2-4", "bytes=-"])
async def test_get_blob_range_forms_not_served_ranged_get_the_whole_blob(client, header):
    digest = await push_blob(client, "lib/app", DATA)

    response = await client.get(f"/v2/lib/app/blobs/{digest}", headers={"Range": header})

    assert response.status == 200
    assert await response.read() == DATA


async def test_get_blob_range_past_the_end_is_cut_at_the_end(client):
    digest = await push_blob(client, "lib/app", DATA)

    response = await client.get(
        f"/v2/lib/app/blobs/{digest}", headers={"Range": "bytes=10-" + "9" * 4400}
    )

    assert response.status == 206
    assert await response.read() == DATA[10:]


async def test_get_unknown_blob_is_blob_unknown(client):
    await push_blob(client, "lib/app", DATA)

    response = await client.get(f"/v2/lib/app/blobs/{sha256(b'never pushed')}")

    await assert_error(response, 404, "BLOB_UNKNOWN")


async def test_head_unknown_blob_is_404(client):
    response = await client.head(f"/v2/lib/app/blobs/{sha256(b'never pushed')}")

    assert response.status == 404
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_blob_not_linked_in_repository_is_blob_unknown_even_if_another_has_it(client):
    digest = await push_blob(client, "team-a/secret", DATA)

    response = await client.get(f"/v2/team-b/app/blobs/{digest}")

    await assert_error(response, 404, "BLOB_UNKNOWN")


async def test_head_blob_not_linked_in_repository_is_404(client):
    digest = await push_blob(client, "team-a/secret", DATA)

    response = await client.head(f"/v2/team-b/app/blobs/{digest}")

    assert response.status == 404


async def test_get_blob_with_malformed_digest_is_digest_invalid(client):
    response = await client.get("/v2/lib/app/blobs/sha256:nothex")

    await assert_error(response, 400, "DIGEST_INVALID")


async def test_get_blob_with_unsupported_algorithm_is_digest_invalid(client):
    response = await client.get(f"/v2/lib/app/blobs/md5:{'0' * 32}")

    await assert_error(response, 400, "DIGEST_INVALID")


async def test_get_blob_with_invalid_name_is_name_invalid(client):
    response = await client.get(f"/v2/Lib/App/blobs/{sha256(DATA)}")

    await assert_error(response, 400, "NAME_INVALID")


async def test_delete_blob_is_202_then_blob_unknown(client):
    digest = await push_blob(client, "lib/app", DATA)

    response = await client.delete(f"/v2/lib/app/blobs/{digest}")

    assert response.status == 202
    assert response.headers["Docker-Content-Digest"] == digest
    await assert_error(await client.get(f"/v2/lib/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")


async def test_delete_blob_unlinks_only_that_repository(client):
    digest = await push_blob(client, "lib/app", DATA)
    await push_blob(client, "lib/other", DATA)

    await client.delete(f"/v2/lib/app/blobs/{digest}")

    response = await client.get(f"/v2/lib/other/blobs/{digest}")
    assert response.status == 200
    assert await response.read() == DATA


async def test_delete_unknown_blob_is_blob_unknown(client):
    response = await client.delete(f"/v2/lib/app/blobs/{sha256(b'never pushed')}")

    await assert_error(response, 404, "BLOB_UNKNOWN")


async def test_delete_blob_linked_in_another_repository_is_blob_unknown(client):
    digest = await push_blob(client, "team-a/secret", DATA)

    response = await client.delete(f"/v2/team-b/app/blobs/{digest}")

    await assert_error(response, 404, "BLOB_UNKNOWN")
    assert (await client.get(f"/v2/team-a/secret/blobs/{digest}")).status == 200


async def test_empty_blob_is_served_with_zero_length(client):
    digest = await push_blob(client, "lib/app", b"")

    response = await client.get(f"/v2/lib/app/blobs/{digest}")

    assert response.status == 200
    assert response.headers["Content-Length"] == "0"
    assert await response.read() == b""

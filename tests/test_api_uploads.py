"""Blob uploads: sessions, monolithic, chunked and streamed, mounts, resumption, expiry."""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest

from regmirror.api.keys import UPLOADS
from tests.support.api import (  # noqa: F401  (fixtures)
    assert_error,
    blob_bytes,
    client,
    data_dir,
    error_code,
    get_blob_bytes,
    make_client,
    push_blob,
    raw_request,
    sha256,
    sha512,
    start_upload,
)

DATA = blob_bytes(300_000, seed=11)
NAME = "lib/app"


def blob_file(data_dir, digest: str):
    algorithm, hex_ = digest.split(":")
    return data_dir / "docker/registry/v2/blobs" / algorithm / hex_[:2] / hex_ / "data"


def upload_sessions(data_dir) -> list[str]:
    root = data_dir / "uploads"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


async def chunks(data: bytes, size: int = 65536):
    """A body without Content-Length: sent with chunked transfer encoding."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


# -- sessions ----------------------------------------------------------------


async def test_post_opens_session_202_with_location_range_and_uuid(client):
    response = await client.post(f"/v2/{NAME}/blobs/uploads/")

    assert response.status == 202
    upload_id = response.headers["Docker-Upload-UUID"]
    assert response.headers["Location"] == f"/v2/{NAME}/blobs/uploads/{upload_id}"
    assert response.headers["Range"] == "0-0"
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"


async def test_post_without_trailing_slash_opens_session(client):
    response = await client.post(f"/v2/{NAME}/blobs/uploads")

    assert response.status == 202
    assert "Docker-Upload-UUID" in response.headers


async def test_post_with_invalid_name_is_name_invalid(client):
    response = await client.post("/v2/UPPER/blobs/uploads/")

    await assert_error(response, 400, "NAME_INVALID")


async def test_status_of_fresh_session_is_204_with_range(client):
    location = await start_upload(client, NAME)

    response = await client.get(location)

    assert response.status == 204
    assert response.headers["Range"] == "0-0"
    assert response.headers["Location"] == location
    assert response.headers["Docker-Upload-UUID"] == location.rsplit("/", 1)[1]


async def test_status_after_chunk_reports_received_range(client):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA[:1000])

    response = await client.get(location)

    assert response.status == 204
    assert response.headers["Range"] == "0-999"


async def test_delete_cancels_session_204_then_blob_upload_unknown(client):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA[:1000])

    response = await client.delete(location)

    assert response.status == 204
    await assert_error(await client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(await client.patch(location, data=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    await assert_error(
        await client.put(f"{location}?digest={sha256(DATA[:1000])}"), 404, "BLOB_UPLOAD_UNKNOWN"
    )


async def test_cancelled_session_leaves_no_upload_directory(client, data_dir):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA[:1000])

    await client.delete(location)

    assert upload_sessions(data_dir) == []


async def test_unknown_upload_id_is_blob_upload_unknown(client):
    response = await client.get(f"/v2/{NAME}/blobs/uploads/{'0' * 32}")

    await assert_error(response, 404, "BLOB_UPLOAD_UNKNOWN")


async def test_upload_id_of_another_repository_is_blob_upload_unknown(client):
    location = await start_upload(client, "team-a/app")
    upload_id = location.rsplit("/", 1)[1]

    for method in ("GET", "PATCH", "PUT", "DELETE"):
        response = await client.request(
            method, f"/v2/team-b/app/blobs/uploads/{upload_id}?digest={sha256(b'')}"
        )
        await assert_error(response, 404, "BLOB_UPLOAD_UNKNOWN")
    assert (await client.get(location)).status == 204


async def test_bogus_upload_ids_are_blob_upload_unknown(client):
    bogus_ids = ("..", "%2e%2e", "..%2F..%2Fetc", "not-a-uuid", "A" * 32, "0" * 31, "0" * 33)
    for method in ("GET", "PATCH", "PUT", "DELETE"):
        for bogus in bogus_ids:
            response = await raw_request(client, method, f"/v2/{NAME}/blobs/uploads/{bogus}")
            await assert_error(response, 404, "BLOB_UPLOAD_UNKNOWN")


async def test_upload_id_with_literal_dot_segments_is_404_envelope(client):
    response = await raw_request(client, "PATCH", f"/v2/{NAME}/blobs/uploads/../../etc", data=b"x")

    assert response.status == 404
    assert await error_code(response) in ("NOT_FOUND", "BLOB_UPLOAD_UNKNOWN")


# -- monolithic ----------------------------------------------------------------


async def test_monolithic_post_with_digest_is_201_and_stores_blob(client):
    digest = sha256(DATA)

    response = await client.post(f"/v2/{NAME}/blobs/uploads/?digest={digest}", data=DATA)

    assert response.status == 201
    assert response.headers["Location"] == f"/v2/{NAME}/blobs/{digest}"
    assert response.headers["Docker-Content-Digest"] == digest
    assert await get_blob_bytes(client, NAME, digest) == DATA


async def test_monolithic_post_with_wrong_digest_is_digest_invalid_and_stores_nothing(
    client, data_dir
):
    wrong = sha256(b"other bytes")

    response = await client.post(f"/v2/{NAME}/blobs/uploads/?digest={wrong}", data=DATA)

    await assert_error(response, 400, "DIGEST_INVALID")
    assert not blob_file(data_dir, wrong).exists()
    assert not blob_file(data_dir, sha256(DATA)).exists()
    assert upload_sessions(data_dir) == []


async def test_monolithic_post_with_malformed_digest_is_digest_invalid(client, data_dir):
    response = await client.post(f"/v2/{NAME}/blobs/uploads/?digest=sha256:zz", data=DATA)

    await assert_error(response, 400, "DIGEST_INVALID")
    assert upload_sessions(data_dir) == []


async def test_monolithic_post_with_sha512_digest_is_stored_under_sha512(client, data_dir):
    digest = sha512(DATA)

    response = await client.post(f"/v2/{NAME}/blobs/uploads/?digest={digest}", data=DATA)

    assert response.status == 201
    assert response.headers["Docker-Content-Digest"] == digest
    assert blob_file(data_dir, digest).exists()
    body = await get_blob_bytes(client, NAME, digest)
    assert hashlib.sha512(body).hexdigest() == digest.split(":")[1]


async def test_monolithic_post_of_existing_blob_is_201(client):
    digest = await push_blob(client, NAME, DATA)

    response = await client.post(f"/v2/{NAME}/blobs/uploads/?digest={digest}", data=DATA)

    assert response.status == 201
    assert await get_blob_bytes(client, NAME, digest) == DATA


# -- chunked -------------------------------------------------------------------


async def test_chunked_patches_in_order_then_put_stores_blob(client):
    location = await start_upload(client, NAME)
    parts = [DATA[:100_000], DATA[100_000:250_000], DATA[250_000:]]
    offset = 0
    for part in parts:
        end = offset + len(part) - 1
        response = await client.patch(
            location,
            data=part,
            headers={
                "Content-Range": f"{offset}-{end}",
                "Content-Type": "application/octet-stream",
            },
        )
        assert response.status == 202
        assert response.headers["Range"] == f"0-{end}"
        assert response.headers["Location"] == location
        offset = end + 1

    response = await client.put(f"{location}?digest={sha256(DATA)}")

    assert response.status == 201
    assert response.headers["Docker-Content-Digest"] == sha256(DATA)
    assert response.headers["Location"] == f"/v2/{NAME}/blobs/{sha256(DATA)}"
    assert await get_blob_bytes(client, NAME, sha256(DATA)) == DATA


async def test_put_with_last_chunk_completes_upload(client):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA[:200_000], headers={"Content-Range": "0-199999"})

    response = await client.put(
        f"{location}?digest={sha256(DATA)}",
        data=DATA[200_000:],
        headers={"Content-Range": f"200000-{len(DATA) - 1}"},
    )

    assert response.status == 201
    assert await get_blob_bytes(client, NAME, sha256(DATA)) == DATA


async def test_put_with_whole_body_on_empty_session_completes_upload(client):
    location = await start_upload(client, NAME)

    response = await client.put(f"{location}?digest={sha256(DATA)}", data=DATA)

    assert response.status == 201
    assert await get_blob_bytes(client, NAME, sha256(DATA)) == DATA


async def test_out_of_order_chunk_is_416_with_range_of_what_is_held(client):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA[:1000], headers={"Content-Range": "0-999"})

    response = await client.patch(
        location, data=DATA[2000:3000], headers={"Content-Range": "2000-2999"}
    )

    await assert_error(response, 416, "BLOB_UPLOAD_INVALID")
    assert response.headers["Range"] == "0-999"
    assert (await client.get(location)).headers["Range"] == "0-999"


async def test_repeated_chunk_is_416_and_upload_unchanged(client):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA[:1000], headers={"Content-Range": "0-999"})

    response = await client.patch(location, data=DATA[:1000], headers={"Content-Range": "0-999"})

    await assert_error(response, 416, "BLOB_UPLOAD_INVALID")
    response = await client.put(
        f"{location}?digest={sha256(DATA[:2000])}",
        data=DATA[1000:2000],
        headers={"Content-Range": "1000-1999"},
    )
    assert response.status == 201


async def test_malformed_content_range_is_416(client):
    location = await start_upload(client, NAME)

    response = await client.patch(location, data=b"abc", headers={"Content-Range": "5-2"})

    await assert_error(response, 416, "BLOB_UPLOAD_INVALID")


async def test_two_chunks_racing_for_the_same_offset_one_wins_one_is_416(client):
    location = await start_upload(client, NAME)
    headers = {"Content-Range": "0-99999"}

    responses = await asyncio.gather(
        client.patch(location, data=DATA[:100_000], headers=headers),
        client.patch(location, data=DATA[:100_000], headers=headers),
    )

    assert sorted(r.status for r in responses) == [202, 416]
    assert (await client.get(location)).headers["Range"] == "0-99999"


async def test_patch_without_content_range_streams_and_appends(client):
    location = await start_upload(client, NAME)

    first = await client.patch(location, data=chunks(DATA[:150_000]))
    second = await client.patch(location, data=chunks(DATA[150_000:]))

    assert first.status == 202 and first.headers["Range"] == "0-149999"
    assert second.status == 202 and second.headers["Range"] == f"0-{len(DATA) - 1}"
    response = await client.put(f"{location}?digest={sha256(DATA)}")
    assert response.status == 201
    assert await get_blob_bytes(client, NAME, sha256(DATA)) == DATA


async def test_put_digest_mismatch_is_digest_invalid_and_nothing_stored(client, data_dir):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA)
    wrong = sha256(DATA[:10])

    response = await client.put(f"{location}?digest={wrong}")

    await assert_error(response, 400, "DIGEST_INVALID")
    assert not blob_file(data_dir, wrong).exists()
    assert not blob_file(data_dir, sha256(DATA)).exists()
    await assert_error(await client.get(f"/v2/{NAME}/blobs/{wrong}"), 404, "BLOB_UNKNOWN")
    await assert_error(await client.get(location), 404, "BLOB_UPLOAD_UNKNOWN")


async def test_put_without_digest_is_digest_invalid_and_session_kept(client):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA[:1000])

    response = await client.put(location)

    await assert_error(response, 400, "DIGEST_INVALID")
    status = await client.get(location)
    assert status.status == 204 and status.headers["Range"] == "0-999"


async def test_put_with_sha512_digest_completes_chunked_upload(client, data_dir):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA[:5000], headers={"Content-Range": "0-4999"})
    await client.patch(
        location, data=DATA[5000:], headers={"Content-Range": f"5000-{len(DATA) - 1}"}
    )

    response = await client.put(f"{location}?digest={sha512(DATA)}")

    assert response.status == 201
    assert response.headers["Docker-Content-Digest"] == sha512(DATA)
    assert await get_blob_bytes(client, NAME, sha512(DATA)) == DATA


async def test_content_range_length_disagreeing_with_content_length_is_size_invalid(client):
    location = await start_upload(client, NAME)

    response = await client.patch(location, data=DATA[:1000], headers={"Content-Range": "0-1999"})

    await assert_error(response, 400, "SIZE_INVALID")
    assert (await client.get(location)).headers["Range"] == "0-0"


async def test_chunk_shorter_than_content_range_is_size_invalid_and_rolled_back(client):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA[:1000], headers={"Content-Range": "0-999"})

    response = await client.patch(
        location, data=chunks(DATA[1000:1500]), headers={"Content-Range": "1000-1999"}
    )

    await assert_error(response, 400, "SIZE_INVALID")
    assert (await client.get(location)).headers["Range"] == "0-999"
    response = await client.put(
        f"{location}?digest={sha256(DATA[:2000])}",
        data=DATA[1000:2000],
        headers={"Content-Range": "1000-1999"},
    )
    assert response.status == 201
    assert await get_blob_bytes(client, NAME, sha256(DATA[:2000])) == DATA[:2000]


async def test_chunk_longer_than_content_range_is_size_invalid_and_rolled_back(client):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA[:1000], headers={"Content-Range": "0-999"})

    response = await client.patch(
        location, data=chunks(DATA[1000:3000], 500), headers={"Content-Range": "1000-1999"}
    )

    await assert_error(response, 400, "SIZE_INVALID")
    assert (await client.get(location)).headers["Range"] == "0-999"


async def test_chunk_interrupted_mid_body_is_rolled_back_and_upload_resumable(client):
    location = await start_upload(client, NAME)
    await client.patch(location, data=DATA[:1000], headers={"Content-Range": "0-999"})
    uploads = client.app[UPLOADS]
    upload = await uploads.get(NAME, location.rsplit("/", 1)[1])

    async def disconnecting_body():
        yield DATA[1000:1500]
        raise ConnectionResetError("client went away mid-chunk")

    with pytest.raises(ConnectionResetError):
        await uploads.append(upload, disconnecting_body(), start=1000, length=1000)

    assert (await client.get(location)).headers["Range"] == "0-999"
    response = await client.put(
        f"{location}?digest={sha256(DATA[:2000])}",
        data=DATA[1000:2000],
        headers={"Content-Range": "1000-1999"},
    )
    assert response.status == 201
    assert await get_blob_bytes(client, NAME, sha256(DATA[:2000])) == DATA[:2000]


# -- mounts --------------------------------------------------------------------


async def test_mount_from_repository_holding_the_blob_is_201(client):
    digest = await push_blob(client, "team-a/base", DATA)

    response = await client.post(f"/v2/team-b/app/blobs/uploads/?mount={digest}&from=team-a/base")

    assert response.status == 201
    assert response.headers["Location"] == f"/v2/team-b/app/blobs/{digest}"
    assert response.headers["Docker-Content-Digest"] == digest
    assert await get_blob_bytes(client, "team-b/app", digest) == DATA


async def test_mount_from_repository_lacking_the_blob_opens_session_202(client):
    digest = await push_blob(client, "team-c/other", DATA)

    response = await client.post(f"/v2/team-b/app/blobs/uploads/?mount={digest}&from=team-a/base")

    assert response.status == 202
    upload_id = response.headers["Docker-Upload-UUID"]
    assert response.headers["Location"] == f"/v2/team-b/app/blobs/uploads/{upload_id}"
    await assert_error(await client.get(f"/v2/team-b/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")


async def test_mount_without_from_opens_session_202(client):
    digest = await push_blob(client, "team-a/base", DATA)

    response = await client.post(f"/v2/team-b/app/blobs/uploads/?mount={digest}")

    assert response.status == 202
    await assert_error(await client.get(f"/v2/team-b/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")


async def test_mount_with_invalid_from_name_is_name_invalid(client):
    digest = await push_blob(client, "team-a/base", DATA)

    response = await client.post(f"/v2/team-b/app/blobs/uploads/?mount={digest}&from=../team-a")

    await assert_error(response, 400, "NAME_INVALID")


async def test_mount_with_malformed_digest_is_digest_invalid(client):
    response = await client.post("/v2/team-b/app/blobs/uploads/?mount=sha256:zz&from=team-a/base")

    await assert_error(response, 400, "DIGEST_INVALID")


# -- durability and expiry -----------------------------------------------------


async def test_upload_survives_restart_and_can_be_resumed(make_client):
    first = await make_client()
    location = await start_upload(first, NAME)
    await first.patch(location, data=DATA[:120_000], headers={"Content-Range": "0-119999"})
    await first.close()

    second = await make_client()
    status = await second.get(location)
    assert status.status == 204 and status.headers["Range"] == "0-119999"
    await second.patch(
        location, data=DATA[120_000:], headers={"Content-Range": f"120000-{len(DATA) - 1}"}
    )
    response = await second.put(f"{location}?digest={sha256(DATA)}")

    assert response.status == 201
    assert await get_blob_bytes(second, NAME, sha256(DATA)) == DATA


async def test_stale_session_expires(client, data_dir):
    stale = await start_upload(client, NAME)
    fresh = await start_upload(client, NAME)
    await client.patch(stale, data=DATA[:1000])
    old = time.time() - client.app[UPLOADS].ttl - 60
    for name in ("info.json", "data"):
        os.utime(data_dir / "uploads" / stale.rsplit("/", 1)[1] / name, (old, old))

    expired = await client.app[UPLOADS].expire()

    assert expired == 1
    await assert_error(await client.get(stale), 404, "BLOB_UPLOAD_UNKNOWN")
    assert (await client.get(fresh)).status == 204


async def test_session_with_recent_chunk_does_not_expire(client, data_dir):
    location = await start_upload(client, NAME)
    old = time.time() - client.app[UPLOADS].ttl - 60
    os.utime(data_dir / "uploads" / location.rsplit("/", 1)[1] / "info.json", (old, old))
    await client.patch(location, data=DATA[:1000])

    assert await client.app[UPLOADS].expire() == 0
    assert (await client.get(location)).status == 204

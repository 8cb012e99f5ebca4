"""An upload that runs out of disk: a clear 507, the chunk rolled back, nothing acknowledged lost.

The data directory is a small tmpfs the test mounts (as root); where mounting is not
permitted the test skips rather than pretend.
"""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.api import (  # noqa: F401  (fixtures)
    assert_error,
    blob_bytes,
    client,
    get_blob_bytes,
    make_client,
    sha256,
    start_upload,
)

NAME = "lib/app"
DISK = 4 * 1024 * 1024  # the tmpfs's size
MiB = 1024 * 1024


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """The registry's data directory on a tmpfs of :data:`DISK` bytes."""
    mount = tmp_path / "data"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK},mode=0700", "regmirror-test", str(mount)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def session_files(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "uploads").iterdir())


async def test_chunk_that_fills_the_disk_is_507_and_rolled_back(client, data_dir, caplog):
    first = blob_bytes(MiB, seed=1)
    location = await start_upload(client, NAME)
    assert (await client.patch(location, data=first)).status == 202

    with caplog.at_level(logging.ERROR):
        response = await client.patch(location, data=blob_bytes(DISK, seed=2))

    await assert_error(response, 507, "UNAVAILABLE")
    assert "disk is full" in (await response.json())["errors"][0]["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback
    status = await client.get(location)
    assert status.status == 204
    assert status.headers["Range"] == f"0-{MiB - 1}"  # exactly what was acknowledged


async def test_upload_goes_on_after_a_disk_full_chunk(client, data_dir):
    first, rest = blob_bytes(MiB, seed=3), blob_bytes(MiB // 2, seed=4)
    location = await start_upload(client, NAME)
    assert (await client.patch(location, data=first)).status == 202
    await assert_error(
        await client.patch(location, data=blob_bytes(DISK, seed=5)), 507, "UNAVAILABLE"
    )

    patched = await client.patch(
        location, data=rest, headers={"Content-Range": f"{MiB}-{MiB + len(rest) - 1}"}
    )
    assert patched.status == 202, await patched.text()
    put = await client.put(f"{location}?digest={sha256(first + rest)}")

    assert put.status == 201, await put.text()
    assert await get_blob_bytes(client, NAME, sha256(first + rest)) == first + rest


async def test_monolithic_push_too_big_for_the_disk_is_507_and_leaves_nothing(client, data_dir):
    data = blob_bytes(DISK, seed=6)

    response = await client.post(f"/v2/{NAME}/blobs/uploads/?digest={sha256(data)}", data=data)

    await assert_error(response, 507, "UNAVAILABLE")
    assert session_files(data_dir) == []
    small = blob_bytes(1000, seed=7)  # the space came back
    ok = await client.post(f"/v2/{NAME}/blobs/uploads/?digest={sha256(small)}", data=small)
    assert ok.status == 201, await ok.text()


def fill_disk(data_dir: Path) -> Path:
    """Write a file beside the store until the tmpfs has no block left."""
    filler = data_dir / "filler"
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        except OSError:
            pass
    return filler


async def test_mount_on_a_full_disk_is_507_and_works_once_there_is_room(client, data_dir):
    data = blob_bytes(1000, seed=8)
    digest = sha256(data)
    assert (
        await client.post(f"/v2/{NAME}/blobs/uploads/?digest={digest}", data=data)
    ).status == 201
    filler = await asyncio.to_thread(fill_disk, data_dir)
    mount = f"/v2/other/app/blobs/uploads/?mount={digest}&from={NAME}"

    await assert_error(await client.post(mount), 507, "UNAVAILABLE")
    filler.unlink()

    assert (await client.post(mount)).status == 201
    assert await get_blob_bytes(client, "other/app", digest) == data

"""Committing an upload onto a digest the store already holds: the verified bytes win.

A file already under a blob's name was written by something (a crash, a bug, a racing
request, an operator) and may not be the blob; a push of that digest has just been
verified, so it replaces whatever is there instead of being dropped in its favour.
"""

# Fixtures imported from tests.support.api are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from regmirror.fsck import check_store
from tests.support import s3_registry
from tests.support.api import (  # noqa: F401  (fixtures)
    blob_bytes,
    client,
    data_dir,
    get_blob_bytes,
    make_client,
    push_blob,
)
from tests.support.processes import ServerProcess, regmirror_server  # noqa: F401
from tests.support.s3 import MotoS3, moto_s3  # noqa: F401  (pytest fixture)

NAME = "lib/app"


def blob_file(data_dir, digest: str):
    algorithm, hex_ = digest.split(":")
    return data_dir / "docker/registry/v2/blobs" / algorithm / hex_[:2] / hex_ / "data"


async def test_push_replaces_a_stored_file_of_the_wrong_size(client, data_dir):
    data = blob_bytes(50_000, seed=3)
    digest = await push_blob(client, NAME, data)
    stored = blob_file(data_dir, digest)
    stored.write_bytes(data + b"appended by a racing PATCH")

    await push_blob(client, NAME, data)

    assert stored.read_bytes() == data
    assert await get_blob_bytes(client, NAME, digest) == data
    assert check_store(data_dir).ok


async def test_push_to_another_name_replaces_a_truncated_stored_file(client, data_dir):
    data = blob_bytes(50_000, seed=4)
    digest = await push_blob(client, NAME, data)
    blob_file(data_dir, digest).write_bytes(data[:1000])

    await push_blob(client, "other/app", data)

    assert await get_blob_bytes(client, "other/app", digest) == data
    assert check_store(data_dir).ok


def test_push_replaces_an_s3_object_of_the_wrong_size(
    moto_s3: MotoS3,
    regmirror_server: Callable[..., ServerProcess],
) -> None:
    bucket = moto_s3.new_bucket("verified-wins")
    mirror = regmirror_server(env=s3_registry.regmirror_env(moto_s3, bucket))
    data = os.urandom(40_000)
    hex_ = hashlib.sha256(data).hexdigest()
    key = f"{s3_registry.PREFIX}/docker/registry/v2/blobs/sha256/{hex_[:2]}/{hex_}/data"
    s3 = moto_s3.client()
    s3.put_object(Bucket=bucket, Key=key, Body=data[:-1])  # torn by some earlier writer

    s3_registry.push_blob(mirror, "ci/app", data)

    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == data

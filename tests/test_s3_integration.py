"""S3 as the shared store, proven with real processes on one moto bucket.

registry:2 (Debian's docker-registry 2.8, s3 driver) and regmirror instances share a
bucket under one ``rootdirectory``; skopeo pushes and pulls; what comes back must be
byte-identical to what went in, whichever process wrote it. Then S3 goes away (hung:
SIGSTOP; down: killed) and regmirror must keep serving what it has, refuse what it
cannot do with 503 UNAVAILABLE, and leave nothing half-written.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.support.oci_layout import (
    Image,
    build_image,
    build_index,
    write_image_layout,
    write_index_layout,
)
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    distribution_registry,
    regmirror_server,
)
from tests.support.s3 import MotoS3, moto_s3, run_moto  # noqa: F401  (pytest fixture)
from tests.support.s3_registry import (
    PREFIX,
    bucket_problems,
    error_codes,
    finish_upload,
    pull_layout,
    push_blob,
    put_manifest,
    registry2_storage,
    regmirror_env,
    request,
    start_upload,
    timed,
)
from tests.support.skopeo import ACCEPT, Skopeo, skopeo

__all__ = ["skopeo"]  # a pytest fixture

pytestmark = pytest.mark.skipif(
    shutil.which("skopeo") is None or not os.access("/usr/bin/docker-registry", os.X_OK),
    reason="needs skopeo and docker-registry (tests/run.sh installs them)",
)

Servers = Callable[..., ServerProcess]
MiB = 1024 * 1024
# Outage bounds, generous for a loaded 2-core machine. The S3 driver gives up after
# 2 attempts: refused connections fail in ~2 s, a hung S3 after 2 x 5 s read timeouts.
DOWN_BOUND = 10.0
HUNG_BOUND = 45.0  # a manifest by tag reads two links: up to 2 x ~12 s when S3 hangs
TAG_DEADLINE = 20.0


def push(skopeo: Skopeo, tmp_path: Path, image: Image, destination: str) -> None:
    layout = write_image_layout(tmp_path / f"src-{image.manifest.digest[7:19]}", image, "v1")
    skopeo.copy(f"oci:{layout.path}:v1", destination, "--preserve-digests")


def assert_pulled(skopeo: Skopeo, source: str, out: Path, image: Image) -> None:
    """skopeo pulls exactly ``image``: its manifest and every blob, byte for byte."""
    digest, blobs = pull_layout(skopeo, source, out)
    assert digest == image.manifest.digest
    assert blobs == {image.manifest.digest: image.manifest.data, **image.blobs}


def get(
    server: ServerProcess, path: str, timeout: float = 60.0
) -> tuple[int, dict[str, str], bytes]:
    return request("GET", f"{server.url}{path}", headers={"Accept": ACCEPT}, timeout=timeout)


def retagged(image: Image, note: str) -> bytes:
    """A new manifest for ``image``'s blobs (another annotation, so another digest)."""
    manifest = json.loads(image.manifest.data)
    manifest["annotations"] = {"test.note": note}
    return json.dumps(manifest, indent=2).encode()


# -- registry:2 and regmirror read each other's bucket --------------------------------


def test_image_pushed_to_registry2_pulls_through_regmirror(
    moto_s3: MotoS3,  # noqa: F811
    distribution_registry: Servers,  # noqa: F811
    regmirror_server: Servers,  # noqa: F811
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    bucket = moto_s3.new_bucket("r2-to-rm")
    registry = distribution_registry(storage=registry2_storage(moto_s3, bucket))
    image = build_image(seed=21)
    push(skopeo, tmp_path, image, f"docker://{registry.host_port}/team/app:v1")

    mirror = regmirror_server(env=regmirror_env(moto_s3, bucket))
    assert not (mirror.data_dir / "docker").exists()  # nothing local: all from S3
    assert_pulled(skopeo, f"docker://{mirror.host_port}/team/app:v1", tmp_path / "out", image)
    # The pull filled local disk from the bucket, in the same layout.
    for digest, data in image.blobs.items():
        hex_digest = digest.split(":", 1)[1]
        local = mirror.data_dir / f"docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}"
        assert (local / "data").read_bytes() == data
    status, _, body = get(mirror, "/v2/team/app/tags/list")
    assert (status, json.loads(body)) == (200, {"name": "team/app", "tags": ["v1"]})


def test_image_and_index_pushed_through_regmirror_pull_from_registry2(
    moto_s3: MotoS3,  # noqa: F811
    distribution_registry: Servers,  # noqa: F811
    regmirror_server: Servers,  # noqa: F811
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    bucket = moto_s3.new_bucket("rm-to-r2")
    mirror = regmirror_server(env=regmirror_env(moto_s3, bucket))
    image = build_image(seed=22)
    push(skopeo, tmp_path, image, f"docker://{mirror.host_port}/team/app:v1")
    multi = build_index(("linux/amd64", "linux/arm64"), seed=30)
    layout = write_index_layout(tmp_path / "multi-src", multi, "multi")
    skopeo.copy(
        f"oci:{layout.path}:multi",
        f"docker://{mirror.host_port}/team/multi:1.0",
        "--all",
        "--preserve-digests",
    )

    registry = distribution_registry(storage=registry2_storage(moto_s3, bucket))
    assert_pulled(skopeo, f"docker://{registry.host_port}/team/app:v1", tmp_path / "out", image)
    digest, blobs = pull_layout(
        skopeo, f"docker://{registry.host_port}/team/multi:1.0", tmp_path / "multi-out", "--all"
    )
    assert digest == multi.index.digest
    assert blobs == {multi.index.digest: multi.index.data, **multi.blobs}

    status, _, body = get(registry, "/v2/team/app/tags/list")
    assert (status, json.loads(body)) == (200, {"name": "team/app", "tags": ["v1"]})
    status, _, body = get(registry, "/v2/team/multi/tags/list")
    assert (status, json.loads(body)) == (200, {"name": "team/multi", "tags": ["1.0"]})
    status, _, body = get(registry, "/v2/_catalog")
    assert (status, json.loads(body)) == (200, {"repositories": ["team/app", "team/multi"]})


# -- regmirror hosts share the bucket ----------------------------------------------


def test_hosts_share_pushes_and_see_a_moved_tag_after_the_ttl(
    moto_s3: MotoS3,  # noqa: F811
    regmirror_server: Servers,  # noqa: F811
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    bucket = moto_s3.new_bucket("two-hosts")
    env = regmirror_env(moto_s3, bucket, tag_ttl="1")
    host_a, host_b = regmirror_server(env=env), regmirror_server(env=env)
    assert host_a.data_dir != host_b.data_dir
    first, second = build_image(seed=23), build_image(seed=24, layers=({"x": 1000},))

    push(skopeo, tmp_path, first, f"docker://{host_a.host_port}/team/app:live")
    assert_pulled(skopeo, f"docker://{host_b.host_port}/team/app:live", tmp_path / "b1", first)

    push(skopeo, tmp_path, second, f"docker://{host_a.host_port}/team/app:live")
    deadline = time.monotonic() + TAG_DEADLINE
    seen = first.manifest.digest
    while seen != second.manifest.digest and time.monotonic() < deadline:
        status, headers, body = get(host_b, "/v2/team/app/manifests/live")
        assert status == 200, body
        seen = headers["Docker-Content-Digest"]
        if seen != second.manifest.digest:
            assert seen == first.manifest.digest  # the old tag, never anything else
            time.sleep(0.1)
    assert seen == second.manifest.digest, f"host B still serves {seen} after {TAG_DEADLINE}s"
    assert_pulled(skopeo, f"docker://{host_b.host_port}/team/app:live", tmp_path / "b2", second)


def test_pushed_blob_is_in_s3_before_the_201(
    moto_s3: MotoS3,  # noqa: F811
    regmirror_server: Servers,  # noqa: F811
) -> None:
    bucket = moto_s3.new_bucket("durable")
    mirror = regmirror_server(
        env=regmirror_env(moto_s3, bucket, multipart_threshold="5MiB", part_size="5MiB")
    )
    client = moto_s3.client()

    def in_s3(data: bytes) -> bytes:
        hex_digest = hashlib.sha256(data).hexdigest()
        key = f"{PREFIX}/docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
        return bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())

    small = os.urandom(70_000)
    push_blob(mirror, "ci/app", small)
    assert in_s3(small) == small

    # Chunked (PATCH, then PUT with the last chunk), above the multipart threshold.
    big = os.urandom(12 * MiB + 123)
    location = start_upload(mirror, "ci/app")
    status, headers, body = request(
        "PATCH",
        location,
        big[: 7 * MiB],
        {"Content-Type": "application/octet-stream", "Content-Range": f"0-{7 * MiB - 1}"},
    )
    assert status == 202, body
    location = mirror.url + headers["Location"]
    status, _, body = finish_upload(
        location, big[7 * MiB :], f"sha256:{hashlib.sha256(big).hexdigest()}"
    )
    assert status == 201, body
    assert in_s3(big) == big
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_head_answers_from_s3_without_copying_the_blob_here(
    moto_s3: MotoS3,  # noqa: F811
    regmirror_server: Servers,  # noqa: F811
) -> None:
    """docker push HEADs every layer first: a host must not fill them all from S3."""
    bucket = moto_s3.new_bucket("head")
    pusher = regmirror_server(env=regmirror_env(moto_s3, bucket))
    other = regmirror_server(env=regmirror_env(moto_s3, bucket))
    data = os.urandom(2 * MiB + 7)
    push_blob(pusher, "ci/app", data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    status, headers, body = request("HEAD", f"{other.url}/v2/ci/app/blobs/{digest}")
    assert (status, body) == (200, b"")
    assert headers["Content-Length"] == str(len(data))
    assert not (other.data_dir / "docker/registry/v2/blobs").exists()
    status, _, body = get(other, f"/v2/ci/app/blobs/{digest}")
    assert (status, body) == (200, data)


# -- S3 outages ----------------------------------------------------------------------


def outage_hosts(
    regmirror_server: Servers,  # noqa: F811
    moto: MotoS3,
    bucket: str,
    skopeo: Skopeo,
    tmp_path: Path,
) -> tuple[ServerProcess, ServerProcess, Image, Image]:
    """Host A pushed images P and Q (acknowledged); host B pulled P, never Q.

    B runs with ``tag_ttl: 0``, so every request of B asks S3 about its links first:
    during the outage everything B serves comes from its stale local copies."""
    pusher = regmirror_server(env=regmirror_env(moto, bucket, tag_ttl="30"))
    puller = regmirror_server(env=regmirror_env(moto, bucket, tag_ttl="0"))
    pulled, unpulled = build_image(seed=25), build_image(seed=26, layers=({"y": 5000},))
    push(skopeo, tmp_path, pulled, f"docker://{pusher.host_port}/team/app:p")
    push(skopeo, tmp_path, unpulled, f"docker://{pusher.host_port}/team/app:q")
    assert_pulled(skopeo, f"docker://{puller.host_port}/team/app:p", tmp_path / "b", pulled)
    return pusher, puller, pulled, unpulled


def during_outage(
    pusher: ServerProcess, puller: ServerProcess, pulled: Image, unpulled: Image, new_blob: bytes
) -> dict[str, tuple[tuple[int, dict[str, str], bytes], float]]:
    """Every request of the outage at once (each may wait out S3's timeouts): status,
    headers, body and seconds, by name."""
    calls: dict[str, Callable[[], tuple[int, dict[str, str], bytes]]] = {
        "manifest by tag": lambda: get(puller, "/v2/team/app/manifests/p"),
        "manifest by digest": lambda: get(
            puller, f"/v2/team/app/manifests/{pulled.manifest.digest}"
        ),
        "uncached manifest": lambda: get(puller, "/v2/team/app/manifests/q"),
        "uncached blob": lambda: get(puller, f"/v2/team/app/blobs/{unpulled.layers[0].digest}"),
        "blob upload": lambda: finish_upload(start_upload(pusher, "team/app"), new_blob),
        "manifest put": lambda: put_manifest(pusher, "team/app", "r", retagged(pulled, "r")),
    }
    for digest in pulled.blobs:
        calls[f"cached blob {digest[7:19]}"] = functools.partial(
            get, puller, f"/v2/team/app/blobs/{digest}"
        )
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = {name: pool.submit(timed, call) for name, call in calls.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_outage_answers(results: dict[str, Any], pulled: Image, bound: float) -> None:
    for name, ((status, headers, body), seconds) in results.items():
        print(f"during the outage: {name}: {status} in {seconds:.1f}s")
        assert seconds < bound, f"{name}: took {seconds:.1f}s"
        if name.startswith("manifest by"):
            assert (status, body) == (200, pulled.manifest.data), (name, status, body[:300])
        elif name.startswith("cached blob "):
            assert status == 200, (name, status, body[:300])
            assert pulled.blobs[headers["Docker-Content-Digest"]] == body
        else:
            assert status == 503, (name, status, body[:300])
            assert error_codes(body) == ["UNAVAILABLE"], (name, body[:300])


def test_hung_s3_serves_what_was_pulled_refuses_the_rest_and_loses_nothing(
    moto_s3: MotoS3,  # noqa: F811
    regmirror_server: Servers,  # noqa: F811
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    """pause/resume: moto accepts connections but never answers, and keeps its data."""
    bucket = moto_s3.new_bucket("hung")
    pusher, puller, pulled, unpulled = outage_hosts(
        regmirror_server, moto_s3, bucket, skopeo, tmp_path
    )
    new_blob = os.urandom(50_000)

    moto_s3.pause()
    try:
        results = during_outage(pusher, puller, pulled, unpulled, new_blob)
    finally:
        moto_s3.resume()
    assert_outage_answers(results, pulled, HUNG_BOUND)

    assert bucket_problems(moto_s3, bucket) == []
    marker = "/_manifests/tags/"
    tags = {k.split(marker)[1].split("/")[0] for k in moto_s3.keys(bucket) if marker in k}
    assert tags == {"p", "q"}  # the manifest PUT of the outage moved no tag

    # Everything acknowledged before the outage is there, for a host that never saw it.
    fresh = regmirror_server(env=regmirror_env(moto_s3, bucket))
    assert_pulled(skopeo, f"docker://{fresh.host_port}/team/app:p", tmp_path / "c1", pulled)
    assert_pulled(skopeo, f"docker://{fresh.host_port}/team/app:q", tmp_path / "c2", unpulled)

    # And pushes work again: the same requests now succeed.
    push_blob(pusher, "team/app", new_blob)
    raw = retagged(pulled, "r")
    status, _, body = put_manifest(pusher, "team/app", "r", raw)
    assert status == 201, body
    status, _, body = get(fresh, "/v2/team/app/manifests/r")
    assert (status, body) == (200, raw)


def test_down_s3_answers_within_seconds_and_pushes_resume_after(
    tmp_path: Path,
    regmirror_server: Servers,  # noqa: F811
    skopeo: Skopeo,
) -> None:
    """stop/start: connections are refused at once; moto comes back empty (its own
    server here, so no other test's bucket is lost)."""
    (tmp_path / "moto").mkdir()
    with run_moto(tmp_path / "moto") as moto:
        pusher, puller, pulled, unpulled = outage_hosts(
            regmirror_server, moto, moto.bucket, skopeo, tmp_path
        )
        new_blob = os.urandom(50_000)
        moto.stop()
        try:
            results = during_outage(pusher, puller, pulled, unpulled, new_blob)
            status, _, body = get(puller, "/readyz")
        finally:
            moto.start()
        assert_outage_answers(results, pulled, DOWN_BOUND)
        assert status == 503, body
        _, _, metrics = get(pusher, "/metrics")
        failed = [
            line
            for line in metrics.decode().splitlines()
            if line.startswith("regmirror_s3_errors_total{") and float(line.split()[-1]) > 0
        ]
        # The blob upload failed asking S3 whether it had the blob; the manifest PUT storing it.
        assert {line.split('"')[1] for line in failed} >= {"stat", "put"}, failed
        tiers = json.loads(body)["tiers"]
        assert tiers["local"] == "ok" and tiers["s3"] != "ok", tiers
        status, _, body = get(puller, "/readyz")
        assert (status, json.loads(body)["tiers"]) == (200, {"local": "ok", "s3": "ok"})

        # The bucket came back empty; a push through A works again and B pulls it.
        again = build_image(seed=27, layers=({"z": 3000},))
        push(skopeo, tmp_path, again, f"docker://{pusher.host_port}/team/again:v1")
        assert_pulled(skopeo, f"docker://{puller.host_port}/team/again:v1", tmp_path / "b2", again)
        assert bucket_problems(moto, moto.bucket) == []

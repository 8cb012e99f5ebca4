"""Content never leaks across names, and a hung S3 does not slow what local disk holds
(issue 7, findings 2 and 7).

- Every read checks the repository link: pushed links of that name, or pull-through
  links for digests the upstream confirmed for that name. A manifest pushed to one
  repository (and the layers it names) is not readable by digest through another name
  routed to an upstream, even though S3 holds the bytes.
- A manifest is never read whole before its size is known to be under the 4 MiB cap:
  a 96 MiB blob asked for as a manifest is refused without the server's memory growing.
- With S3 hung (moto SIGSTOPped), pull-through blobs and manifests already on local
  disk are served at local-disk speed: every S3 read on the request path has a short
  deadline and goes through one outage circuit.

Real processes: regmirror, moto_server, and the tests' own fake upstream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from regmirror import layout
from regmirror.digest import Digest
from tests.support.fake_upstream import fake_upstream
from tests.support.oci_layout import build_image
from tests.support.processes import ServerProcess, regmirror_server
from tests.support.pullthrough import error_code, eventually, push_image_to, upstream_env
from tests.support.s3 import MotoS3, moto_s3
from tests.support.s3_registry import PREFIX, regmirror_env
from tests.support.skopeo import ACCEPT

__all__ = ["moto_s3", "regmirror_server"]

Start = Callable[..., ServerProcess]
MiB = 1024 * 1024
HUGE = 96 * MiB
# Peak RSS may grow by this much serving the refusals below; reading the huge blob
# into memory even once grows it by HUGE.
MEMORY_SLACK = 32 * MiB
FAST = 2.0  # seconds: what "local-disk speed" must beat on a loaded machine


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=90), auto_decompress=False
    ) as session:
        yield session


def peak_rss(server: ServerProcess) -> int:
    """The serving processes' peak resident set sizes so far (VmHWM), in bytes, summed:
    whichever worker served a request, its growth shows."""
    total = 0
    for pid in server.serving_pids():
        status = Path(f"/proc/{pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
        total += int(line.split()[1]) * 1024
    return total


async def status_of(http: aiohttp.ClientSession, method: str, url: str) -> tuple[int, str | None]:
    async with http.request(method, url, headers={"Accept": ACCEPT}) as response:
        code = await error_code(response) if response.status >= 400 and method != "HEAD" else None
        return response.status, code


# -- finding 2: no reads across names ------------------------------------------------------


@pytest.mark.parametrize("write_back", ["false", "true"])
async def test_a_pushed_manifest_and_its_layers_are_not_readable_through_an_upstream_name(
    write_back: str, regmirror_server: Start, moto_s3: MotoS3, http: aiohttp.ClientSession
) -> None:
    async with fake_upstream() as fake:  # a default upstream that knows none of it
        bucket = moto_s3.new_bucket("names")
        s3 = regmirror_env(moto_s3, bucket, write_back=write_back)
        server = regmirror_server(env={**s3, **upstream_env(fake.url)})
        image = build_image(seed=701, layers=({"a": 1000}, {"b": 20_000}))
        await push_image_to(http, server.url, "private/app", image, "v1")
        digest = image.manifest.digest
        assert await status_of(http, "GET", f"{server.url}/v2/private/app/manifests/{digest}") == (
            200,
            None,
        )

        for method in ("GET", "HEAD"):
            status, code = await status_of(
                http, method, f"{server.url}/v2/other/app/manifests/{digest}"
            )
            assert status == 404 and code in (None, "MANIFEST_UNKNOWN"), (method, status, code)
        for blob in (image.config, *image.layers):
            for method in ("GET", "HEAD"):
                url = f"{server.url}/v2/other/app/blobs/{blob.digest}"
                status, code = await status_of(http, method, url)
                assert status == 404 and code in (None, "BLOB_UNKNOWN"), (method, status, code)
        # The pushed name itself still has everything.
        for blob in (image.config, *image.layers):
            async with http.get(f"{server.url}/v2/private/app/blobs/{blob.digest}") as response:
                assert (response.status, await response.read()) == (200, blob.data)


async def test_a_huge_blob_asked_for_as_a_manifest_is_refused_without_reading_it(
    regmirror_server: Start, moto_s3: MotoS3, http: aiohttp.ClientSession
) -> None:
    """The blob is in S3 (as registry:2 or another host stored it), linked as a manifest
    revision of ``big/app``, and asked for as a manifest through ``big/app`` and through
    an upstream-routed name: each answer is an error, and peak memory does not grow by
    the blob's size."""
    bucket = moto_s3.new_bucket("huge")
    data = bytes(HUGE - 1) + b"\1"
    digest = Digest.of(data)
    s3 = moto_s3.client()
    await asyncio.to_thread(
        s3.put_object, Bucket=bucket, Key=f"{PREFIX}/{layout.blob_data(digest)}", Body=data
    )
    del data
    link = f"{PREFIX}/{layout.revision_link('big/app', digest)}"
    await asyncio.to_thread(s3.put_object, Bucket=bucket, Key=link, Body=str(digest).encode())
    async with fake_upstream() as fake:
        server = regmirror_server(env={**regmirror_env(moto_s3, bucket), **upstream_env(fake.url)})
        await status_of(http, "GET", f"{server.url}/v2/warm/up/manifests/v1")  # imports done
        before = peak_rss(server)

        elsewhere = await status_of(http, "GET", f"{server.url}/v2/other/app/manifests/{digest}")
        linked = await status_of(http, "GET", f"{server.url}/v2/big/app/manifests/{digest}")

        grown = peak_rss(server) - before
        print(f"peak RSS grew by {grown / MiB:.1f} MiB; refusals {elsewhere}, {linked}")
        assert grown < MEMORY_SLACK, f"peak RSS grew by {grown / MiB:.0f} MiB"
        assert elsewhere == (404, "MANIFEST_UNKNOWN")  # never confirmed for that name
        assert linked[0] in (404, 413)  # linked there, but not a manifest we would serve


# -- finding 7: a hung S3 ------------------------------------------------------------------


async def test_with_s3_hung_cached_pull_through_content_is_served_at_local_speed(
    regmirror_server: Start, moto_s3: MotoS3, http: aiohttp.ClientSession
) -> None:
    async with fake_upstream() as fake:
        image = build_image(seed=702, layers=({"c": 3000}, {"d": 300_000}))
        fake.add_image("lib/app", image, "v1")
        bucket = moto_s3.new_bucket("hung")
        server = regmirror_server(env={**regmirror_env(moto_s3, bucket), **upstream_env(fake.url)})
        base = f"{server.url}/v2/lib/app"
        async with http.get(f"{base}/manifests/v1", headers={"Accept": ACCEPT}) as response:
            assert (response.status, await response.read()) == (200, image.manifest.data)
        for blob in (image.config, *image.layers):
            async with http.get(f"{base}/blobs/{blob.digest}") as response:
                assert (response.status, await response.read()) == (200, blob.data)

        async def all_local() -> bool:
            files = [server.data_dir / layout.blob_data(Digest.parse(d)) for d in image.blobs]
            return all(f.exists() for f in files)

        await eventually(all_local)

        moto_s3.pause()
        try:
            timings = {}
            for blob in (image.config, *image.layers):
                started = time.monotonic()
                async with http.get(f"{base}/blobs/{blob.digest}") as response:
                    assert (response.status, await response.read()) == (200, blob.data)
                timings[f"blob {blob.digest[7:19]}"] = time.monotonic() - started
            for reference in (image.manifest.digest, "v1"):
                started = time.monotonic()
                async with http.get(
                    f"{base}/manifests/{reference}", headers={"Accept": ACCEPT}
                ) as response:
                    assert (response.status, await response.read()) == (200, image.manifest.data)
                timings[f"manifest {reference[:19]}"] = time.monotonic() - started
        finally:
            moto_s3.resume()
        print(timings)
        slow = {what: seconds for what, seconds in timings.items() if seconds >= FAST}
        assert not slow, f"slower than {FAST}s with S3 hung: {slow}"


async def test_with_s3_hung_a_mount_falls_back_to_an_upload_session_at_once(
    regmirror_server: Start, moto_s3: MotoS3, http: aiohttp.ClientSession
) -> None:
    """A cross-repository mount S3 cannot confirm now is not a 503: the registry opens
    an ordinary upload session (202), as the spec allows, and the client uploads."""
    bucket = moto_s3.new_bucket("mount")
    server = regmirror_server(env=regmirror_env(moto_s3, bucket))
    image = build_image(seed=703, layers=({"e": 100},))
    await push_image_to(http, server.url, "src/app", image, "v1")
    digest = image.layers[0].digest
    moto_s3.pause()
    try:
        started = time.monotonic()
        url = f"{server.url}/v2/dst/app/blobs/uploads/?mount={digest}&from=src/app"
        async with http.post(url) as response:
            assert response.status == 202, await response.text()
            assert "Location" in response.headers
        assert time.monotonic() - started < FAST * 2
    finally:
        moto_s3.resume()

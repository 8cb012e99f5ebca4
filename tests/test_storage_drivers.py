"""One conformance suite every storage driver passes (local disk, S3 on a real moto
server), then what only the S3 driver promises: its key prefix, path-style addressing,
bounded failure when S3 is down or hung, and signing through a skewed host clock."""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import hashlib
import http.client
import http.server
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.auth
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from regmirror import layout
from regmirror.config import S3Settings
from regmirror.digest import Digest
from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable
from regmirror.storage.filesystem import FilesystemDriver
from regmirror.storage.s3 import Clock, S3Driver
from tests.support.processes import HOST, free_port
from tests.support.s3 import REGION, MotoS3, moto_s3  # noqa: F401  (pytest fixture)

MiB = 1024 * 1024
PART = 5 * MiB  # S3's smallest part
THRESHOLD = 8 * MiB


def s3_settings(moto: MotoS3, bucket: str, **overrides: Any) -> S3Settings:
    values: dict[str, Any] = {
        "bucket": bucket,
        "prefix": "mirror",
        "region": REGION,
        "endpoint_url": moto.endpoint_url,
        "path_style": True,
        "multipart_threshold": THRESHOLD,
        "part_size": PART,
    }
    values.update(overrides)
    return S3Settings(**values)


@pytest.fixture(params=["filesystem", "s3"])
async def driver(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    moto_s3: MotoS3,  # noqa: F811
) -> AsyncIterator[Driver]:
    if request.param == "filesystem":
        yield FilesystemDriver(tmp_path / "root")
        return
    s3 = await S3Driver.create(s3_settings(moto_s3, moto_s3.new_bucket()))
    try:
        yield s3
    finally:
        await s3.close()


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ at every offset (a shifted read cannot match)."""
    block = hashlib.sha256(str(seed).encode()).digest()
    pattern = bytes((block[i % 32] + i) % 256 for i in range(251 * 32))
    return (pattern * (size // len(pattern) + 1))[:size]


async def read_all(driver: Driver, key: str, offset: int = 0) -> list[bytes]:
    return [chunk async for chunk in driver.reader(key, offset)]


# --- conformance: every driver --------------------------------------------------------


async def test_put_then_get_returns_the_bytes(driver: Driver) -> None:
    await driver.put("a/b/c", b"hello")
    assert await driver.get("a/b/c") == b"hello"


async def test_put_overwrites(driver: Driver) -> None:
    await driver.put("k", b"first, longer")
    await driver.put("k", b"second")
    assert await driver.get("k") == b"second"
    assert await driver.stat("k") == 6


async def test_put_of_empty_content(driver: Driver) -> None:
    await driver.put("empty", b"")
    assert await driver.get("empty") == b""
    assert await driver.stat("empty") == 0


async def test_get_missing_is_path_not_found(driver: Driver) -> None:
    await driver.put("dir/present", b"x")
    for key in ("absent", "dir/absent", "dir"):
        with pytest.raises(PathNotFound):
            await driver.get(key)


async def test_stat_is_the_size(driver: Driver) -> None:
    await driver.put("dir/blob", payload(12345))
    assert await driver.stat("dir/blob") == 12345


async def test_stat_missing_or_directory_is_path_not_found(driver: Driver) -> None:
    await driver.put("dir/blob", b"x")
    for key in ("absent", "dir"):
        with pytest.raises(PathNotFound):
            await driver.stat(key)


async def test_list_names_directories_and_files_sorted(driver: Driver) -> None:
    for key in ("r/z", "r/a/1", "r/a/2/deep", "r/m", "r/b/x", "rr/not-a-child", "r0"):
        await driver.put(key, b"x")
    assert await driver.list("r") == ["a", "b", "m", "z"]
    assert await driver.list("r/a") == ["1", "2"]
    assert await driver.list("r/a/2") == ["deep"]


async def test_list_missing_is_path_not_found(driver: Driver) -> None:
    await driver.put("r/file", b"x")
    for key in ("absent", "r/absent", "r/file"):
        with pytest.raises(PathNotFound):
            await driver.list(key)


async def test_delete_removes_the_key_and_everything_below(driver: Driver) -> None:
    for key in ("t/gone/x", "t/gone/y/z", "t/gone-sibling", "t/kept"):
        await driver.put(key, b"x")
    await driver.delete("t/gone")
    assert await driver.list("t") == ["gone-sibling", "kept"]
    with pytest.raises(PathNotFound):
        await driver.get("t/gone/y/z")


async def test_delete_of_a_file_keeps_its_siblings(driver: Driver) -> None:
    for key in ("t/a", "t/ab", "t/a-b"):
        await driver.put(key, b"x")
    await driver.delete("t/a")
    assert await driver.list("t") == ["a-b", "ab"]


async def test_delete_missing_is_not_an_error(driver: Driver) -> None:
    await driver.delete("never/was")


async def test_delete_of_many_objects(driver: Driver) -> None:
    await asyncio.gather(*(driver.put(f"many/{i:04d}", b"x") for i in range(1001)))
    await driver.delete("many")
    with pytest.raises(PathNotFound):
        await driver.list("many")


async def test_reader_from_the_start(driver: Driver) -> None:
    await driver.put("blob", b"0123456789")
    assert b"".join(await read_all(driver, "blob")) == b"0123456789"


async def test_reader_from_an_offset(driver: Driver) -> None:
    await driver.put("blob", b"0123456789")
    assert b"".join(await read_all(driver, "blob", 7)) == b"789"
    assert await read_all(driver, "blob", 10) == []


async def test_reader_missing_is_path_not_found(driver: Driver) -> None:
    with pytest.raises(PathNotFound):
        await read_all(driver, "absent")


async def test_reader_streams_a_large_object_in_bounded_chunks(driver: Driver) -> None:
    data = payload(5 * MiB + 123)
    await driver.put("big", data)
    chunks = await read_all(driver, "big", 1000)
    assert len(chunks) >= 5
    assert max(len(c) for c in chunks) <= MiB
    assert b"".join(chunks) == data[1000:]


async def test_reader_closed_early_releases_the_stream(driver: Driver) -> None:
    await driver.put("big", payload(3 * MiB))
    stream = driver.reader("big")
    first = await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert first == payload(3 * MiB)[: len(first)]
    assert await driver.get("big") == payload(3 * MiB)  # the driver is still usable


async def test_put_file_small(driver: Driver, tmp_path: Path) -> None:
    source = tmp_path / "small"
    source.write_bytes(payload(1000))
    await driver.put_file("files/small", source)
    assert await driver.get("files/small") == payload(1000)


async def test_put_file_above_the_multipart_threshold(driver: Driver, tmp_path: Path) -> None:
    data = payload(12 * MiB + 7, seed=1)  # three parts: 5 + 5 + 2 MiB
    source = tmp_path / "large"
    source.write_bytes(data)
    await driver.put_file("files/large", source)
    assert await driver.stat("files/large") == len(data)
    read = b"".join(await read_all(driver, "files/large"))
    assert hashlib.sha256(read).digest() == hashlib.sha256(data).digest()


async def test_registry_layout_keys(driver: Driver) -> None:
    blob = b'{"architecture":"amd64"}'
    digest = Digest("sha256", hashlib.sha256(blob).hexdigest())
    link = f"{digest.algorithm}:{digest.hex}".encode()
    await driver.put(layout.blob_data(digest), blob)
    await driver.put(layout.layer_link("library/alpine", digest), link)
    await driver.put(layout.revision_link("library/alpine", digest), link)
    await driver.put(layout.tag_current_link("library/alpine", "3.20"), link)
    await driver.put(layout.tag_index_link("library/alpine", "3.20", digest), link)

    assert await driver.get(layout.blob_data(digest)) == blob
    assert await driver.list(f"{layout.ROOT}/blobs/sha256") == [digest.hex[:2]]
    assert await driver.list(layout.REPOSITORIES) == ["library"]
    assert await driver.list(layout.repository("library/alpine")) == ["_layers", "_manifests"]
    assert await driver.list(layout.tags("library/alpine")) == ["3.20"]
    assert await driver.get(layout.tag_current_link("library/alpine", "3.20")) == link


# --- S3 only ----------------------------------------------------------------------------


@pytest.fixture
async def s3_bucket(moto_s3: MotoS3) -> str:  # noqa: F811
    return moto_s3.new_bucket()


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("mirror", "mirror/"), ("/deep/mirror/", "deep/mirror/"), ("", "")],
)
async def test_s3_keys_are_the_prefix_then_the_layout(
    moto_s3: MotoS3,  # noqa: F811
    s3_bucket: str,
    prefix: str,
    expected: str,
) -> None:
    digest = Digest("sha256", hashlib.sha256(b"x").hexdigest())
    driver = S3Driver(s3_settings(moto_s3, s3_bucket, prefix=prefix))
    try:
        await driver.put(layout.blob_data(digest), b"x")
        await driver.put(layout.tag_current_link("a/b", "v1"), b"sha256:...")
    finally:
        await driver.close()
    assert moto_s3.keys(s3_bucket) == [
        expected + layout.blob_data(digest),
        expected + layout.tag_current_link("a/b", "v1"),
    ]


async def test_s3_multipart_upload_is_used_above_the_threshold(
    moto_s3: MotoS3,  # noqa: F811
    s3_bucket: str,
    tmp_path: Path,
) -> None:
    source = tmp_path / "large"
    source.write_bytes(payload(12 * MiB))
    driver = S3Driver(s3_settings(moto_s3, s3_bucket))
    try:
        await driver.put_file("large", source)
    finally:
        await driver.close()
    head = moto_s3.client().head_object(Bucket=s3_bucket, Key="mirror/large")
    assert head["ETag"].strip('"').endswith("-3")  # a multipart ETag: md5-of-md5s "-" parts
    assert moto_s3.client().list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []


async def test_s3_path_style_addresses_the_bucket_in_the_path(
    moto_s3: MotoS3,  # noqa: F811
    s3_bucket: str,
) -> None:
    driver = S3Driver(s3_settings(moto_s3, s3_bucket, path_style=True))
    urls: list[str] = []
    # The driver's client is private; its event hooks are the only way to see the URL.
    driver._client.meta.events.register(
        "before-send.s3", lambda request, **_: urls.append(request.url)
    )
    try:
        await driver.put("k", b"v")
        assert await driver.get("k") == b"v"
    finally:
        await driver.close()
    assert urls and all(u.startswith(f"{moto_s3.endpoint_url}/{s3_bucket}/mirror/k") for u in urls)


async def test_s3_missing_bucket_is_unavailable_not_missing(moto_s3: MotoS3) -> None:  # noqa: F811
    driver = S3Driver(s3_settings(moto_s3, "no-such-bucket-here"))
    try:
        with pytest.raises(StorageUnavailable, match="NoSuchBucket"):
            await driver.get("k")
        with pytest.raises(StorageUnavailable, match="NoSuchBucket"):
            await driver.list("k")
        with pytest.raises(StorageUnavailable):
            await driver.check()
    finally:
        await driver.close()


async def test_s3_check_passes_when_the_bucket_answers(moto_s3: MotoS3, s3_bucket: str) -> None:  # noqa: F811
    driver = S3Driver(s3_settings(moto_s3, s3_bucket))
    try:
        await driver.check()
    finally:
        await driver.close()


async def test_s3_unreachable_endpoint_fails_fast(moto_s3: MotoS3) -> None:  # noqa: F811
    # Nothing listens on the port: every attempt is refused, default timeouts and retries.
    driver = S3Driver(s3_settings(moto_s3, "b", endpoint_url=f"http://{HOST}:{free_port()}"))
    try:
        for call in (
            driver.get("k"),
            driver.put("k", b"v"),
            driver.list("k"),
            read_all(driver, "k"),
        ):
            started = time.monotonic()
            with pytest.raises(StorageUnavailable) as caught:
                await call
            assert time.monotonic() - started < 15
            assert caught.value.__cause__ is not None
    finally:
        await driver.close()


async def test_s3_stopped_server_fails_fast_then_recovers(
    moto_s3: MotoS3,  # noqa: F811
    tmp_path: Path,
) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"v")
    driver = S3Driver(s3_settings(moto_s3, moto_s3.bucket))
    try:
        await driver.put("before", b"v")
        moto_s3.stop()
        try:
            started = time.monotonic()
            with pytest.raises(StorageUnavailable):
                await driver.get("before")
            with pytest.raises(StorageUnavailable):
                await driver.put_file("k", source)
            assert time.monotonic() - started < 15
        finally:
            moto_s3.start()  # empty again but for the bucket
        await driver.put("after", b"v")
        assert await driver.get("after") == b"v"
    finally:
        await driver.close()


async def test_s3_hung_server_fails_within_the_read_timeout(
    moto_s3: MotoS3,  # noqa: F811
    s3_bucket: str,
) -> None:
    driver = S3Driver(s3_settings(moto_s3, s3_bucket), read_timeout=1.0, max_attempts=2)
    try:
        await driver.put("k", b"v")
        moto_s3.pause()  # connections are accepted by the kernel, never answered
        try:
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match="timeout"):
                await driver.get("k")
            assert time.monotonic() - started < 8  # 2 x 1 s read timeout + backoff
        finally:
            moto_s3.resume()
        assert await driver.get("k") == b"v"
    finally:
        await driver.close()


# --- S3: a proxy playing the parts of S3 that moto does not ------------------------------
# moto does not check request times, so the proxy rejects requests stamped more than
# 15 minutes from its (true) clock as S3 does: a RequestTimeTooSkewed error body with
# ServerTime, or a bodiless 403 for HEAD. It can also cut GET bodies short.

SKEW = datetime.timedelta(minutes=20)
MAX_SKEW = datetime.timedelta(minutes=15)


class S3Proxy(http.server.ThreadingHTTPServer):
    def __init__(self, upstream_port: int):
        super().__init__((HOST, 0), S3ProxyHandler)
        self.upstream_port = upstream_port
        self.rejected = 0
        self.truncate_gets = 0  # how many coming GET bodies to cut off half-way
        self.gets: list[dict[str, str]] = []  # Range and If-Match of every GET

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}"


class S3ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: S3Proxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _handle(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        stamp = datetime.datetime.strptime(self.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ")
        if abs(stamp - now) > MAX_SKEW:
            self._reject_skewed(now)
            return
        if self.command == "GET" and "?" not in self.path:
            self.server.gets.append(
                {k: self.headers[k] for k in ("Range", "If-Match") if k in self.headers}
            )
        upstream = http.client.HTTPConnection(HOST, self.server.upstream_port, timeout=10)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() != "content-length"}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in ("transfer-encoding", "connection", "date", "server"):
                    self.send_header(name, value)
            self.send_header("Date", email.utils.formatdate(usegmt=True))
            if response.getheader("Content-Length") is None:
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if self.command == "GET" and self.server.truncate_gets and len(data) > 1:
                self.server.truncate_gets -= 1
                data = data[: len(data) // 2]
                self.close_connection = True  # the client sees the body end early
            self.wfile.write(data)
        finally:
            upstream.close()

    def _reject_skewed(self, now: datetime.datetime) -> None:
        self.server.rejected += 1
        error = (
            "<?xml version='1.0' encoding='UTF-8'?><Error><Code>RequestTimeTooSkewed</Code>"
            "<Message>The difference between the request time and the current time is too"
            f" large.</Message><RequestTime>{self.headers['X-Amz-Date']}</RequestTime>"
            f"<ServerTime>{now.isoformat(timespec='seconds')}Z</ServerTime>"
            "<MaxAllowedSkewMilliseconds>900000</MaxAllowedSkewMilliseconds></Error>"
        ).encode()
        if self.command == "HEAD":
            error = b""
        self.send_response(403)
        self.send_header("Date", email.utils.formatdate(usegmt=True))
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(error)))
        self.end_headers()
        self.wfile.write(error)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


@pytest.fixture
def s3_proxy(moto_s3: MotoS3) -> Iterator[S3Proxy]:  # noqa: F811
    proxy = S3Proxy(moto_s3.port)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=5)


async def test_s3_reader_resumes_a_broken_stream_from_where_it_stopped(
    moto_s3: MotoS3,  # noqa: F811
    s3_bucket: str,
    s3_proxy: S3Proxy,
) -> None:
    data = payload(3 * MiB + 11)
    driver = S3Driver(s3_settings(moto_s3, s3_bucket, endpoint_url=s3_proxy.url))
    try:
        await driver.put("blob", data)
        s3_proxy.truncate_gets = 1
        chunks = await read_all(driver, "blob", 100)
    finally:
        await driver.close()
    assert b"".join(chunks) == data[100:]
    assert max(len(c) for c in chunks) <= MiB
    first, resumed = s3_proxy.gets
    assert first == {"Range": "bytes=100-"}
    start = int(resumed["Range"].removeprefix("bytes=").rstrip("-"))
    assert 100 < start < len(data)  # from where the broken body stopped, not the start
    assert resumed["If-Match"]  # pinned to the object first read


async def test_s3_reader_gives_up_on_a_stream_that_keeps_breaking(
    moto_s3: MotoS3,  # noqa: F811
    s3_bucket: str,
    s3_proxy: S3Proxy,
) -> None:
    driver = S3Driver(s3_settings(moto_s3, s3_bucket, endpoint_url=s3_proxy.url))
    try:
        await driver.put("blob", payload(3 * MiB))
        s3_proxy.truncate_gets = 100
        with pytest.raises(StorageUnavailable):
            await read_all(driver, "blob")
    finally:
        await driver.close()
    assert len(s3_proxy.gets) == 3  # the first GET and two resumptions


@pytest.fixture
def slow_host_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host's clock, as botocore's signer reads it, 20 minutes behind."""
    real = botocore.auth.get_current_datetime

    def behind(remove_tzinfo: bool = True) -> datetime.datetime:
        return real(remove_tzinfo) - SKEW

    monkeypatch.setattr(botocore.auth, "get_current_datetime", behind)


def skewed_driver(
    moto: MotoS3,
    bucket: str,
    proxy: S3Proxy,
    seen: list[float],
) -> S3Driver:
    settings = s3_settings(moto, bucket, endpoint_url=proxy.url, multipart_threshold=PART)
    return S3Driver(settings, on_clock_skew=seen.append)


@pytest.mark.usefixtures("slow_host_clock")
async def test_s3_without_correction_a_skewed_clock_is_rejected(
    moto_s3: MotoS3,  # noqa: F811
    s3_bucket: str,
    s3_proxy: S3Proxy,
) -> None:
    plain = boto3.client(  # botocore alone: no correction
        "s3",
        endpoint_url=s3_proxy.url,
        region_name=REGION,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
    )
    with pytest.raises(ClientError, match="RequestTimeTooSkewed"):
        plain.get_object(Bucket=s3_bucket, Key="k")
    assert s3_proxy.rejected == 1


@pytest.mark.usefixtures("slow_host_clock")
async def test_s3_corrects_a_skewed_clock_once_and_keeps_working(
    moto_s3: MotoS3,  # noqa: F811
    s3_bucket: str,
    s3_proxy: S3Proxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[float] = []
    source = tmp_path / "large"
    source.write_bytes(payload(6 * MiB))  # multipart: two parts
    driver = skewed_driver(moto_s3, s3_bucket, s3_proxy, seen)
    caplog.set_level(logging.WARNING, logger="regmirror.storage.s3")
    try:
        await driver.put("k", b"v")
        assert await driver.get("k") == b"v"
        assert await driver.stat("k") == 1
        await driver.put("sub/x", b"v")
        assert await driver.list("sub") == ["x"]
        await driver.put_file("large", source)
        assert b"".join(await read_all(driver, "large", 5)) == payload(6 * MiB)[5:]
        await driver.delete("k")
    finally:
        await driver.close()
    assert s3_proxy.rejected == 1  # the first request only; every later one was corrected
    assert len(seen) == 1 and abs(seen[0] - SKEW.total_seconds()) < 5
    warnings = [r for r in caplog.records if "clock" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.usefixtures("slow_host_clock")
async def test_s3_corrects_skew_from_a_bodiless_head_rejection(
    moto_s3: MotoS3,  # noqa: F811
    s3_bucket: str,
    s3_proxy: S3Proxy,
) -> None:
    moto_s3.client().put_object(Bucket=s3_bucket, Key="mirror/k", Body=b"abc")
    seen: list[float] = []
    driver = skewed_driver(moto_s3, s3_bucket, s3_proxy, seen)
    try:
        assert await driver.stat("k") == 3  # HEAD: only the Date header tells the skew
    finally:
        await driver.close()
    assert s3_proxy.rejected == 1
    assert len(seen) == 1 and abs(seen[0] - SKEW.total_seconds()) < 5


@pytest.mark.usefixtures("slow_host_clock")
async def test_s3_concurrent_requests_correct_the_clock_once(
    moto_s3: MotoS3,  # noqa: F811
    s3_bucket: str,
    s3_proxy: S3Proxy,
) -> None:
    seen: list[float] = []
    driver = skewed_driver(moto_s3, s3_bucket, s3_proxy, seen)
    try:
        await asyncio.gather(*(driver.put(f"k{i}", b"v") for i in range(8)))
    finally:
        await driver.close()
    assert len(seen) == 1
    assert sorted(moto_s3.keys(s3_bucket)) == sorted(f"mirror/k{i}" for i in range(8))


def test_s3_access_denied_is_not_mistaken_for_skew() -> None:
    # A 403 with a Date close to ours is a real denial: no correction, no retry.
    seen: list[float] = []
    clock = Clock(seen.append)
    now = email.utils.formatdate(usegmt=True)
    error = ClientError(
        {
            "Error": {"Code": "403", "Message": "Forbidden"},
            "ResponseMetadata": {"HTTPStatusCode": 403, "HTTPHeaders": {"date": now}},
        },
        "HeadObject",
    )
    assert clock.correct(error) is False
    assert seen == []


def test_environment_is_dummy_aws(moto_s3: MotoS3) -> None:  # noqa: F811
    assert os.environ["AWS_ACCESS_KEY_ID"] == "testing"
    assert "AWS_CA_BUNDLE" not in os.environ

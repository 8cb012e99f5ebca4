"""The S3 driver: registry:2's layout in a bucket, under its ``rootdirectory``.

Keys are ``<prefix>/<key>`` (the prefix stripped of slashes, omitted when empty),
exactly as registry:2's s3-aws driver writes them, so either can read the other's
bucket. boto3 blocks, so every SDK call runs in a bounded thread pool owned by the
driver and never on the event loop; :meth:`S3Driver.close` shuts it down.

Failures of the store (no connection, timeouts, 5xx, denied, missing bucket)
become :class:`StorageUnavailable`; only a missing key is :class:`PathNotFound`.

S3 rejects requests signed more than 15 minutes away from its own clock
(``RequestTimeTooSkewed``) and botocore does not correct for it (boto/boto3#1252),
so the driver does: on a skew rejection it learns the offset from the response
(``ServerTime``, else the ``Date`` header), signs every later request of its client
with the corrected time and retries the call once.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.auth
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from regmirror.config import S3Settings
from regmirror.numbers import content_range_total
from regmirror.storage.driver import Driver, PathNotFound, StorageUnavailable, TooLarge

log = logging.getLogger(__name__)

T = TypeVar("T")

CHUNK = 1024 * 1024
DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
SKEW_CODES = frozenset({"RequestTimeTooSkewed", "RequestExpired", "RequestInTheFuture"})
# A bodiless 403 (HEAD) carries no error code; a Date this far off is taken as skew.
SKEW_SUSPECT = datetime.timedelta(minutes=5)
# Offsets closer than this to the one in use are the same skew seen by another request.
SKEW_SAME = datetime.timedelta(seconds=5)
SIGNER = "s3v4-regmirror-clock"  # our S3 SigV4 signer, registered under this name
CLOCK_CONTEXT = "regmirror_clock"  # request.context key carrying the client's clock


class S3Driver(Driver):
    """registry:2's storage layout in an S3 (or S3-compatible) bucket."""

    name = "s3"

    # ``max_workers`` bounds the SDK calls in flight (each put_file adds up to
    # ``transfer_concurrency`` part uploads); ``on_clock_skew(seconds)`` is called each
    # time a new offset to S3's clock is adopted (S3's time minus ours).
    def __init__(
        self,
        settings: S3Settings,
        *,
        max_workers: int = 16,
        transfer_concurrency: int = 4,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        max_attempts: int = 2,
        on_clock_skew: Callable[[float], None] | None = None,
    ):
        if not settings.bucket:
            raise ValueError("s3.bucket is required for the S3 driver")
        self.bucket = settings.bucket
        self.prefix = settings.prefix.strip("/")
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="regmirror-s3")
        self._clock = Clock(on_clock_skew)
        self._transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.part_size,
            max_concurrency=transfer_concurrency,
        )
        config = Config(
            region_name=settings.region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Standard mode retries connection errors, timeouts, 5xx and throttling with
            # jittered backoff (up to 2 s before the one retry by default). An outage
            # fails in seconds, not minutes: refused at once ~2 s, no route ~6 s, a hung
            # S3 ~12 s; botocore's defaults (60 s timeouts) would take minutes.
            retries={"mode": "standard", "max_attempts": max_attempts},
            max_pool_connections=max_workers * (1 + transfer_concurrency),
            s3={"addressing_style": "path" if settings.path_style else "auto"},
            # botocore >= 1.36 adds CRC checksums (aws-chunked trailers) to every
            # upload; many S3-compatible stores reject them. Digests are verified above us.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            tcp_keepalive=True,
        )
        # A session of our own: boto3's default session is shared and not thread-safe.
        session = boto3.session.Session()
        self._client = session.client("s3", endpoint_url=settings.endpoint_url, config=config)
        self._clock.install(self._client)

    @classmethod
    async def create(cls, settings: S3Settings, **options: Any) -> S3Driver:
        """Build the driver off the event loop (botocore loads its models from disk)."""
        return await asyncio.to_thread(functools.partial(cls, settings, **options))

    def key(self, key: str) -> str:
        """The object key for a driver key: registry:2's ``rootdirectory`` + key."""
        parts = key.split("/")
        if not key or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid storage key {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    async def get(self, key: str, *, limit: int | None = None) -> bytes:
        def get() -> bytes:
            args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(key)}
            if limit is not None:  # one request, and at most limit + 1 bytes come back
                args["Range"] = f"bytes=0-{limit}"
            try:
                response = self._client.get_object(**args)
            except ClientError as exc:
                if (
                    limit is not None
                    and exc.response.get("Error", {}).get("Code") == "InvalidRange"
                ):
                    return b""  # S3 refuses any range of an empty object
                raise
            with response["Body"] as body:
                # A store that ignored the Range says the whole size in Content-Length.
                total = content_range_total(response.get("ContentRange"))
                if total is None:
                    total = response.get("ContentLength")
                if limit is not None and total is not None and total > limit:
                    raise TooLarge(key, total, limit)  # the body is not read
                data: bytes = body.read()
            if limit is not None and len(data) > limit:
                raise TooLarge(key, None, limit)  # a store that ignored the Range
            return data

        return await self._run(key, get)

    async def put(self, key: str, data: bytes) -> None:
        await self._run(
            key,
            functools.partial(
                self._client.put_object, Bucket=self.bucket, Key=self.key(key), Body=data
            ),
        )

    async def put_file(self, key: str, source: Path) -> None:
        # Above the threshold this is a multipart upload, invisible under the key
        # until CompleteMultipartUpload; s3transfer aborts it if any part fails.
        await self._run(
            key,
            functools.partial(
                self._client.upload_file,
                str(source),
                self.bucket,
                self.key(key),
                Config=self._transfer,
            ),
        )

    async def stat(self, key: str) -> int:
        def stat() -> int:
            response = self._client.head_object(Bucket=self.bucket, Key=self.key(key))
            return int(response["ContentLength"])

        return await self._run(key, stat)

    async def list(self, key: str) -> list[str]:
        prefix = self.key(key) + "/"

        def list_children() -> list[str]:
            names: set[str] = set()
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                names.update(
                    p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", ())
                )
                names.update(o["Key"][len(prefix) :] for o in page.get("Contents", ()))
            names.discard("")  # a "directory marker" object named exactly prefix
            if not names:
                raise PathNotFound(key)
            return sorted(names)

        return await self._run(key, list_children)

    async def delete(self, key: str) -> None:
        target = self.key(key)

        def delete() -> None:
            self._client.delete_object(Bucket=self.bucket, Key=target)
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=target + "/", PaginationConfig={"PageSize": DELETE_BATCH}
            )
            for page in pages:
                objects = [{"Key": o["Key"]} for o in page.get("Contents", ())]
                if not objects:
                    continue
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True}
                )
                if errors := response.get("Errors"):
                    first = errors[0]
                    raise StorageUnavailable(
                        f"s3: could not delete {len(errors)} object(s) under {key!r}, "
                        f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                    )

        await self._run(key, delete)

    async def reader(self, key: str, offset: int = 0) -> AsyncIterator[bytes]:
        # One ranged GET streamed in CHUNK-sized reads, each in the pool: memory stays
        # at one chunk whatever the size. A body cut off mid-way is resumed from where
        # it stopped, pinned to the same object by its ETag.
        position, etag, resumes = offset, None, 0
        while True:
            stream = await self._run(key, functools.partial(self._open, key, position, etag))
            if stream is None:  # offset at or past the end
                return
            body, etag = stream
            try:
                while chunk := await self._run(key, functools.partial(body.read, CHUNK)):
                    position += len(chunk)
                    yield chunk
                return
            except StorageUnavailable:
                resumes += 1
                if resumes > 2:
                    raise
                log.info("s3: resuming %s at byte %d after a broken stream", key, position)
            finally:
                await self._run(key, body.close)

    # -- conditional writes (fleet leases) ---------------------------------------

    async def get_tagged(self, key: str) -> tuple[bytes, str]:
        """The (small) content at ``key`` and its ETag, for a later :meth:`put_if`."""

        def get() -> tuple[bytes, str]:
            response = self._client.get_object(Bucket=self.bucket, Key=self.key(key))
            with response["Body"] as body:
                return body.read(), str(response["ETag"])

        return await self._run(key, get)

    async def put_if(self, key: str, data: bytes, *, etag: str | None = None) -> str | None:
        """Store ``data`` at ``key`` only if nothing is there (``etag`` None: PutObject with
        ``If-None-Match: *``) or only if the object there still has ``etag`` (``If-Match``).
        The new ETag; None when the condition did not hold (412, or 409 for a concurrent
        conditional write). A store that ignores the headers overwrites: see
        :meth:`honours_conditions`."""
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}

        def put() -> str | None:
            try:
                response = self._client.put_object(
                    Bucket=self.bucket, Key=self.key(key), Body=data, **condition
                )
            except ClientError as exc:
                if _conflict(exc):
                    return None
                raise
            return str(response["ETag"])

        return await self._run(key, put)

    async def delete_if(self, key: str, etag: str) -> bool:
        """Delete ``key`` if it still has ``etag``; False when it changed or is gone."""

        def delete() -> bool:
            try:
                self._client.delete_object(Bucket=self.bucket, Key=self.key(key), IfMatch=etag)
            except ClientError as exc:
                if _conflict(exc):
                    return False
                raise
            return True

        try:
            return await self._run(key, delete)
        except PathNotFound:
            return False

    async def honours_conditions(self, key: str) -> bool:
        """Whether the store refuses a second ``If-None-Match: *`` write of ``key`` (a
        fresh probe key); stores that ignore the header let it through."""
        try:
            if await self.put_if(key, b"probe") is None:
                return False  # someone else's probe: use a fresh key
            return await self.put_if(key, b"probe") is None
        finally:
            await self.delete(key)

    async def check(self) -> None:
        """Raise StorageUnavailable unless the bucket answers (for readiness probes)."""
        try:
            await self._run("", functools.partial(self._client.head_bucket, Bucket=self.bucket))
        except PathNotFound as exc:  # HEAD has no body: a bare 404 is the bucket's
            raise StorageUnavailable(f"s3: bucket {self.bucket!r} not found") from exc

    async def close(self) -> None:
        """Wait for calls in flight, then release the threads and connections."""
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        self._client.close()

    def _open(self, key: str, offset: int, etag: str | None) -> tuple[Any, str] | None:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key(key)}
        if offset:
            args["Range"] = f"bytes={offset}-"
        if etag:
            args["IfMatch"] = etag
        try:
            response = self._client.get_object(**args)
        except ClientError as exc:
            if offset and exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return None
            raise
        return response["Body"], response["ETag"]

    async def _run(self, key: str, call: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._call, key, call)

    def _call(self, key: str, call: Callable[[], T]) -> T:
        """Run ``call`` in a worker thread: skew correction and error translation."""
        try:
            try:
                return call()
            except (ClientError, S3UploadFailedError) as exc:
                if not self._clock.correct(client_error(exc)):
                    raise
            return call()  # once more, signed with the corrected clock
        except (PathNotFound, TooLarge):
            raise
        except (ClientError, S3UploadFailedError) as exc:
            error = client_error(exc)
            if error is not None and error.response.get("Error", {}).get("Code") in NOT_FOUND:
                raise PathNotFound(key) from exc
            raise StorageUnavailable(f"s3: {describe(error or exc)}") from exc
        except BotoCoreError as exc:
            raise StorageUnavailable(f"s3: {exc}") from exc


def _conflict(exc: ClientError) -> bool:
    """A conditional request whose condition did not hold (412), or that lost a race with
    another conditional write of the same key (409 ConditionalRequestConflict)."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = exc.response.get("Error", {}).get("Code")
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


def client_error(exc: BaseException) -> ClientError | None:
    """The ClientError behind ``exc``; upload_file wraps it in S3UploadFailedError."""
    while exc is not None and not isinstance(exc, ClientError):
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return exc


def describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return (
            f"{exc.operation_name}: {status} {error.get('Code')} {error.get('Message', '')}".strip()
        )
    return str(exc)


class Clock:
    """The offset between S3's clock and ours, applied when signing one client's requests."""

    def __init__(self, on_skew: Callable[[float], None] | None):
        self.offset = datetime.timedelta(0)
        self._on_skew = on_skew
        self._lock = threading.Lock()

    def install(self, client: Any) -> None:
        """Sign ``client``'s S3 requests with this clock.

        botocore offers no public hook on the signing time: the request signer is
        wrapped so that, where botocore chose S3's SigV4 signer, ours (identical but
        for the timestamp) signs instead, finding this clock in the request context.
        """
        signer = client._request_signer
        choose = signer.get_auth_instance

        @functools.wraps(choose)
        def get_auth_instance(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("signature_version", signer.signature_version) == "s3v4":
                kwargs["signature_version"] = SIGNER
            return choose(*args, **kwargs)

        signer.get_auth_instance = get_auth_instance
        client.meta.events.register("before-sign.s3", self._stamp)

    def _stamp(self, request: Any, **_: Any) -> None:
        request.context[CLOCK_CONTEXT] = self

    def correct(self, error: ClientError | None) -> bool:
        """Learn the offset from a skew rejection; True when a retry may now succeed."""
        if error is None:
            return False
        now = botocore.auth.get_current_datetime()  # the time source botocore signs with
        server = server_time(error)
        if server is None:
            return False
        offset = server - now
        code = error.response.get("Error", {}).get("Code")
        if code not in SKEW_CODES and not suspect(error, offset - self.offset):
            return False
        with self._lock:
            if abs(offset - self.offset) < SKEW_SAME:
                return True  # signed before another request corrected the clock
            self.offset = offset
        seconds = offset.total_seconds()
        log.warning(
            "s3: this host's clock is %.0f s %s S3's (%s); signing with the corrected time",
            abs(seconds),
            "behind" if seconds > 0 else "ahead of",
            code,
        )
        if self._on_skew is not None:
            self._on_skew(seconds)
        return True

    def timestamp(self, signed: str) -> str:
        stamp = botocore.auth.SIGV4_TIMESTAMP
        return (datetime.datetime.strptime(signed, stamp) + self.offset).strftime(stamp)


def suspect(error: ClientError, skew: datetime.timedelta) -> bool:
    """A bodiless 403 (HEAD) whose Date is far from our corrected time: most likely skew."""
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status == 403 and abs(skew) > SKEW_SUSPECT


def server_time(error: ClientError) -> datetime.datetime | None:
    """S3's clock at the rejection, naive UTC: ServerTime in the body, else Date."""
    text = error.response.get("Error", {}).get("ServerTime")
    try:
        if text:
            parsed = datetime.datetime.fromisoformat(text)
        else:
            date = error.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            if not date:
                return None
            parsed = parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(datetime.UTC).replace(tzinfo=None)
    return parsed


class ClockCorrectedS3SigV4Auth(botocore.auth.S3SigV4Auth):
    """S3's SigV4 signer, stamping requests with the time of the client's :class:`Clock`."""

    def _modify_request_before_signing(self, request: Any) -> None:
        # add_auth has just stamped context["timestamp"] from the host clock; the
        # X-Amz-Date header, credential scope and string to sign are all built from it.
        clock = request.context.get(CLOCK_CONTEXT)
        if clock is not None and clock.offset:
            request.context["timestamp"] = clock.timestamp(request.context["timestamp"])
        super()._modify_request_before_signing(request)


# A name of our own: botocore's "s3v4" entry is left untouched for every other client.
botocore.auth.AUTH_TYPE_MAPS.setdefault(SIGNER, ClockCorrectedS3SigV4Auth)

"""Leases: small JSON objects in the bucket that say which host fills what, and until when.

A lease is created with ``PutObject`` + ``If-None-Match: *``, so of any number of hosts
asking at once exactly one wins (the others get 412 and read who did). It names its owner
(``fleet.advertise_url``, and a per-process instance id, so that a restarted host does not
mistake its predecessor's lease for its own, nor one worker of a host another worker's)
and a deadline (wall clock, UTC seconds). The owner renews it (``If-Match`` on the ETag
it last wrote) while its fill progresses; a lease past its deadline, or whose owner a
peer could not get bytes from, is taken over the same way, so two hosts can never both
believe they took it. Nothing deletes a dead host's lease: it simply expires.

A store that ignores the conditions would let every host win; :meth:`Leases.supported`
finds that out once (a probe object written twice) and fleet mode is then off, with a
warning: every host fills on its own, as without fleet mode.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from regmirror.digest import Digest
from regmirror.storage.driver import PathNotFound
from regmirror.storage.s3 import S3Driver

log = logging.getLogger(__name__)

ROOT = "regmirror/fleet"  # under s3.prefix, beside registry:2's docker/ tree
ATTEMPTS = 5  # create-or-read rounds before giving up (the lease keeps vanishing)


def blob_key(digest: Digest) -> str:
    return f"{ROOT}/leases/blobs/{digest.algorithm}/{digest.hex}"


def manifest_lease(digest: Digest) -> str:
    return f"{ROOT}/leases/manifests/{digest.algorithm}/{digest.hex}"


@dataclass(frozen=True, slots=True)
class Lease:
    key: str
    owner: str  # the advertise_url of the host that fills
    instance: str  # its process's id
    expires: float  # wall clock (time.time()) deadline
    etag: str

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.expires


class Leases:
    def __init__(
        self,
        s3: S3Driver,
        *,
        owner: str,
        ttl: float,
        observe: Callable[[str], None] = lambda result: None,
    ):
        self.s3 = s3
        self.owner = owner
        self.ttl = ttl
        self.instance = uuid.uuid4().hex
        self._observe = observe
        self._supported: bool | None = None
        self._probe = asyncio.Lock()

    async def supported(self) -> bool:
        """Whether the store honours ``If-None-Match: *`` (asked once; an S3 error is
        not an answer, so it is asked again next time)."""
        if self._supported is None:
            async with self._probe:
                if self._supported is None:
                    key = f"{ROOT}/probes/{self.instance}-{uuid.uuid4().hex[:8]}"
                    self._supported = await self.s3.honours_conditions(key)
                    if not self._supported:
                        log.warning(
                            "fleet: the S3 store ignores conditional writes (If-None-Match: *);"
                            " fleet-wide single-flight is off, every host fills on its own"
                        )
        return self._supported

    def mine(self, lease: Lease) -> bool:
        return lease.instance == self.instance

    @property
    def supported_known(self) -> bool | None:
        return self._supported

    async def acquire(self, key: str) -> tuple[Lease, bool]:
        """The lease on ``key``, and whether it was won now: a new one of ours, or the
        one another host (or another fill of this process) holds."""
        for _ in range(ATTEMPTS):
            body, expires = self._body()
            etag = await self.s3.put_if(key, body)
            if etag is not None:
                self._observe("won")
                return Lease(key, self.owner, self.instance, expires, etag), True
            held = await self.read(key)
            if held is not None:
                if not self.mine(held):
                    self._observe("lost")
                return held, False
        raise TimeoutError(f"fleet: lease {key} kept changing")

    async def read(self, key: str) -> Lease | None:
        """The lease at ``key``; None when there is none (or it is not one of ours: it
        is then overwritten by the next take-over)."""
        try:
            raw, etag = await self.s3.get_tagged(key)
        except PathNotFound:
            return None
        try:
            data = json.loads(raw)
            return Lease(
                key, str(data["owner"]), str(data["instance"]), float(data["expires"]), etag
            )
        except (ValueError, KeyError, TypeError):
            return Lease(key, "", "", 0.0, etag)  # unreadable: as good as expired

    async def take_over(self, lease: Lease, why: str | None = None) -> Lease | None:
        """``lease`` made ours, if nobody changed it since it was read; ``why`` is logged
        (by default: it expired, or its owner was unreachable or stalled)."""
        body, expires = self._body()
        etag = await self.s3.put_if(lease.key, body, etag=lease.etag)
        if etag is None:
            return None
        if why is None:
            why = "expired" if lease.expired() else "unreachable or stalled"
        log.warning(
            "fleet: took over the lease %s from %s (%s)", lease.key, lease.owner or "?", why
        )
        self._observe("taken_over")
        return Lease(lease.key, self.owner, self.instance, expires, etag)

    async def renew(self, lease: Lease) -> Lease | None:
        """``lease`` with a new deadline; None when another host took it over."""
        body, expires = self._body()
        etag = await self.s3.put_if(lease.key, body, etag=lease.etag)
        if etag is None:
            log.warning("fleet: lost the lease %s to another host", lease.key)
            self._observe("renew_lost")
            return None
        return Lease(lease.key, self.owner, self.instance, expires, etag)

    async def release(self, lease: Lease) -> None:
        if await self.s3.delete_if(lease.key, lease.etag):
            self._observe("released")

    def _body(self) -> tuple[bytes, float]:
        expires = time.time() + self.ttl
        body = {"owner": self.owner, "instance": self.instance, "expires": expires}
        return json.dumps(body).encode(), expires

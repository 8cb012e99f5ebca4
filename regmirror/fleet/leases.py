"""Leases: small JSON objects in the bucket that say which host fills what, and until when.

A lease is created with ``PutObject`` + ``If-None-Match: *``, so of any number of hosts
asking at once exactly one wins (the others get 412 and read who did). It names its owner
(``fleet.advertise_url``, and a per-process instance id, so that a restarted host does not
mistake its predecessor's lease for its own, nor one worker of a host another worker's)
and a deadline (wall clock, UTC seconds). The owner renews it (``If-Match`` on the ETag
it last wrote) while its fill progresses; a lease past its deadline, or whose owner a
peer could not get bytes from, is taken over the same way, so two hosts can never both
believe they took it. Nothing deletes a dead host's lease: it simply expires.

A conditional write refused (412) is not proof that another host has the lease: the
write may have landed and only its answer been lost (a connection cut or a read timed
out after S3 stored it), and botocore then sends it again, which the first copy's new
ETag refuses. So a refused write reads the lease back before concluding: one that
carries this very write's instance and deadline is ours (won, taken over, renewed), and
a blob's renewal or release, which no other holder of this process writes, finding this
process's instance there goes on with that ETag.

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
            if held is not None and self._landed(held, expires):
                self._observe("won")  # our write, answered 412 when sent again
                return held, True
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
            current = await self.read(lease.key)
            if current is None or not self._landed(current, expires):
                return None
            etag = current.etag  # our write, answered 412 when sent again
        if why is None:
            why = "expired" if lease.expired() else "unreachable or stalled"
        log.warning(
            "fleet: took over the lease %s from %s (%s)", lease.key, lease.owner or "?", why
        )
        self._observe("taken_over")
        return Lease(lease.key, self.owner, self.instance, expires, etag)

    async def renew(self, lease: Lease) -> Lease | None:
        """``lease`` with a new deadline; None when another host took it over (or it is
        gone). For a lease no other holder of this process writes (a blob's, see
        :meth:`release`): a refused renewal whose lease still names this process is
        ours, the write landed and its answer was lost (see the module's docstring)."""
        body, expires = self._body()
        try:
            etag = await self.s3.put_if(lease.key, body, etag=lease.etag)
        except PathNotFound:  # deleted: taken over and released by another host
            etag = None
        if etag is not None:
            return Lease(lease.key, self.owner, self.instance, expires, etag)
        current = await self.read(lease.key)
        if current is not None and self.mine(current):
            log.info("fleet: the lease %s was renewed, though S3 answered 412", lease.key)
            return current
        log.warning("fleet: lost the lease %s to another host", lease.key)
        self._observe("renew_lost")
        return None

    async def release(self, lease: Lease, *, sole: bool = False) -> None:
        """Delete ``lease``, if it still has the ETag we know. ``sole``: no other holder
        of this process writes that key (a blob's lease: the partial file's lock and
        :class:`~regmirror.fleet.coordinator.Fleet` make it so), so a delete refused
        because the lease names this process still, rewritten since (a renewal that
        landed though it failed here), deletes it with its new ETag."""
        etag = lease.etag
        for _ in range(ATTEMPTS):
            if await self.s3.delete_if(lease.key, etag):
                self._observe("released")
                return
            current = await self.read(lease.key) if sole else None
            if current is None or not self.mine(current):
                return  # gone, or another's now: left to its owner
            etag = current.etag
        log.warning("fleet: the lease %s kept changing; left to expire", lease.key)

    def _landed(self, lease: Lease, expires: float) -> bool:
        """Whether ``lease`` (read back after a refused write) is the write that wrote
        ``expires``: the deadline survives JSON exactly, and no other write has it."""
        return self.mine(lease) and lease.expires == expires

    def _body(self) -> tuple[bytes, float]:
        expires = time.time() + self.ttl
        body = {"owner": self.owner, "instance": self.instance, "expires": expires}
        return json.dumps(body).encode(), expires

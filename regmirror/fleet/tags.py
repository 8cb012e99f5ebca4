"""Tag revalidations shared through the bucket: one upstream request per tag per TTL for
the whole fleet, not one per host (Docker Hub counts manifest requests against its limit).

A revalidation's result is a record in the bucket, per tag and per representation
(:mod:`regmirror.negotiation`): the digest the upstream named and when (wall clock). A
host whose own copy is older than the TTL reads the record first; only when the record is
older too does it revalidate, and then through :meth:`Fleet.single`, so that of the hosts
asking at once one asks the upstream and the others read its answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable

from regmirror.digest import Digest
from regmirror.errors import DigestInvalid
from regmirror.fleet.coordinator import Fleet
from regmirror.fleet.leases import ROOT
from regmirror.storage.driver import PathNotFound, StorageUnavailable


def record_key(name: str, tag: str, representation: str) -> str:
    return f"{ROOT}/tags/{name}/{tag}/{representation}"


async def revalidate(
    fleet: Fleet, key: str, ttl: float, ask: Callable[[], Awaitable[Digest]]
) -> tuple[Digest, float]:
    """The tag's digest as the upstream named it within ``ttl`` seconds, and how many
    seconds ago: another host's answer (counted ``shared``) or this host's ``ask()``
    (``performed``), published."""
    s3 = fleet.leases.s3

    async def fresh() -> tuple[Digest, float] | None:
        try:
            record = json.loads((await s3.get_tagged(key))[0])
            digest, checked = Digest.parse(record["digest"]), float(record["checked"])
        except (PathNotFound, StorageUnavailable, ValueError, KeyError, TypeError, DigestInvalid):
            return None
        age = max(0.0, time.time() - checked)
        if age >= ttl:
            return None
        fleet.observer.fleet_tag("shared")
        return digest, age

    async def perform() -> tuple[Digest, float]:
        digest = await ask()
        fleet.observer.fleet_tag("performed")
        record = {"digest": str(digest), "checked": time.time()}
        try:
            await s3.put(key, json.dumps(record).encode())
        except StorageUnavailable:
            pass  # the others ask the upstream themselves
        return digest, 0.0

    found = await fresh()
    if found is not None:
        return found
    return await fleet.single(f"{ROOT}/leases/{key.removeprefix(ROOT + '/')}", fresh, perform)

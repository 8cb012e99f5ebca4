"""Fleet mode with real processes: several ``regmirror serve`` hosts, each with its own data
directory, on one moto bucket, pulling through from registry:2 behind a counting proxy.

One upstream fetch per blob, manifest and tag revalidation for the whole fleet; an owner
killed, stalled or unreachable is taken over from the byte the follower had reached; a peer
sending wrong bytes fails that fill only; a dead host's lease expires by itself.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from regmirror.app import check_fleet
from regmirror.config import ConfigError, S3Settings, load
from regmirror.digest import Digest
from regmirror.fleet import credential
from regmirror.fleet.leases import Leases, blob_key
from regmirror.storage.s3 import S3Driver
from tests.support.auth import basic, write_htpasswd
from tests.support.fleet import (
    BOUND,
    PEER_TIMEOUT,
    SECRET,
    Rig,
    manifest_requests,
    metric,
    metrics,
    proxy,
    pull_blob,
    pull_manifest,
    rig,
    sample,
    until_metric,
)
from tests.support.http import session
from tests.support.processes import (  # pytest fixtures among them
    HOST,
    free_port,
    regmirror_server,
)
from tests.support.s3 import REGION, MotoS3, moto_s3
from tests.support.s3_front import answer, forward, front
from tests.support.s3_registry import PREFIX
from tests.support.upstream import DOCKER_MANIFEST, serve, upstream_registry

__all__ = ["moto_s3", "proxy", "regmirror_server", "rig", "session", "upstream_registry"]

MiB = 1024 * 1024


def s3_front(
    session: aiohttp.ClientSession,
    moto: MotoS3,
    *,
    forget_conditions: bool = False,
    cut_blobs_after: int | None = None,
) -> web.Application:
    """moto behind a proxy that answers as a store ignoring If-None-Match and If-Match
    would, or cuts every blob body (``/data`` keys) after some bytes."""
    conditions = ("if-none-match", "if-match") if forget_conditions else ()

    async def handle(request: web.Request) -> web.StreamResponse:
        forwarded = await forward(session, moto, request, dropped=conditions)
        cut = cut_blobs_after if request.path.endswith("/data") else None
        return await answer(request, forwarded, cut_after=cut)

    return front(handle)


# -- one fetch per fleet ----------------------------------------------------------------


async def test_concurrent_pulls_across_hosts_make_one_upstream_get_per_blob_and_manifest(
    rig: Rig,
) -> None:
    image = await rig.image("fleet/herd", 4 * MiB)
    fleet = rig.fleet(3)
    rig.proxy.requests.clear()
    await asyncio.gather(
        *(pull_manifest(rig.session, h, image) for h in fleet.hosts for _ in range(3))
    )
    assert manifest_requests(rig.proxy, "GET") == 1
    assert manifest_requests(rig.proxy, "HEAD") == 1  # the tag, revalidated once for the fleet
    texts = [await metrics(rig.session, h) for h in fleet.hosts]
    revalidations = 'regmirror_fleet_tag_revalidations_total{result="%s"}'
    assert sum(sample(t, revalidations % "performed") for t in texts) == 1
    assert sum(sample(t, revalidations % "shared") for t in texts) == 2

    rig.proxy.hold_after = 1 * MiB  # the owner's upstream body stops here until every host asks
    pulls = [
        asyncio.create_task(pull_blob(rig.session, h, image)) for h in fleet.hosts for _ in range(3)
    ]
    await asyncio.wait_for(rig.proxy.held.wait(), BOUND)
    lost = 'regmirror_fleet_leases_total{result="lost"}'
    for _ in range(int(BOUND / 0.05)):
        texts = [await metrics(rig.session, h) for h in fleet.hosts]
        if sum(sample(t, lost) for t in texts) >= 2:
            break
        await asyncio.sleep(0.05)
    rig.proxy.release.set()
    bodies = await asyncio.wait_for(asyncio.gather(*pulls), BOUND)
    assert all(body == image.layer for body in bodies)
    assert rig.proxy.blob_gets == 1
    texts = [await metrics(rig.session, h) for h in fleet.hosts]
    source = 'regmirror_fleet_fill_bytes_total{source="%s"}'
    assert sum(sample(t, source % "upstream") for t in texts) == len(image.layer)
    assert sum(sample(t, source % "peer") for t in texts) == 2 * len(image.layer)
    assert sum(sample(t, 'regmirror_fleet_leases_total{result="won"}') for t in texts) == 1
    await fleet.until_gone(fleet.lease_key(image.layer_digest))  # in S3: the lease is deleted
    assert fleet.has(
        f"{PREFIX}/docker/registry/v2/blobs/sha256/{image.layer_digest.hex[:2]}/"
        f"{image.layer_digest.hex}/data"
    )


async def test_an_owner_killed_mid_fill_is_taken_over_from_the_byte_reached(rig: Rig) -> None:
    image, fleet, at_owner = await rig.owner_held("fleet/killed", 4 * MiB)
    owner, follower = fleet.hosts
    at_follower = [asyncio.create_task(pull_blob(rig.session, follower, image)) for _ in range(3)]
    peer_bytes = 'regmirror_fleet_fill_bytes_total{source="peer"}'
    await until_metric(rig.session, follower, peer_bytes, 1)  # streaming from the owner's fill
    rig.proxy.hold_after = None
    owner.stopped = True
    owner.process.kill()
    await asyncio.to_thread(owner.process.wait, BOUND)
    rig.proxy.release.set()

    assert all(
        b == image.layer for b in await asyncio.wait_for(asyncio.gather(*at_follower), BOUND)
    )
    assert await asyncio.wait_for(at_owner, BOUND) is None  # cut, never a clean short body
    assert rig.proxy.blob_gets == 2  # the owner's, and one ranged GET for the rest
    ranged = [path for m, path in rig.proxy.requests if m == "GET" and "/blobs/sha" in path]
    assert len(ranged) == 2
    text = await metrics(rig.session, follower)
    assert sample(text, 'regmirror_fleet_leases_total{result="taken_over"}') == 1
    assert sample(text, 'regmirror_fleet_fill_bytes_total{source="upstream"}') < len(image.layer)
    await fleet.until_gone(fleet.lease_key(image.layer_digest))


async def test_a_stalled_owner_is_taken_over(rig: Rig) -> None:
    image, fleet, at_owner = await rig.owner_held("fleet/stalled", 3 * MiB)
    follower = fleet.hosts[1]
    rig.proxy.hold_after = None  # only the owner's body stays held: it stalls
    started = time.monotonic()
    assert await asyncio.wait_for(pull_blob(rig.session, follower, image), BOUND) == image.layer
    assert time.monotonic() - started < PEER_TIMEOUT + 10
    assert rig.proxy.blob_gets == 2
    text = await metrics(rig.session, follower)
    assert sample(text, 'regmirror_fleet_peer_errors_total{kind="stalled"}') == 1
    assert sample(text, 'regmirror_fleet_leases_total{result="taken_over"}') == 1
    rig.proxy.release.set()  # the stalled owner finishes its own clients' pull
    assert await asyncio.wait_for(at_owner, BOUND) == image.layer
    await fleet.until_gone(fleet.lease_key(image.layer_digest))


async def test_a_peer_sending_wrong_bytes_fails_that_fill_only(rig: Rig) -> None:
    image = await rig.image("fleet/corrupt", 1 * MiB)
    fleet = rig.fleet(1)
    (host,) = fleet.hosts
    await pull_manifest(rig.session, host, image)
    asked: list[str | None] = []

    async def lying_peer(request: web.Request) -> web.Response:
        asked.append(request.headers.get("Authorization"))
        return web.Response(body=bytes(len(image.layer)))  # right length, wrong bytes

    app = web.Application()
    app.router.add_get("/-/fleet/blobs/{digest}", lying_peer)
    async with serve(app) as liar:
        fleet.plant_lease(image.layer_digest, liar, expires_in=600.0)
        assert await pull_blob(rig.session, host, image) is None  # cut: never a clean body
        assert asked and credential.verify(
            SECRET, asked[0], "GET", f"/-/fleet/blobs/{image.layer_digest}"
        )
        assert (
            await metric(rig.session, host, 'regmirror_fills_total{result="digest_mismatch"}') == 1
        )
        assert rig.proxy.blob_gets == 0
        # The next fill does not follow the liar again (its lease has long to run): it
        # takes the lease over and fetches from the upstream.
        assert await pull_blob(rig.session, host, image) == image.layer
        assert len(asked) == 1
    assert rig.proxy.blob_gets == 1
    text = await metrics(rig.session, host)
    assert sample(text, 'regmirror_fleet_leases_total{result="taken_over"}') == 1


async def test_a_lease_left_by_a_dead_host_expires_and_an_unreachable_owner_is_taken_over(
    rig: Rig,
) -> None:
    expired = await rig.image("fleet/expired", 1 * MiB)
    unreachable = await rig.image("fleet/unreachable", 1 * MiB)
    fleet = rig.fleet(1)
    (host,) = fleet.hosts
    nobody = f"http://{HOST}:{free_port()}"
    fleet.plant_lease(expired.layer_digest, nobody, expires_in=-1.0)
    fleet.plant_lease(unreachable.layer_digest, nobody, expires_in=600.0)
    for image in (expired, unreachable):
        await pull_manifest(rig.session, host, image)
        assert await asyncio.wait_for(pull_blob(rig.session, host, image), BOUND) == image.layer
        await fleet.until_gone(fleet.lease_key(image.layer_digest))
    assert rig.proxy.blob_gets == 2
    text = await metrics(rig.session, host)
    assert sample(text, 'regmirror_fleet_leases_total{result="taken_over"}') == 2
    assert sample(text, 'regmirror_fleet_peer_errors_total{kind="unreachable"}') == 1


# -- the peer endpoint ----------------------------------------------------------------


async def test_the_peer_endpoint_serves_blobs_only_to_signed_requests(rig: Rig) -> None:
    image = await rig.image("fleet/peer", 64 * 1024)
    fleet = rig.fleet(1)
    (host,) = fleet.hosts
    await pull_manifest(rig.session, host, image)
    assert await pull_blob(rig.session, host, image) == image.layer
    path = f"/-/fleet/blobs/{image.layer_digest}"
    for authorization in (
        None,
        f"Bearer {SECRET}",
        credential.sign("another-secret", "GET", path),
        credential.sign(SECRET, "GET", "/-/fleet/blobs/sha256:" + "0" * 64),
        credential.sign(SECRET, "GET", path, now=time.time() - 3600),
    ):
        headers = {"Authorization": authorization} if authorization else {}
        async with rig.session.get(f"{host.url}{path}", headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["errors"][0]["code"] == "UNAUTHORIZED"
    signed = {"Authorization": credential.sign(SECRET, "GET", path), "Range": "bytes=10-"}
    async with rig.session.get(f"{host.url}{path}", headers=signed) as response:
        assert response.status == 206 and await response.read() == image.layer[10:]
    unknown = "/-/fleet/blobs/sha256:" + "1" * 64
    signed = {"Authorization": credential.sign(SECRET, "GET", unknown)}
    async with rig.session.get(f"{host.url}{unknown}", headers=signed) as response:
        assert response.status == 404  # nothing is fetched for a peer
    assert rig.proxy.blob_gets == 1


# -- leases against moto, and the configuration ------------------------------------------


async def test_leases_are_won_once_renewed_taken_over_and_released(moto_s3: MotoS3) -> None:
    bucket = moto_s3.new_bucket("leases")
    settings = S3Settings(
        bucket=bucket, endpoint_url=moto_s3.endpoint_url, path_style=True, region=REGION
    )
    s3 = await S3Driver.create(settings)
    try:
        a = Leases(s3, owner="http://a", ttl=0.5)
        b = Leases(s3, owner="http://b", ttl=0.5)
        assert await a.supported()
        key = blob_key(Digest.of(b"x"))
        results = await asyncio.gather(a.acquire(key), b.acquire(key))
        assert sorted(won for _, won in results) == [False, True]
        (held, _), (seen, _) = sorted(results, key=lambda r: not r[1])
        owner, other = (a, b) if a.mine(held) else (b, a)
        assert seen.etag == held.etag and not seen.expired()
        renewed = await owner.renew(held)
        assert renewed is not None
        assert await other.take_over(seen) is None  # the renewal changed the ETag
        await asyncio.sleep(0.6)
        current = await other.read(key)
        assert current is not None and current.expired()
        taken = await other.take_over(current)
        assert taken is not None and other.mine(taken)
        assert await owner.renew(renewed) is None  # lost to the take-over
        await owner.release(renewed)  # not its lease any more: left alone
        assert await other.read(key) == taken
        await other.release(taken)
        assert await other.read(key) is None
    finally:
        await s3.close()


def test_fleet_mode_needs_the_bucket_write_back_and_a_secret() -> None:
    base = {"REGMIRROR_FLEET__ADVERTISE_URL": "http://10.0.0.7:5000"}
    with_s3 = {**base, "REGMIRROR_S3__BUCKET": "b", "REGMIRROR_S3__WRITE_BACK": "true"}
    for environ, problem in (
        (base, "s3.bucket"),
        ({**base, "REGMIRROR_S3__BUCKET": "b"}, "write_back"),
        (with_s3, "fleet.secret"),
        (
            {**with_s3, "REGMIRROR_FLEET__SECRET": "s", "REGMIRROR_FLEET__PEER_TIMEOUT": "90"},
            "peer_timeout",
        ),
    ):
        with pytest.raises(ConfigError, match=problem):
            check_fleet(load(environ=environ))
    check_fleet(load(environ={**with_s3, "REGMIRROR_FLEET__SECRET": "s"}))


async def test_a_store_that_ignores_conditional_writes_turns_fleet_mode_off_with_a_warning(
    rig: Rig,
) -> None:
    image = await rig.image("fleet/unconditional", 256 * 1024)

    async with serve(s3_front(rig.session, rig.moto, forget_conditions=True)) as store:
        fleet = rig.fleet(2, extra={"REGMIRROR_S3__ENDPOINT_URL": store})
        for host in fleet.hosts:
            await pull_manifest(rig.session, host, image)
        rig.proxy.hold_after = 64 * 1024
        pulls = [asyncio.create_task(pull_blob(rig.session, h, image)) for h in fleet.hosts]
        for _ in range(int(BOUND / 0.05)):
            if rig.proxy.blob_gets == 2:
                break
            await asyncio.sleep(0.05)
        rig.proxy.release.set()
        assert await asyncio.gather(*pulls) == [image.layer, image.layer]
    assert rig.proxy.blob_gets == 2  # every host fills on its own, as without fleet mode
    assert all("ignores conditional writes" in host.logs() for host in fleet.hosts)
    assert not any("/leases/" in key for key in rig.moto.keys(fleet.bucket))


async def test_with_auth_on_the_peer_credential_opens_the_peer_endpoint_and_nothing_else(
    rig: Rig,
    tmp_path: Path,
) -> None:
    image = await rig.image("fleet/private", 64 * 1024)
    htpasswd = write_htpasswd(tmp_path / "htpasswd", {"ci": "ci-password"})
    auth = {
        "REGMIRROR_AUTH__HTPASSWD": str(htpasswd),
        "REGMIRROR_AUTH__ANONYMOUS_PULL": "[]",
    }
    fleet = rig.fleet(2, extra=auth, ready_status=401)
    owner, peer = fleet.hosts
    manifest = f"/v2/{image.repo}/manifests/{image.tag}"
    layer = f"/v2/{image.repo}/blobs/{image.layer_digest}"
    for path in (manifest, layer, "/v2/"):
        signed = {"Authorization": credential.sign(SECRET, "GET", path)}
        async with rig.session.get(f"{owner.url}{path}", headers=signed) as response:
            assert response.status == 401, path  # the peer credential is no login
    ci = basic("ci", "ci-password")
    async with rig.session.get(
        f"{owner.url}{manifest}", headers={**ci, "Accept": DOCKER_MANIFEST}
    ) as response:
        assert response.status == 200
    async with rig.session.get(f"{peer.url}{layer}", headers=ci) as response:
        assert response.status == 200 and await response.read() == image.layer
    path = f"/-/fleet/blobs/{image.layer_digest}"
    async with rig.session.get(f"{peer.url}{path}", headers=ci) as response:
        assert response.status == 401  # a user's login is not the peer credential
    signed = {"Authorization": credential.sign(SECRET, "GET", path)}
    async with rig.session.get(f"{peer.url}{path}", headers=signed) as response:
        assert response.status == 200 and await response.read() == image.layer


async def test_a_blob_whose_s3_read_breaks_mid_way_is_finished_through_the_fleet(rig: Rig) -> None:
    image = await rig.image("fleet/s3-breaks", 2 * MiB)
    fleet = rig.fleet(1)
    await pull_manifest(rig.session, fleet.hosts[0], image)
    assert await pull_blob(rig.session, fleet.hosts[0], image) == image.layer
    await fleet.until_gone(fleet.lease_key(image.layer_digest))  # written back to S3
    async with serve(s3_front(rig.session, rig.moto, cut_blobs_after=512 * 1024)) as store:
        extra = {"REGMIRROR_S3__ENDPOINT_URL": store, "REGMIRROR_S3__BUCKET": fleet.bucket}
        late = rig.fleet(1, extra=extra)
        (host,) = late.hosts
        await pull_manifest(rig.session, host, image)
        assert await asyncio.wait_for(pull_blob(rig.session, host, image), BOUND) == image.layer
    assert rig.proxy.blob_gets == 2  # the first host's, and one ranged GET for the rest
    text = await metrics(rig.session, host)
    received = 'regmirror_fleet_fill_bytes_total{source="%s"}'
    assert sample(text, received % "s3") >= 512 * 1024
    assert sample(text, received % "s3") + sample(text, received % "upstream") == len(image.layer)

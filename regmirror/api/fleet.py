"""The peer endpoint: ``GET /-/fleet/blobs/<digest>``, for the other hosts of the fleet.

It serves one thing, a blob this host holds or is filling, by digest, and only to a
request signed with ``fleet.secret`` (:mod:`regmirror.fleet.credential`); the access
rules of ``auth`` do not apply and the peer credential opens nothing under ``/v2/``. A
fill in progress is streamed as it grows, its last byte only once the digest is
verified, exactly as to a local client; a failed fill cuts the connection. Nothing is
fetched for a peer: a blob this host neither holds nor fills is 404.

The peer names the host (``fleet.advertise_url``), and the kernel hands its connection
to any of the host's workers: the fill may run in another one, whose partial file this
worker then follows (:meth:`~regmirror.fill.Fills.follow`), as its own waiters would.
"""

from __future__ import annotations

from aiohttp import web

from regmirror import layout
from regmirror.api import blobs, params
from regmirror.api.keys import FLEET, REGISTRY
from regmirror.errors import BlobUnknown, Unauthorized
from regmirror.fill import Fill
from regmirror.fleet import credential
from regmirror.fleet.peers import PATH
from regmirror.storage.driver import PathNotFound
from regmirror.stored import StoredBlob, blob_headers


async def get_peer_blob(request: web.Request) -> web.StreamResponse:
    secret = request.app[FLEET].secret
    if secret is None or not credential.verify(
        secret, request.headers.get("Authorization"), request.method, request.path
    ):
        raise Unauthorized(
            "the fleet endpoint serves peers only: sign with fleet.secret",
            headers={"WWW-Authenticate": credential.SCHEME},
        )
    digest = params.digest(request.match_info["digest"])
    registry = request.app[REGISTRY]
    hold = await registry.cache.hold(digest)
    try:
        found: StoredBlob | Fill | None = await registry.fills.follow(digest)
        if found is None:
            key = layout.blob_data(digest)
            try:
                size = await registry.local.stat(key)
                found = StoredBlob(registry.local.path(key), size, blob_headers(digest, size))
            except PathNotFound:
                found = None
    except BaseException:
        hold.release()
        raise
    if found is None:
        hold.release()
        raise BlobUnknown(f"this host neither holds nor fills {digest}", {"digest": str(digest)})
    return await blobs.respond(request, found, digest, hold)


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, get_peer_blob, allow_head=False)

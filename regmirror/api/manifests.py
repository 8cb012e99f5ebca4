"""Manifest GET / HEAD / PUT / DELETE by tag or digest."""

from __future__ import annotations

import functools

from aiohttp import web

from regmirror.api import params
from regmirror.api.keys import REGISTRY
from regmirror.errors import ManifestTooLarge
from regmirror.manifest import MAX_MANIFEST_BYTES


async def get_manifest(request: web.Request) -> web.Response:
    name = params.name(request)
    reference = params.known_reference(request)
    manifest = await request.app[REGISTRY].manifest(
        name,
        reference,
        ns=request.query.get("ns"),
        accept=accepted(tuple(request.headers.getall("Accept", ()))),
    )
    headers = manifest.headers  # built once per manifest
    if headers["ETag"] in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    if request.method == "HEAD":
        return web.Response(headers={**headers, "Content-Length": str(len(manifest.raw))})
    return web.Response(body=manifest.raw, headers=headers)


@functools.lru_cache(maxsize=256)
def accepted(values: tuple[str, ...]) -> tuple[str, ...]:
    """The media types of ``Accept`` header values, without parameters. Clients send the
    same few lists again and again: each is parsed once."""
    return tuple(
        media_type.split(";")[0].strip()
        for header in values
        for media_type in header.split(",")
        if media_type.strip()
    )


async def put_manifest(request: web.Request) -> web.Response:
    name = params.name(request)
    reference = params.reference(request)
    raw = await _read_capped(request)
    manifest = await request.app[REGISTRY].put_manifest(
        name, reference, raw, request.headers.get("Content-Type")
    )
    headers = {
        "Location": f"/v2/{name}/manifests/{manifest.digest}",
        "Docker-Content-Digest": str(manifest.digest),
    }
    if manifest.subject is not None:
        headers["OCI-Subject"] = str(manifest.subject.digest)
    return web.Response(status=201, headers=headers)


async def delete_manifest(request: web.Request) -> web.Response:
    name = params.name(request)
    reference = params.reference(request)
    await request.app[REGISTRY].delete_manifest(name, reference)
    return web.Response(status=202)


async def _read_capped(request: web.Request) -> bytes:
    """The body, refusing more than the manifest cap without reading it all."""
    declared = params.content_length(request)
    if declared is not None and declared > MAX_MANIFEST_BYTES:
        raise ManifestTooLarge(f"manifest is {declared} bytes; at most {MAX_MANIFEST_BYTES}")
    body = bytearray()
    async for chunk in request.content.iter_any():
        body += chunk
        if len(body) > MAX_MANIFEST_BYTES:
            raise ManifestTooLarge(f"manifest exceeds {MAX_MANIFEST_BYTES} bytes")
    return bytes(body)

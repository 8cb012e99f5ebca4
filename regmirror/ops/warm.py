"""``regmirror warm``: pull every manifest and blob of some images through a running regmirror.

It goes through the Registry API like any client, so regmirror's fills, coalescing and
S3 write-back apply and any number of hosts can warm at once; afterwards a pull of the
same image is served from local disk. The client is :class:`~regmirror.upstream.Upstream`
(the one regmirror uses for its own upstreams: Basic or Bearer token auth, redirects,
manifest digests verified); blob bodies are read to the end and verified here, so an
image reported warm was seen, byte for byte, with the digests its manifests name.

Images are warmed concurrently: at most ``jobs`` images read their manifests at once and
at most ``jobs`` blob downloads are in flight overall; a blob shared by several images
(or platforms) is downloaded once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp

from regmirror.config import UpstreamSettings
from regmirror.digest import Digest
from regmirror.errors import ManifestUnknown, RegistryError
from regmirror.manifest import INDEX_TYPES, Descriptor, Manifest, parse
from regmirror.ops.reference import ImageReference, Platform
from regmirror.upstream import Upstream

ATTEMPTS = 2  # a blob whose download breaks (a failed fill aborts it) is asked once more
MAX_INDEX_DEPTH = 4  # an index of indexes of ... (real ones nest at most 2 deep)


class WarmFailed(Exception):
    """An image that cannot be warmed: what went wrong, for the summary."""


@dataclass
class ImageResult:
    """What warming one reference did; ``error`` is None when every byte was verified."""

    reference: str
    error: str | None = None
    digest: str | None = None  # of the manifest the reference names
    platforms: list[str] = field(default_factory=list)
    manifests: int = 0
    blobs: int = 0
    total_bytes: int = 0  # of the blobs, as the manifests give their sizes
    done_bytes: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict[str, object]:
        return {
            "reference": self.reference,
            "ok": self.ok,
            "error": self.error,
            "digest": self.digest,
            "platforms": self.platforms,
            "manifests": self.manifests,
            "blobs": self.blobs,
            "bytes": self.total_bytes,
            "seconds": round(self.seconds, 3),
        }


class WarmProgress(Protocol):
    """What a display is told. ``planned`` comes once an image's manifests are read."""

    def planned(self, image: ImageResult) -> None: ...
    def advanced(self, image: ImageResult, nbytes: int) -> None: ...
    def finished(self, image: ImageResult) -> None: ...


class _Quiet:
    def planned(self, image: ImageResult) -> None:
        pass

    def advanced(self, image: ImageResult, nbytes: int) -> None:
        pass

    def finished(self, image: ImageResult) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _Blob:
    client: Upstream
    name: str
    descriptor: Descriptor


class Warmer:
    """Warms images through the regmirror at ``url`` with the client ``session``."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        *,
        username: str | None = None,
        password: str | None = None,
        platforms: Sequence[Platform] = (),
        jobs: int = 4,
        progress: WarmProgress | None = None,
    ):
        self.url = url.rstrip("/")
        self.session = session
        self.username = username
        self.password = password
        self.platforms = list(platforms)
        self.progress: WarmProgress = progress or _Quiet()
        self._slots = asyncio.Semaphore(max(1, jobs))  # blob downloads in flight
        self._planning = asyncio.Semaphore(max(1, jobs))  # images reading their manifests
        self._clients: dict[str | None, Upstream] = {}
        # One download per (registry, repository, digest), however many images share it.
        self._downloads: dict[tuple[str | None, str, Digest], asyncio.Task[None]] = {}

    async def warm(self, references: Sequence[ImageReference]) -> list[ImageResult]:
        """Warm every reference; one result each, in order. Never raises for an image."""
        results = [ImageResult(ref.text) for ref in references]
        await asyncio.gather(*(self._warm(ref, res) for ref, res in zip(references, results)))
        return results

    def _client(self, ns: str | None) -> Upstream:
        client = self._clients.get(ns)
        if client is None:
            settings = UpstreamSettings(self.url, username=self.username, password=self.password)
            query = {"ns": ns} if ns else None
            client = self._clients[ns] = Upstream(settings, self.session, query=query)
        return client

    async def _warm(self, ref: ImageReference, result: ImageResult) -> None:
        started = time.monotonic()
        try:
            async with self._planning:
                client, name, blobs = await self._plan(ref, result)
            result.blobs = len(blobs)
            result.total_bytes = sum(d.size for d in blobs)
            self.progress.planned(result)
            outcomes = await asyncio.gather(
                *(self._blob(client, name, d, result) for d in blobs), return_exceptions=True
            )
            errors = [e for e in outcomes if isinstance(e, BaseException)]
            if errors:
                more = f" (and {len(errors) - 1} more blobs failed)" if len(errors) > 1 else ""
                raise WarmFailed(_describe(errors[0]) + more) from errors[0]
        except ManifestUnknown:
            result.error = f"no manifest {ref.text} at {self.url} (nor at its upstream)"
        except (WarmFailed, RegistryError, aiohttp.ClientError, TimeoutError, OSError) as exc:
            result.error = _describe(exc)
        result.seconds = time.monotonic() - started
        self.progress.finished(result)

    # -- manifests -----------------------------------------------------------

    async def _plan(
        self, ref: ImageReference, result: ImageResult
    ) -> tuple[Upstream, str, list[Descriptor]]:
        """Fetch the reference's manifests (the chosen platforms of an index); the
        client and name that found them, and the distinct blobs they reference."""
        client, name = self._client(ref.ns), ref.name
        try:
            top = await self._manifest(client, name, ref.reference, result)
        except ManifestUnknown:
            if ref.unqualified is None:
                raise
            # No upstream answers that ns: maybe a prefix route spelt like a host.
            client, name = self._client(None), ref.unqualified
            top = await self._manifest(client, name, ref.reference, result)
        result.digest = str(top.digest)
        blobs: dict[Digest, Descriptor] = {}
        await self._collect(client, name, top, result, blobs, depth=0)
        return client, name, list(blobs.values())

    async def _manifest(
        self, client: Upstream, name: str, reference: str, result: ImageResult
    ) -> Manifest:
        raw, media_type, digest = await client.get_manifest(name, reference)
        result.manifests += 1
        return parse(raw, media_type, digest)

    async def _collect(
        self,
        client: Upstream,
        name: str,
        manifest: Manifest,
        result: ImageResult,
        blobs: dict[Digest, Descriptor],
        depth: int,
    ) -> None:
        if manifest.media_type not in INDEX_TYPES:
            for blob in manifest.blobs:
                if not blob.foreign:  # non-distributable layers live at their urls, not here
                    blobs.setdefault(blob.digest, blob)
            return
        if depth >= MAX_INDEX_DEPTH:
            raise WarmFailed(f"{manifest.digest}: indexes nest more than {MAX_INDEX_DEPTH} deep")
        for descriptor, platform in self._choose(manifest):  # a few small requests
            child = await self._manifest(client, name, str(descriptor.digest), result)
            if platform and platform not in result.platforms:
                result.platforms.append(platform)
            await self._collect(client, name, child, result, blobs, depth + 1)

    def _choose(self, index: Manifest) -> list[tuple[Descriptor, str]]:
        """The index's entries to warm with their platforms: all, or the chosen ones
        (an entry without a platform, like an attestation, goes with all only)."""
        entries = json.loads(index.raw).get("manifests", [])
        chosen = []
        for child, entry in zip(index.children, entries):
            platform = entry.get("platform") if isinstance(entry, dict) else None
            if not self.platforms or any(p.matches(platform) for p in self.platforms):
                chosen.append((child, _platform_text(platform)))
        if not chosen:
            wanted = ", ".join(map(str, self.platforms))
            offered = ", ".join(
                sorted({_platform_text(e.get("platform")) for e in entries if isinstance(e, dict)})
            )
            raise WarmFailed(f"no manifest for {wanted} in the index (it has {offered or 'none'})")
        return chosen

    # -- blobs ---------------------------------------------------------------

    async def _blob(
        self, client: Upstream, name: str, descriptor: Descriptor, result: ImageResult
    ) -> None:
        key = (client.query.get("ns"), name, descriptor.digest)
        task = self._downloads.get(key)
        if task is None:
            blob = _Blob(client, name, descriptor)
            task = self._downloads[key] = asyncio.ensure_future(self._download(blob, result))
            await task
            return
        await task  # another image is downloading it: its bytes count there
        result.done_bytes += descriptor.size
        self.progress.advanced(result, descriptor.size)

    async def _download(self, blob: _Blob, result: ImageResult) -> None:
        async with self._slots:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    await self._read(blob, result)
                    return
                except (RegistryError, aiohttp.ClientError, TimeoutError) as exc:
                    if attempt == ATTEMPTS:
                        raise WarmFailed(
                            f"blob {blob.descriptor.digest}: {_describe(exc)}"
                        ) from exc

    async def _read(self, blob: _Blob, result: ImageResult) -> None:
        """GET the blob, hash it to the end, check its size and digest."""
        digest, size = blob.descriptor.digest, blob.descriptor.size
        stream = await blob.client.open_blob(blob.name, digest)
        hasher = digest.hasher()
        read = 0
        try:
            async for chunk in stream.chunks:
                hasher.update(chunk)
                read += len(chunk)
                result.done_bytes += len(chunk)
                self.progress.advanced(result, len(chunk))
        except BaseException:
            await stream.chunks.aclose()
            result.done_bytes -= read  # a retry counts them again
            self.progress.advanced(result, -read)
            raise
        if read != size:
            raise WarmFailed(f"blob {digest}: got {read} bytes, its manifest says {size}")
        if hasher.hexdigest() != digest.hex:
            raise WarmFailed(f"blob {digest}: the bytes served hash to {hasher.hexdigest()}")


def _platform_text(platform: object) -> str:
    if not isinstance(platform, dict):
        return ""
    parts = (platform.get("os"), platform.get("architecture"), platform.get("variant"))
    return "/".join(str(p) for p in parts if p)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RegistryError):
        return exc.message
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__

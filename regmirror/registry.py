"""The registry façade: repositories, their links, tags and manifests, over the stores.

Content lives in registry:2's layout (:mod:`regmirror.layout`): a blob is served
under a repository only when the repository links it, as registry:2 does, so a
digest known from one image does not leak through another name.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from cachetools import LRUCache

from regmirror import layout
from regmirror.digest import Digest
from regmirror.errors import (
    BlobUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
)
from regmirror.manifest import Descriptor, Manifest, media_type_of, parse
from regmirror.storage.driver import PathNotFound
from regmirror.storage.filesystem import FilesystemDriver

# Parsed manifests by digest (immutable), bounded by their total size in bytes.
MANIFEST_CACHE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoredBlob:
    path: Path
    size: int


class Registry:
    def __init__(self, *, local: FilesystemDriver):
        self.local = local
        self._manifests: LRUCache[Digest, Manifest] = LRUCache(
            MANIFEST_CACHE_BYTES, getsizeof=lambda m: len(m.raw)
        )

    # -- blobs ---------------------------------------------------------------

    async def blob(self, name: str, digest: Digest) -> StoredBlob:
        """The stored blob ``digest`` as seen from repository ``name``."""
        if not await self.is_linked(name, digest):
            raise BlobUnknown(f"blob {digest} is not known in {name}", {"digest": str(digest)})
        key = layout.blob_data(digest)
        try:
            size = await self.local.stat(key)
        except PathNotFound as exc:
            raise BlobUnknown(f"blob {digest} is not stored", {"digest": str(digest)}) from exc
        return StoredBlob(self.local.path(key), size)

    async def is_linked(self, name: str, digest: Digest) -> bool:
        return await self._exists(layout.layer_link(name, digest)) or await self._exists(
            layout.revision_link(name, digest)
        )

    async def commit_blob(self, name: str, digest: Digest, data: Path) -> None:
        """Take a verified, fsynced upload file into the store and link it to ``name``."""
        key = layout.blob_data(digest)
        if await self._exists(key):
            await asyncio.to_thread(data.unlink, True)
        else:
            await self.local.move_in(key, data)
        await self._link(layout.layer_link(name, digest), digest)

    async def mount(self, name: str, source: str, digest: Digest) -> bool:
        """Link a blob that ``source`` holds into ``name``; False when ``source`` lacks it."""
        if not await self.is_linked(source, digest) or not await self._exists(
            layout.blob_data(digest)
        ):
            return False
        await self._link(layout.layer_link(name, digest), digest)
        return True

    async def delete_blob(self, name: str, digest: Digest) -> None:
        key = layout.layer_link(name, digest)
        if not await self._exists(key):
            raise BlobUnknown(f"blob {digest} is not known in {name}", {"digest": str(digest)})
        await self.local.delete(key.removesuffix("/link"))

    # -- manifests -----------------------------------------------------------

    async def manifest(self, name: str, reference: str | Digest) -> Manifest:
        digest = await self.resolve(name, reference)
        if not await self._exists(layout.revision_link(name, digest)):
            raise ManifestUnknown(
                f"manifest {digest} is not known in {name}", {"reference": str(reference)}
            )
        return await self._load_manifest(digest)

    async def resolve(self, name: str, reference: str | Digest) -> Digest:
        if isinstance(reference, Digest):
            return reference
        try:
            return await self._read_link(layout.tag_current_link(name, reference))
        except PathNotFound as exc:
            raise ManifestUnknown(
                f"tag {reference!r} is not known in {name}", {"tag": reference}
            ) from exc

    async def put_manifest(
        self, name: str, reference: str | Digest, raw: bytes, content_type: str | None
    ) -> Manifest:
        """Validate and store a manifest; every blob and child it names must be in ``name``."""
        algorithm = reference.algorithm if isinstance(reference, Digest) else "sha256"
        manifest = parse(raw, content_type, Digest.of(raw, algorithm))
        if isinstance(reference, Digest) and manifest.digest != reference:
            raise DigestInvalid(
                f"manifest content has digest {manifest.digest}, not {reference}",
                {"expected": str(reference), "actual": str(manifest.digest)},
            )
        await self._check_references(name, manifest)
        await self.local.put(layout.blob_data(manifest.digest), raw)
        await self._link(layout.revision_link(name, manifest.digest), manifest.digest)
        if manifest.subject is not None:
            key = layout.referrer_link(name, manifest.subject.digest, manifest.digest)
            await self._link(key, manifest.digest)
        if isinstance(reference, str):
            await self._link(layout.tag_index_link(name, reference, manifest.digest), manifest.digest)
            await self._link(layout.tag_current_link(name, reference), manifest.digest)
        self._manifests[manifest.digest] = manifest
        return manifest

    async def delete_manifest(self, name: str, reference: str | Digest) -> None:
        """Delete a tag, or a manifest together with the tags that point at it."""
        if isinstance(reference, str):
            await self.resolve(name, reference)
            await self.local.delete(layout.tag(name, reference))
            return
        manifest = await self.manifest(name, reference)
        for tag in await self.tags(name):
            try:
                if await self.resolve(name, tag) == reference:
                    await self.local.delete(layout.tag(name, tag))
            except ManifestUnknown:
                continue  # deleted concurrently
        if manifest.subject is not None:
            link = layout.referrer_link(name, manifest.subject.digest, reference)
            await self.local.delete(link.removesuffix("/link"))
        await self.local.delete(layout.revision_link(name, reference).removesuffix("/link"))

    async def _check_references(self, name: str, manifest: Manifest) -> None:
        for blob in manifest.blobs:
            if blob.foreign:
                continue  # non-distributable layers live at their urls
            if not await self._exists(layout.layer_link(name, blob.digest)):
                raise ManifestBlobUnknown(
                    f"blob {blob.digest} ({blob.media_type}) is not pushed to {name}",
                    {"digest": str(blob.digest)},
                )
        for child in manifest.children:
            if not await self._exists(layout.revision_link(name, child.digest)):
                raise ManifestBlobUnknown(
                    f"manifest {child.digest} is not pushed to {name}",
                    {"digest": str(child.digest)},
                )

    async def _load_manifest(self, digest: Digest) -> Manifest:
        cached = self._manifests.get(digest)
        if cached is not None:
            return cached
        try:
            raw = await self.local.get(layout.blob_data(digest))
        except PathNotFound as exc:
            raise ManifestUnknown(f"manifest {digest} is not stored") from exc
        try:
            manifest = parse(raw, None, digest)
        except ManifestInvalid:
            # Stored by another registry in a form we would not accept: serve it as is.
            manifest = Manifest(media_type_of(raw), raw, digest, (), (), None, None, None)
        self._manifests[digest] = manifest
        return manifest

    # -- listings ------------------------------------------------------------

    async def tags(self, name: str) -> list[str]:
        if not await self._exists_dir(layout.repository(name)):
            raise NameUnknown(f"repository {name} is not known", {"name": name})
        try:
            return await self.local.list(layout.tags(name))
        except PathNotFound:
            return []

    async def catalog(self) -> list[str]:
        return sorted(await self._walk_repositories(layout.REPOSITORIES, ""))

    async def referrers(self, name: str, subject: Digest) -> list[Descriptor]:
        try:
            algorithms = await self.local.list(layout.referrers(name, subject))
        except PathNotFound:
            return []
        found = []
        for algorithm in algorithms:
            base = f"{layout.referrers(name, subject)}/{algorithm}"
            for encoded in await self._list_or_empty(base):
                try:
                    digest = await self._read_link(f"{base}/{encoded}/link")
                    found.append((await self._load_manifest(digest)).describe())
                except (PathNotFound, ManifestUnknown):
                    continue  # deleted while we listed
        return found

    async def _walk_repositories(self, key: str, prefix: str) -> list[str]:
        names = []
        children = await self._list_or_empty(key)
        if prefix and ("_manifests" in children or "_layers" in children):
            names.append(prefix.rstrip("/"))
        for child in children:
            if not child.startswith("_"):
                names += await self._walk_repositories(f"{key}/{child}", f"{prefix}{child}/")
        return names

    # -- links ---------------------------------------------------------------

    async def _link(self, key: str, digest: Digest) -> None:
        await self.local.put(key, str(digest).encode())

    async def _read_link(self, key: str) -> Digest:
        text = (await self.local.get(key)).decode("ascii", "replace").strip()
        try:
            return Digest.parse(text)
        except DigestInvalid as exc:
            raise PathNotFound(f"{key} holds no valid digest") from exc

    async def _exists(self, key: str) -> bool:
        try:
            await self.local.stat(key)
        except PathNotFound:
            return False
        return True

    async def _exists_dir(self, key: str) -> bool:
        try:
            await self.local.list(key)
        except PathNotFound:
            return False
        return True

    async def _list_or_empty(self, key: str) -> list[str]:
        try:
            return await self.local.list(key)
        except PathNotFound:
            return []

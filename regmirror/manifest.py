"""Manifests of every common media type: parsed, validated, and what they reference.

Docker schema2 manifests and manifest lists, OCI image manifests and indexes, and
OCI artifacts (image manifests with ``artifactType``). The media type of a stored
manifest is derived from its bytes, as registry:2 does, so that a manifest stored
by another registry in the shared layout reads back with the right type.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from regmirror.digest import Digest
from regmirror.errors import DigestInvalid, ManifestInvalid, ManifestTooLarge

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
IMAGE_TYPES = (DOCKER_MANIFEST, OCI_MANIFEST)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
MEDIA_TYPES = IMAGE_TYPES + INDEX_TYPES

# The spec asks registries to accept manifests of at least 4 MiB.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
# Real manifests nest about 5 deep (index > manifests > descriptor > platform > features).
MAX_DEPTH = 64
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None
    foreign: bool = False  # has ``urls``: content lives elsewhere, need not be pushed

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    raw: bytes
    digest: Digest
    blobs: tuple[Descriptor, ...]  # config and layers
    children: tuple[Descriptor, ...]  # manifests of an index
    subject: Descriptor | None
    artifact_type: str | None
    annotations: dict[str, str] | None
    # What a GET answering with it sends besides the body (Content-Length is the body's),
    # built once: manifests are kept in memory and served again and again.
    headers: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        headers = {
            "Docker-Content-Digest": str(self.digest),
            "ETag": f'"{self.digest}"',
            "Content-Type": self.media_type,
        }
        object.__setattr__(self, "headers", MappingProxyType(headers))

    def describe(self) -> Descriptor:
        return Descriptor(
            self.media_type,
            self.digest,
            len(self.raw),
            self.artifact_type,
            self.annotations,
        )


def parse(raw: bytes, content_type: str | None, digest: Digest | None = None) -> Manifest:
    """Parse and validate a manifest; ``content_type`` is what the client declared."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestTooLarge(
            f"manifest is {len(raw)} bytes; at most {MAX_MANIFEST_BYTES} accepted",
            {"size": len(raw), "limit": MAX_MANIFEST_BYTES},
        )
    body = _load_json(raw)
    if not isinstance(body, dict):
        raise ManifestInvalid("manifest must be a JSON object")
    media_type = _media_type(body, content_type)
    if body.get("schemaVersion") != 2:
        raise ManifestInvalid(
            "schemaVersion must be 2", {"schemaVersion": body.get("schemaVersion")}
        )
    if digest is None:
        digest = Digest.of(raw)
    if media_type in INDEX_TYPES:
        # Required by the image spec; without it, an image body sent as an index
        # would be stored with none of its blobs checked.
        if not isinstance(body.get("manifests"), list):
            raise ManifestInvalid("index has no manifests list")
        blobs: tuple[Descriptor, ...] = ()
        children = tuple(_descriptors(body, "manifests"))
        artifact_type = _optional_str(body, "artifactType")
    else:
        if not isinstance(body.get("config"), dict):
            raise ManifestInvalid("image manifest has no config descriptor")
        config = _descriptor(body["config"], "config")
        blobs = (config, *_descriptors(body, "layers"))
        children = ()
        artifact_type = _optional_str(body, "artifactType") or config.media_type
    subject = _descriptor(body["subject"], "subject") if "subject" in body else None
    return Manifest(
        media_type=media_type,
        raw=raw,
        digest=digest,
        blobs=blobs,
        children=children,
        subject=subject,
        artifact_type=artifact_type,
        annotations=_annotations(body.get("annotations"), "annotations"),
    )


def media_type_of(raw: bytes) -> str:
    """The media type of stored manifest bytes (already validated when stored)."""
    try:
        body = _load_json(raw)
    except ManifestInvalid:
        return OCI_MANIFEST
    if isinstance(body, dict):
        declared = body.get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
        if "manifests" in body:
            return OCI_INDEX
    return OCI_MANIFEST


def _load_json(raw: bytes) -> Any:
    """``json.loads`` with the nesting bounded first: the decoder recurses per level, and
    a body of 4 MiB of brackets must be a 400, not a RecursionError."""
    depth = _depth(raw)
    if depth > MAX_DEPTH:
        raise ManifestInvalid(
            f"manifest JSON nests {depth} levels deep; at most {MAX_DEPTH} accepted",
            {"depth": depth, "limit": MAX_DEPTH},
        )
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestInvalid(f"manifest is not valid JSON: {exc}") from exc


def _depth(raw: bytes) -> int:
    """The deepest bracket nesting outside strings (of well-formed JSON; any bytes are safe)."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    steps = (1 if b in b"[{" else -1 for b in brackets)
    return max(itertools.accumulate(steps, initial=0))


def _media_type(body: dict[str, Any], content_type: str | None) -> str:
    declared = body.get("mediaType")
    header = (content_type or "").split(";")[0].strip().lower() or None
    if declared is not None and not isinstance(declared, str):
        raise ManifestInvalid("mediaType must be a string")
    if header in DOCKER_SCHEMA1 or declared in DOCKER_SCHEMA1:
        raise ManifestInvalid("Docker schema1 manifests are not supported; push schema2 or OCI")
    if declared and header in MEDIA_TYPES and declared != header:
        raise ManifestInvalid(
            f"Content-Type {header!r} does not match the manifest's mediaType {declared!r}",
            {"contentType": header, "mediaType": declared},
        )
    media_type = declared or (header if header in MEDIA_TYPES else None)
    if media_type is None:
        # OCI lets mediaType be omitted; tell an index from an image by its shape.
        media_type = OCI_INDEX if "manifests" in body else OCI_MANIFEST
    if media_type not in MEDIA_TYPES:
        raise ManifestInvalid(
            f"unsupported manifest media type {media_type!r}",
            {"mediaType": media_type, "supported": list(MEDIA_TYPES)},
        )
    return media_type


def _descriptors(body: dict[str, Any], field: str) -> list[Descriptor]:
    items = body.get(field, [])
    if not isinstance(items, list):
        raise ManifestInvalid(f"{field} must be a list")
    return [_descriptor(item, f"{field}[{i}]") for i, item in enumerate(items)]


def _descriptor(item: Any, where: str) -> Descriptor:
    if not isinstance(item, dict):
        raise ManifestInvalid(f"{where} must be a descriptor object")
    media_type = item.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestInvalid(f"{where}.mediaType must be a non-empty string")
    size = item.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestInvalid(f"{where}.size must be a non-negative integer")
    digest_text = item.get("digest")
    if not isinstance(digest_text, str):
        raise ManifestInvalid(f"{where}.digest must be a string")
    try:
        digest = Digest.parse(digest_text)
    except DigestInvalid as exc:
        raise ManifestInvalid(f"{where}.digest: {exc.message}") from exc
    urls = item.get("urls")
    return Descriptor(
        media_type=media_type,
        digest=digest,
        size=size,
        artifact_type=_optional_str(item, "artifactType"),
        annotations=_annotations(item.get("annotations"), f"{where}.annotations"),
        foreign=isinstance(urls, list) and bool(urls),
    )


def _optional_str(body: dict[str, Any], field: str) -> str | None:
    value = body.get(field)
    if value is not None and not isinstance(value, str):
        raise ManifestInvalid(f"{field} must be a string")
    return value or None


def _annotations(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestInvalid(f"{where} must map strings to strings")
    return value

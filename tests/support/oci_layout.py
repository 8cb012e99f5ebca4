"""OCI image layouts built on disk from generated content (OCI image spec, image-layout.md).

- :func:`build_image` makes one image in memory: gzip'd tar layers of random files, a
  config whose ``rootfs.diff_ids`` are the digests of the uncompressed tars, and the
  manifest, all with their exact digests and sizes.
- :func:`write_image_layout` / :func:`write_index_layout` write a single-platform image
  or a multi-platform image index to an ``oci:`` layout directory (``oci-layout``,
  ``index.json`` with ``org.opencontainers.image.ref.name``, ``blobs/sha256/...``).
- :func:`read_layout` reads any layout back (e.g. one skopeo wrote) so tests can compare
  blobs byte for byte.

Content is random but seeded, so a test can rebuild the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
MiB = 1024 * 1024

# Files per layer: name -> size. Sizes cover empty, tiny, block-sized, ~300 KiB and 5 MiB.
DEFAULT_LAYERS: tuple[Mapping[str, int], ...] = (
    {"etc/hostname": 9, "etc/empty": 0, "usr/lib/tiny": 1},
    {"usr/bin/tool": 4096, "usr/share/data.bin": 300 * 1024 + 7},
    {"opt/big/blob.bin": 5 * MiB},
    {"srv/a": 123, "srv/b": 65536, "srv/c": 1000},
)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Blob:
    """Bytes with the descriptor that names them."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha256(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}


@dataclass
class Image:
    """One image: its config, its layers (compressed) and its manifest."""

    config: Blob
    layers: list[Blob]
    manifest: Blob
    diff_ids: list[str]
    platform: dict[str, str]

    @property
    def blobs(self) -> dict[str, bytes]:
        """Every blob the manifest references, by digest (the manifest not included)."""
        return {b.digest: b.data for b in [self.config, *self.layers]}


@dataclass
class Layout:
    """What was written to (or read from) an OCI layout directory."""

    path: Path
    index: dict[str, Any]
    blobs: dict[str, bytes] = field(default_factory=dict)  # every file under blobs/, by digest

    def ref(self, name: str) -> dict[str, Any]:
        """The ``index.json`` descriptor annotated with ``ref.name == name``."""
        for descriptor in self.index["manifests"]:
            if descriptor.get("annotations", {}).get(REF_NAME) == name:
                return dict(descriptor)
        raise KeyError(f"{self.path}: no manifest named {name!r} in index.json")


def layer_tar(files: Mapping[str, int], rng: random.Random) -> bytes:
    """An uncompressed tar of ``files`` (path -> size) filled with random bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories: set[str] = set()
        for path in sorted(files):
            parts = path.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in directories:
                    directories.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(info)
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = files[path], 0o644, 0
            tar.addfile(info, io.BytesIO(rng.randbytes(files[path])))
    return buffer.getvalue()


def build_image(
    *,
    seed: int = 1,
    layers: Sequence[Mapping[str, int]] = DEFAULT_LAYERS,
    os_name: str = "linux",
    architecture: str = "amd64",
    variant: str | None = None,
) -> Image:
    """An image whose layers hold ``layers`` (one mapping of path -> size per layer)."""
    rng = random.Random(seed)
    tars = [layer_tar(files, rng) for files in layers]
    compressed = [Blob(OCI_LAYER_GZIP, gzip.compress(t, compresslevel=6, mtime=0)) for t in tars]
    diff_ids = [sha256(t) for t in tars]
    platform = {"architecture": architecture, "os": os_name}
    if variant is not None:
        platform["variant"] = variant
    config_json = {
        **platform,
        "created": "2024-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/usr/bin/tool"],
            "Labels": {"test.seed": str(seed)},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "2024-01-01T00:00:00Z", "created_by": f"layer {i}"}
            for i in range(len(tars))
        ],
    }
    config = Blob(OCI_CONFIG, canonical_json(config_json))
    manifest_json = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in compressed],
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    }
    manifest = Blob(OCI_MANIFEST, json.dumps(manifest_json, indent=2).encode())
    return Image(config, compressed, manifest, diff_ids, platform)


def _write_blobs(path: Path, blobs: Iterable[Blob]) -> dict[str, bytes]:
    written: dict[str, bytes] = {}
    for blob in blobs:
        algorithm, hex_digest = blob.digest.split(":", 1)
        target = path / "blobs" / algorithm / hex_digest
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob.data)
        written[blob.digest] = blob.data
    return written


def _write_index(path: Path, manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    (path / "index.json").write_text(json.dumps(index, indent=2))
    return index


def write_image_layout(path: Path, image: Image, ref_name: str = "latest") -> Layout:
    """``path`` as an OCI layout holding ``image`` under ``ref_name`` (``oci:path:ref_name``)."""
    path.mkdir(parents=True, exist_ok=True)
    blobs = _write_blobs(path, [image.config, *image.layers, image.manifest])
    index = _write_index(path, [image.manifest.descriptor(annotations={REF_NAME: ref_name})])
    return Layout(path, index, blobs)


@dataclass
class MultiPlatformImage:
    """An image index and its per-platform images."""

    index: Blob
    images: list[Image]

    @property
    def blobs(self) -> dict[str, bytes]:
        """Every child manifest, config and layer by digest (the index not included)."""
        found: dict[str, bytes] = {}
        for image in self.images:
            found[image.manifest.digest] = image.manifest.data
            found.update(image.blobs)
        return found


def build_index(
    platforms: Sequence[str] = ("linux/amd64", "linux/arm64"),
    *,
    seed: int = 10,
    layers: Sequence[Mapping[str, int]] | None = None,
) -> MultiPlatformImage:
    """One image per ``os/arch[/variant]`` (distinct content) and the index listing them."""
    small: Sequence[Mapping[str, int]] = layers or (
        {"etc/os-release": 200, "bin/sh": 70000},
        {"usr/lib/libc.so": 900 * 1024},
    )
    images = []
    for offset, platform in enumerate(platforms):
        os_name, architecture, *variant = platform.split("/")
        images.append(
            build_image(
                seed=seed + offset,
                layers=small,
                os_name=os_name,
                architecture=architecture,
                variant=variant[0] if variant else None,
            )
        )
    index_json = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [image.manifest.descriptor(platform=image.platform) for image in images],
    }
    return MultiPlatformImage(Blob(OCI_INDEX, json.dumps(index_json, indent=2).encode()), images)


def write_index_layout(path: Path, image: MultiPlatformImage, ref_name: str = "latest") -> Layout:
    """``path`` as an OCI layout whose ``ref_name`` is the multi-platform ``image``."""
    path.mkdir(parents=True, exist_ok=True)
    blobs = [image.index]
    for child in image.images:
        blobs += [child.config, *child.layers, child.manifest]
    written = _write_blobs(path, blobs)
    index = _write_index(path, [image.index.descriptor(annotations={REF_NAME: ref_name})])
    return Layout(path, index, written)


def read_layout(path: Path) -> Layout:
    """An OCI layout directory as written by anyone; checks every blob's digest."""
    layout_file = json.loads((path / "oci-layout").read_text())
    if layout_file.get("imageLayoutVersion") != "1.0.0":
        raise ValueError(f"{path}: unexpected oci-layout {layout_file!r}")
    index = json.loads((path / "index.json").read_text())
    blobs: dict[str, bytes] = {}
    for file in sorted((path / "blobs").glob("*/*")):
        digest = f"{file.parent.name}:{file.name}"
        data = file.read_bytes()
        if file.parent.name == "sha256" and sha256(data) != digest:
            raise ValueError(f"{file}: content does not match its name")
        blobs[digest] = data
    return Layout(path, index, blobs)

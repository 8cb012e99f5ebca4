"""Re-hash the local store: every blob's bytes must hash to the digest its path names.

The store is content-addressed (``docker/registry/v2/blobs/<alg>/<2 hex>/<hex>/data``), so
a blob whose bytes do not match its name is corrupt, whatever put it there, and every
later read would serve it. :func:`check_store` finds such blobs (and files whose names do
not spell a digest) and, when asked, moves them aside into ``<data_dir>/quarantine/`` so
the registry refetches them (from S3 or an upstream) or a client pushes them again.
Nothing is ever deleted, and nothing outside the data directory is read or moved.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from regmirror import layout

CHUNK = 1024 * 1024
QUARANTINE = "quarantine"
# Write-in-progress names of the filesystem driver (see storage.filesystem.TEMP_PREFIX).
_TEMP_PREFIX = ".tmp-"
_ENCODED = {"sha256": re.compile(r"^[a-f0-9]{64}$"), "sha512": re.compile(r"^[a-f0-9]{128}$")}

MISMATCH = "digest mismatch"
MALFORMED = "malformed name"
UNREADABLE = "unreadable"


@dataclass(frozen=True, slots=True)
class Finding:
    """One bad entry; ``path`` and ``quarantined_to`` are relative to the data directory."""

    path: str
    problem: str
    digest: str | None = None
    actual: str | None = None
    quarantined_to: str | None = None


@dataclass(slots=True)
class Report:
    blobs: int = 0  # well-named blob files in the store
    checked: int = 0  # of those, re-hashed in this run
    bytes_checked: int = 0
    bad: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad


def check_store(
    data_dir: Path,
    *,
    sample: int | None = None,
    quarantine: bool = False,
    rng: random.Random | None = None,
) -> Report:
    """Re-hash every blob under ``data_dir`` (or a random ``sample`` of them)."""
    root = data_dir.resolve()
    blobs, malformed = _scan(root)
    report = Report(blobs=len(blobs))
    chosen = blobs
    if sample is not None and sample < len(blobs):
        chosen = sorted((rng or random.Random()).sample(blobs, sample))
    # The file each finding is about, so quarantine never moves a file that replaced it
    # since (a fill or push renaming verified bytes into place).
    identities: dict[str, tuple[int, int] | None] = {}
    for relative in malformed:
        report.bad.append(Finding(relative, MALFORMED))
        identities[relative] = None
    for relative, algorithm, encoded in chosen:
        digest = f"{algorithm}:{encoded}"
        try:
            actual, size, identity = _hash_file(root / relative, algorithm)
        except OSError as exc:
            report.bad.append(Finding(relative, UNREADABLE, digest, exc.strerror))
            identities[relative] = None
            continue
        report.checked += 1
        report.bytes_checked += size
        if actual != encoded:
            report.bad.append(Finding(relative, MISMATCH, digest, f"{algorithm}:{actual}"))
            identities[relative] = identity
    if quarantine:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        report.bad = [
            _quarantine(root, finding, stamp, identities[finding.path]) for finding in report.bad
        ]
    return report


def _scan(root: Path) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Well-named blob files as (relative path, algorithm, encoded), and malformed paths.

    Directories are walked without following symbolic links; a symlink is never a blob.
    """
    blobs: list[tuple[str, str, str]] = []
    malformed: list[str] = []
    top = root / layout.ROOT / "blobs"
    for directory, subdirs, files in os.walk(top):
        subdirs.sort()
        here = Path(directory)
        parts = here.relative_to(top).parts
        for name in sorted(files):
            if name.startswith(_TEMP_PREFIX):
                continue  # a write in progress (or a crash's leftover), not a blob
            path = here / name
            relative = str(path.relative_to(root))
            named = _blob_name(parts, name)
            if named is None or path.is_symlink():
                malformed.append(relative)
            else:
                blobs.append((relative, *named))
        for name in subdirs:
            if (here / name).is_symlink():  # os.walk lists it but does not enter it
                malformed.append(str((here / name).relative_to(root)))
    return blobs, malformed


def _blob_name(parts: tuple[str, ...], name: str) -> tuple[str, str] | None:
    """(algorithm, encoded) when ``<alg>/<2 hex>/<hex>/<name>`` is a blob's data file."""
    if name != "data" or len(parts) != 3:
        return None
    algorithm, prefix, encoded = parts
    shape = _ENCODED.get(algorithm)
    if shape is None or not shape.match(encoded) or encoded[:2] != prefix:
        return None
    return algorithm, encoded


def _hash_file(path: Path, algorithm: str) -> tuple[str, int, tuple[int, int]]:
    """The file's digest (hex), size and identity (device, inode), read in chunks."""
    hasher = hashlib.new(algorithm)
    size = 0
    # O_NOFOLLOW: a file swapped for a symlink since the scan is not followed out of the store.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as handle:
        info = os.fstat(fd)
        while chunk := handle.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return hasher.hexdigest(), size, (info.st_dev, info.st_ino)


def _quarantine(
    root: Path, finding: Finding, stamp: str, identity: tuple[int, int] | None
) -> Finding:
    """Move the bad file (a symlink itself, never its target) to ``quarantine/<stamp>/``."""
    source = root / finding.path
    try:
        info = os.lstat(source)
    except FileNotFoundError:
        return finding  # gone since the scan (evicted or replaced): nothing to move
    if identity is not None and (info.st_dev, info.st_ino) != identity:
        return finding  # replaced since it was hashed: the new file is not what was found bad
    target = root / QUARANTINE / stamp / finding.path
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = 0
    while target.exists() or target.is_symlink():
        suffix += 1
        target = target.with_name(f"{Path(finding.path).name}.{suffix}")
    try:
        os.rename(source, target)
    except FileNotFoundError:
        return finding  # gone since the scan (evicted or replaced): nothing to move
    return Finding(
        finding.path,
        finding.problem,
        finding.digest,
        finding.actual,
        str(target.relative_to(root)),
    )

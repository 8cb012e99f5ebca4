"""Where a blob found for a request is: complete on local disk, or only elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from regmirror.logs.served import Tier


@dataclass(frozen=True, slots=True)
class StoredBlob:
    path: Path
    size: int


@dataclass(frozen=True, slots=True)
class RemoteBlob:
    """A blob S3 or an upstream holds and local disk does not: what a HEAD needs to
    know, without copying it here."""

    size: int
    tier: Tier  # where it is: s3 or upstream

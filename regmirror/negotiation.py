"""Content negotiation for manifests pulled by tag: which representation a client gets.

One tag can have several representations upstream, chosen by the request's ``Accept``:
a multi-platform image is an index (or Docker manifest list) for a client that accepts
one, and for a client that does not, registry:2 and Docker Hub answer the linux/amd64
image instead (a Docker list) or 404 (an OCI index). What the upstream answers
depends only on which of the four manifest media types the ``Accept`` names, so that
set is the representation: tag resolutions are cached, coalesced and recorded per
representation (at most 16; in practice two or three), and the upstream is asked with
exactly that set.

An ``Accept`` that names none of them (absent, ``*/*``, only other types) accepts any
type (RFC 9110 §12.5.1): it is the representation of every type, the one a client
that understands everything gets. Quality values are ignored, as registry:2 does.

An upstream that ignores ``Accept`` and answers a list or index to a client that
reads neither gets the same treatment registry:2 and Docker Hub give such a client:
the linux/amd64 image of it (:func:`default_image`), or nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from regmirror.digest import Digest
from regmirror.errors import DigestInvalid
from regmirror.manifest import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

# In the order they are offered upstream: the richest first.
ORDER = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
_SHORT = {
    OCI_INDEX: "oci-index",
    OCI_MANIFEST: "oci-manifest",
    DOCKER_LIST: "docker-list",
    DOCKER_MANIFEST: "docker-manifest",
}


@dataclass(frozen=True, slots=True)
class Representation:
    """The manifest media types a client accepts; what one tag resolution is keyed by."""

    types: frozenset[str]

    @property
    def accept(self) -> tuple[str, ...]:
        """The ``Accept`` to send upstream for this representation."""
        return tuple(t for t in ORDER if t in self.types)

    @property
    def everything(self) -> bool:
        return self.types == EVERYTHING.types

    @property
    def key(self) -> str:
        """A stable name, fit for a path component: ``docker-manifest+oci-manifest``."""
        return "+".join(sorted(_SHORT[t] for t in self.types))

    def __str__(self) -> str:
        return self.key


EVERYTHING = Representation(frozenset(ORDER))


def negotiate(accept: Iterable[str]) -> Representation:
    """The representation a request's ``Accept`` media types (parameters stripped) ask for."""
    named = frozenset(t.strip().lower() for t in accept) & EVERYTHING.types
    return Representation(named) if named else EVERYTHING


# The platform registry:2 (its build's) and Docker Hub pick from a list for a client
# that cannot read lists.
DEFAULT_PLATFORM = {"os": "linux", "architecture": "amd64"}


def default_image(index: bytes) -> tuple[str, Digest] | None:
    """The media type and digest of the linux/amd64 image an index or list names;
    None when it names none (or is not one)."""
    try:
        body = json.loads(index)
    except ValueError:
        return None
    entries = body.get("manifests") if isinstance(body, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict) or not isinstance(entry.get("platform"), dict):
            continue
        platform = entry["platform"]
        if all(platform.get(k) == v for k, v in DEFAULT_PLATFORM.items()):
            media_type, digest = entry.get("mediaType"), entry.get("digest")
            if isinstance(media_type, str) and isinstance(digest, str):
                try:
                    return media_type, Digest.parse(digest)
                except DigestInvalid:
                    return None
    return None

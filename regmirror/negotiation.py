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
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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

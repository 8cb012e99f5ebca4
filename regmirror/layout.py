"""registry:2's storage layout: where each blob, link and tag lives.

Following it exactly lets regmirror serve a bucket that registry:2 wrote and
lets registry:2 read what regmirror stores. Keys are relative to the driver root
(registry:2's ``rootdirectory``), e.g. ``docker/registry/v2/blobs/sha256/ab/ab…/data``.
"""

from __future__ import annotations

from regmirror.digest import Digest

ROOT = "docker/registry/v2"
REPOSITORIES = f"{ROOT}/repositories"
BLOBS = f"{ROOT}/blobs"


def blob_data(digest: Digest) -> str:
    return f"{BLOBS}/{blob_under_blobs(digest)}"


def blob_under_blobs(digest: Digest) -> str:
    """A blob's key below :data:`BLOBS` (what an nginx location aliasing it appends)."""
    return f"{digest.algorithm}/{digest.hex[:2]}/{digest.hex}/data"


def repository(name: str) -> str:
    return f"{REPOSITORIES}/{name}"


def layer_link(name: str, digest: Digest) -> str:
    return f"{REPOSITORIES}/{name}/_layers/{digest.algorithm}/{digest.hex}/link"


def revision_link(name: str, digest: Digest) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/revisions/{digest.algorithm}/{digest.hex}/link"


def tags(name: str) -> str:
    return f"{REPOSITORIES}/{name}/_manifests/tags"


def tag(name: str, tag: str) -> str:
    return f"{tags(name)}/{tag}"


def tag_current_link(name: str, tag: str) -> str:
    return f"{tags(name)}/{tag}/current/link"


def tag_index_link(name: str, tag: str, digest: Digest) -> str:
    return f"{tags(name)}/{tag}/index/{digest.algorithm}/{digest.hex}/link"


def referrers(name: str, subject: Digest) -> str:
    """Our addition for the OCI 1.1 referrers API; registry:2 ignores the directory."""
    return f"{REPOSITORIES}/{name}/_manifests/referrers/{subject.algorithm}/{subject.hex}"


def referrer_link(name: str, subject: Digest, referrer: Digest) -> str:
    return f"{referrers(name, subject)}/{referrer.algorithm}/{referrer.hex}/link"

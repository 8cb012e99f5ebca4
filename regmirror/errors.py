"""The registry's typed errors and the spec's error codes they map to.

Every failure a client can cause is one of these; the API turns them into the
OCI distribution spec's JSON envelope (``{"errors": [{code, message, detail}]}``)
in one place (:mod:`regmirror.api.envelope`).
"""

from __future__ import annotations

from typing import Any


class RegistryError(Exception):
    """An error with a spec error code and the HTTP status that carries it."""

    code = "UNKNOWN"
    status = 500

    def __init__(self, message: str, detail: Any = None, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}


class BlobUnknown(RegistryError):
    """Blob unknown to registry."""

    code = "BLOB_UNKNOWN"
    status = 404


class BlobUploadUnknown(RegistryError):
    """Blob upload unknown."""

    code = "BLOB_UPLOAD_UNKNOWN"
    status = 404


class DigestInvalid(RegistryError):
    """Provided digest did not match."""

    code = "DIGEST_INVALID"
    status = 400


class ManifestBlobUnknown(RegistryError):
    """Manifest references an unknown blob."""

    code = "MANIFEST_BLOB_UNKNOWN"
    status = 400


class ManifestInvalid(RegistryError):
    """Manifest invalid."""

    code = "MANIFEST_INVALID"
    status = 400


class ManifestUnknown(RegistryError):
    """Manifest unknown."""

    code = "MANIFEST_UNKNOWN"
    status = 404


class NameInvalid(RegistryError):
    """Invalid repository name."""

    code = "NAME_INVALID"
    status = 400


class NameUnknown(RegistryError):
    """Repository name not known."""

    code = "NAME_UNKNOWN"
    status = 404


class SizeInvalid(RegistryError):
    """Provided length did not match."""

    code = "SIZE_INVALID"
    status = 400


class TagInvalid(RegistryError):
    """Manifest tag did not match URI."""

    code = "TAG_INVALID"
    status = 400


class PaginationInvalid(RegistryError):
    """Invalid number of results requested."""

    code = "PAGINATION_NUMBER_INVALID"
    status = 400


class Unsupported(RegistryError):
    """The operation is unsupported."""

    code = "UNSUPPORTED"
    status = 405


class ExpectationFailed(RegistryError):
    """An ``Expect`` other than 100-continue (RFC 9110, 10.1.1)."""

    code = "UNSUPPORTED"
    status = 417


class Unavailable(RegistryError):
    """A backing store is unavailable."""

    code = "UNAVAILABLE"
    status = 503


class TooManyRequests(RegistryError):
    """Too many requests."""

    code = "TOOMANYREQUESTS"
    status = 429


class ManifestTooLarge(RegistryError):
    code = "MANIFEST_INVALID"
    status = 413


class RangeInvalid(RegistryError):
    """A chunk that does not continue the upload where it stands (spec: 416)."""

    code = "BLOB_UPLOAD_INVALID"
    status = 416


class UploadRefused(RegistryError):
    """An upload the registry's limits refuse; ``reason`` labels the refusals metric."""

    reason = "refused"


class UploadTooLarge(UploadRefused):
    """A blob bigger than ``uploads.max_blob_bytes``."""

    code = "BLOB_UPLOAD_INVALID"
    status = 413
    reason = "too_large"


class UploadIdle(UploadRefused):
    """A request body that sent nothing for ``uploads.idle_timeout`` seconds."""

    code = "BLOB_UPLOAD_INVALID"
    status = 408
    reason = "idle_timeout"


class UploadTooSlow(UploadIdle):
    """A request body slower than ``uploads.min_rate`` over a window: cut like an idle one."""

    reason = "too_slow"


class UploadBusy(UploadRefused):
    """A session another request is writing to: refused at once, never queued behind it.
    416, as for a chunk that does not continue the upload where it stands."""

    code = "BLOB_UPLOAD_INVALID"
    status = 416
    reason = "busy"


class TooManyUploads(UploadRefused):
    """Too many open upload sessions, in all or from one client (``reason`` says which)."""

    code = "TOOMANYREQUESTS"
    status = 429

    def __init__(self, message: str, *, reason: str, detail: Any = None):
        super().__init__(message, detail)
        self.reason = reason


class InsufficientStorage(RegistryError):
    """The registry's disk is full (RFC 4918's 507). UNAVAILABLE, a code every client
    parses, says "try again later": space frees as the cache evicts."""

    code = "UNAVAILABLE"
    status = 507


class RouteUnknown(RegistryError):
    code = "NOT_FOUND"
    status = 404


class UpstreamUnavailable(Unavailable):
    """An upstream registry failed us: unreachable, timed out, 5xx, or served bad content.

    A subclass of :class:`Unavailable` (503) so the façade can tell an upstream outage
    (serve the last known tag, stale-if-error) from other failures.
    """


class UpstreamDenied(RegistryError):
    """An upstream registry refused our credentials (401/403 after authenticating)."""

    code = "DENIED"
    status = 403


class FillFailed(Unavailable):
    """A fill from the next tier failed; a body streamed from it must be aborted, not ended."""


class Unauthorized(RegistryError):
    """No credentials, or credentials that do not hold (spec: 401 with a challenge)."""

    code = "UNAUTHORIZED"
    status = 401


class Denied(RegistryError):
    """Good credentials without the permission the request needs."""

    code = "DENIED"
    status = 403

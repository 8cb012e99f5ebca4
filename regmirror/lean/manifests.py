"""Manifest GET and HEAD answered from memory (the fast path: :mod:`regmirror.lean`).

Answered here: a manifest :meth:`Registry.manifest_now` finds without waiting (pushed,
or pulled through and asked for by digest). The response is the handler's
(:func:`regmirror.api.manifests.get_manifest`) byte for byte but the ``Date``.
"""

from __future__ import annotations

from cachetools import LRUCache

from regmirror.digest import Digest
from regmirror.lean.gate import Admitted, text
from regmirror.lean.wire import Clock, Head, status_head
from regmirror.manifest import Manifest
from regmirror.registry import Registry

RESPONSES = 4096  # manifests whose response heads are kept


class _Wire:
    """A manifest's response heads, up to the ``Date`` line."""

    __slots__ = ("etag", "manifest", "not_modified", "ok")

    def __init__(self, manifest: Manifest):
        headers = manifest.headers
        self.manifest = manifest
        self.ok = status_head("200 OK", {**headers, "Content-Length": str(len(manifest.raw))})
        self.not_modified = status_head("304 Not Modified", headers)
        self.etag = headers["ETag"]


class Manifests:
    def __init__(self, registry: Registry, clock: Clock):
        self.registry = registry
        self.clock = clock
        self._wires: LRUCache[Digest, _Wire] = LRUCache(RESPONSES)

    def answer(self, asked: Admitted, head: Head) -> tuple[bytes, int, int] | None:
        """(the whole response, its status, its body's bytes), or None: aiohttp's."""
        manifest = self.registry.manifest_now(asked.name, asked.reference, ns=asked.ns)
        if manifest is None:
            return None
        wire = self._wire(manifest)
        if wire is None:
            return None
        match = head.headers.get(b"if-none-match")
        if match is not None and wire.etag in text(match[0]):
            status, response, nbytes = 304, wire.not_modified, 0
        elif asked.verb == "HEAD":
            status, response, nbytes = 200, wire.ok, 0
        else:
            status, response, nbytes = 200, wire.ok, len(manifest.raw)
        response += self.clock.end_of_head()
        if nbytes:
            response += manifest.raw
        return response, status, nbytes

    def _wire(self, manifest: Manifest) -> _Wire | None:
        wire = self._wires.get(manifest.digest)
        if wire is None or wire.manifest is not manifest:
            if any("\r" in v or "\n" in v for v in manifest.headers.values()):
                return None  # aiohttp refuses such a header: its error, not ours
            wire = self._wires[manifest.digest] = _Wire(manifest)
        return wire

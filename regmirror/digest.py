"""Content digests: parsing by the OCI grammar, and hashing."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from regmirror.errors import DigestInvalid

# OCI image-spec descriptor grammar: algorithm ":" encoded.
_GRAMMAR = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
# Registered algorithms and the exact shape of their encoded part.
_ENCODED = {"sha256": re.compile(r"^[a-f0-9]{64}$"), "sha512": re.compile(r"^[a-f0-9]{128}$")}


@dataclass(frozen=True, slots=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:<64 hex>`` or ``sha512:<128 hex>``; anything else is DIGEST_INVALID."""
        match = _GRAMMAR.match(text)
        if not match:
            raise DigestInvalid(f"invalid digest {text[:150]!r}", {"digest": text[:150]})
        algorithm, encoded = match.groups()
        shape = _ENCODED.get(algorithm)
        if shape is None:
            raise DigestInvalid(
                f"unsupported digest algorithm {algorithm!r}; use sha256 or sha512",
                {"digest": text[:150]},
            )
        if not shape.match(encoded):
            raise DigestInvalid(
                f"digest {text[:150]!r} is not a lowercase hex {algorithm} value",
                {"digest": text[:150]},
            )
        return cls(algorithm, encoded)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

"""Image references as ``regmirror warm`` takes them, and platforms as ``--platform`` does.

A reference is written as a client pulls it through regmirror: ``library/alpine:3.19``,
``ghcr/owner/tool:1`` (a prefix route), ``NAME@sha256:…`` or ``NAME:tag@sha256:…`` (the
digest wins, as with docker). When the first component is a registry host (it has a
``.`` or a ``:``, or is ``localhost``), the reference is fully qualified
(``docker.io/library/alpine:3.19``, ``ghcr.io/owner/tool:1``): the host is stripped and
sent as containerd's ``?ns=`` so regmirror routes it to the upstream with that ``ns``
or that host; Docker Hub's single-component names get their implicit ``library/``.
"""

from __future__ import annotations

from dataclasses import dataclass

from regmirror.digest import Digest
from regmirror.errors import DigestInvalid, NameInvalid, TagInvalid
from regmirror.names import check_name, check_tag
from regmirror.upstream import DOCKER_HUB_NAME, is_docker_hub


class BadReference(ValueError):
    """A reference or platform that cannot be warmed, with the text that was given."""


@dataclass(frozen=True, slots=True)
class ImageReference:
    text: str  # as given
    name: str  # the repository name sent to regmirror
    reference: str  # a tag or a digest
    ns: str | None = None  # containerd's ?ns=: the registry host of a qualified reference
    unqualified: str | None = None  # the name with its host, to try when ns finds nothing

    @property
    def digest(self) -> Digest | None:
        return Digest.parse(self.reference) if ":" in self.reference else None


def parse_reference(text: str) -> ImageReference:
    """``[HOST/]NAME[:TAG][@DIGEST]`` → ImageReference; BadReference when malformed."""
    source = text.strip()
    rest, _, digest = source.partition("@")
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    tag = ""
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
    if not rest:
        raise BadReference(f"{text!r}: no repository name")
    try:
        if tag:
            check_tag(tag)
        if digest:
            Digest.parse(digest)
    except (TagInvalid, DigestInvalid) as exc:
        raise BadReference(f"{text!r}: {exc.message}") from exc
    reference = digest or tag or "latest"
    first, _, remainder = rest.partition("/")
    ns = None
    name = rest
    if remainder and ("." in first or ":" in first or first == "localhost"):
        ns = DOCKER_HUB_NAME if is_docker_hub(first) else first.lower()
        name = remainder
        if ns == DOCKER_HUB_NAME and "/" not in name:
            name = f"library/{name}"
    try:
        check_name(name)
    except NameInvalid as exc:
        raise BadReference(f"{text!r}: {exc.message}") from exc
    return ImageReference(source, name, reference, ns, rest if ns else None)


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return "/".join(filter(None, (self.os, self.architecture, self.variant)))

    def matches(self, platform: object) -> bool:
        """Whether an index entry's ``platform`` object is this one. Without a variant
        any variant matches; arm64 without a variant is v8, as containerd has it."""
        if not isinstance(platform, dict):
            return False
        if (platform.get("os"), platform.get("architecture")) != (self.os, self.architecture):
            return False
        if self.variant is None:
            return True
        variant = platform.get("variant") or ("v8" if self.architecture == "arm64" else None)
        return variant == self.variant


def parse_platform(text: str) -> Platform:
    """``os/arch[/variant]`` (``linux/amd64``, ``linux/arm64/v8``)."""
    parts = text.strip().split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise BadReference(f"{text!r} is not a platform like linux/amd64 or linux/arm64/v8")
    return Platform(parts[0], parts[1], parts[2] if len(parts) == 3 else None)


def read_references(text: str) -> list[str]:
    """The references of a ``--from`` file: one a line; blank lines and ``#`` comments
    (whole-line or trailing) ignored."""
    found = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            found.append(line)
    return found

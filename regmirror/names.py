"""Repository names, tags and references by the OCI distribution spec's grammars.

Anything that passes these checks is safe to use as a path below the data
directory: name components are ``[a-z0-9]`` runs joined by ``.``, ``_``, ``__`` or
``-``, so ``..``, absolute paths and registry:2's ``_layers``-style directories
cannot be spelled.
"""

from __future__ import annotations

import re

from regmirror.digest import Digest
from regmirror.errors import NameInvalid, TagInvalid

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$")
# distribution caps the full name (with a registry host) at 255 characters.
MAX_NAME_LENGTH = 255


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH:
        raise NameInvalid(
            f"repository name is {len(name)} characters; at most {MAX_NAME_LENGTH} allowed",
            {"name": name[:MAX_NAME_LENGTH]},
        )
    if not _NAME.match(name):
        raise NameInvalid(
            f"invalid repository name {name!r}: lowercase components of [a-z0-9] joined by "
            "'.', '_', '__' or '-', separated by '/'",
            {"name": name},
        )
    return name


def check_tag(tag: str) -> str:
    if not _TAG.match(tag):
        raise TagInvalid(
            f"invalid tag {tag[:150]!r}: [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}",
            {"tag": tag[:150]},
        )
    return tag


def parse_reference(reference: str) -> str | Digest:
    """A manifest reference is a digest when it contains ':', else a tag."""
    if ":" in reference:
        return Digest.parse(reference)
    return check_tag(reference)

"""Image references and platforms as ``regmirror warm`` reads them."""

from __future__ import annotations

import pytest

from regmirror.ops.reference import (
    BadReference,
    ImageReference,
    Platform,
    parse_platform,
    parse_reference,
    read_references,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "name", "reference", "ns"),
    [
        ("library/alpine:3.19", "library/alpine", "3.19", None),
        ("alpine", "alpine", "latest", None),  # regmirror's default upstream adds library/
        ("ghcr/owner/tool:1", "ghcr/owner/tool", "1", None),  # a prefix route
        (f"team/app@{DIGEST}", "team/app", DIGEST, None),
        (f"team/app:v2@{DIGEST}", "team/app", DIGEST, None),  # the digest wins
        ("docker.io/library/alpine:3.19", "library/alpine", "3.19", "docker.io"),
        ("docker.io/alpine:3.19", "library/alpine", "3.19", "docker.io"),
        ("index.docker.io/nginx", "library/nginx", "latest", "docker.io"),
        ("ghcr.io/owner/tool:1", "owner/tool", "1", "ghcr.io"),
        (
            "registry.example.internal:5000/ci/app:abc",
            "ci/app",
            "abc",
            "registry.example.internal:5000",
        ),
        ("localhost/app:1", "app", "1", "localhost"),
    ],
)
def test_references_as_clients_write_them(
    text: str, name: str, reference: str, ns: str | None
) -> None:
    parsed = parse_reference(text)
    assert (parsed.name, parsed.reference, parsed.ns) == (name, reference, ns)


def test_a_qualified_reference_keeps_its_unqualified_name_for_a_prefix_route() -> None:
    parsed = parse_reference("ghcr.io/owner/tool:1")
    assert parsed == ImageReference(
        "ghcr.io/owner/tool:1", "owner/tool", "1", "ghcr.io", "ghcr.io/owner/tool"
    )


@pytest.mark.parametrize(
    "text", ["", ":tag", "Upper/case", "app:bad tag", "app@sha256:short", "a//b", "app:-x"]
)
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(BadReference):
        parse_reference(text)


def test_platforms_match_as_containerd_does() -> None:
    assert parse_platform("linux/arm64/v8") == Platform("linux", "arm64", "v8")
    arm64 = parse_platform("linux/arm64")
    assert arm64.matches({"os": "linux", "architecture": "arm64", "variant": "v8"})
    assert parse_platform("linux/arm64/v8").matches({"os": "linux", "architecture": "arm64"})
    assert not parse_platform("linux/arm/v7").matches(
        {"os": "linux", "architecture": "arm", "variant": "v6"}
    )
    assert not parse_platform("linux/amd64").matches({"os": "unknown", "architecture": "unknown"})
    assert not parse_platform("linux/amd64").matches(None)
    for bad in ("amd64", "linux/", "linux/arm/v7/x"):
        with pytest.raises(BadReference):
            parse_platform(bad)


def test_a_list_file_ignores_blank_lines_and_comments() -> None:
    text = "# weekly\n\nalpine:3.19\n  debian:12  # bookworm\n#ubuntu:24.04\n"
    assert read_references(text) == ["alpine:3.19", "debian:12"]

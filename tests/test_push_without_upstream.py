"""Pushes never depend on upstreams (issue 7, finding 4).

A blob existence probe (``HEAD /v2/<name>/blobs/<digest>``, which docker, podman and
skopeo send for every layer before uploading it) answers from what regmirror holds.
When the upstream that serves the name is down, refuses like Docker Hub (401, a token,
then ``insufficient_scope``) or 403, or hangs, the probe is a 404, so the client
uploads, and the failure is counted in ``regmirror_upstream_errors_total``. A
repository with pushed content, and any name matching the upstream's ``push_only``
globs, never reaches the upstream at all.

The upstream here is :class:`~tests.support.fake_upstream.FakeUpstream`; the pushes are
real ``skopeo copy``; ``podman push`` is in tests/test_podman.py (isolated podman).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from regmirror.config import load
from tests.support.fake_upstream import Mode, fake_upstream
from tests.support.oci_layout import Image, build_image, write_image_layout
from tests.support.processes import ServerProcess, regmirror_server
from tests.support.pullthrough import error_code, put_manifest, upstream_env
from tests.support.s3_registry import pull_layout
from tests.support.skopeo import Skopeo, skopeo
from tests.support.upstream import push_blob

__all__ = ["regmirror_server", "skopeo"]

pytestmark = pytest.mark.skipif(shutil.which("skopeo") is None, reason="needs skopeo")

Start = Callable[..., ServerProcess]
SMALL_LAYERS = ({"etc/a": 300}, {"usr/b": 70_000})
# A probe waits for the upstream this long at most (regmirror.registry.PROBE_TIMEOUT)
# before answering 404; bounds here leave room for a loaded machine.
PROBE_BOUND = 15.0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def upstream_errors(http: aiohttp.ClientSession, server: ServerProcess, kind: str) -> float:
    async with http.get(f"{server.url}/metrics") as response:
        text = await response.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("regmirror_upstream_errors_total{") and f'kind="{kind}"' in line
    )


async def skopeo_push(skopeo: Skopeo, tmp_path: Path, image: Image, destination: str) -> None:
    layout = write_image_layout(tmp_path / f"src-{image.manifest.digest[7:19]}", image, "v1")
    await asyncio.to_thread(skopeo.copy, f"oci:{layout.path}:v1", destination, "--preserve-digests")


async def assert_pulls_back(
    skopeo: Skopeo, server: ServerProcess, reference: str, image: Image, out: Path
) -> None:
    digest, blobs = await asyncio.to_thread(
        pull_layout, skopeo, f"docker://{server.host_port}/{reference}", out
    )
    assert digest == image.manifest.digest
    assert blobs == {image.manifest.digest: image.manifest.data, **image.blobs}


# -- real pushes with the default upstream down or denying --------------------------------


async def test_skopeo_push_succeeds_with_the_default_upstream_down(
    regmirror_server: Start, skopeo: Skopeo, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with fake_upstream(running=False) as fake:  # nothing listens: refused
        server = regmirror_server(env=upstream_env(fake.url))
        image = build_image(seed=401, layers=SMALL_LAYERS)
        await skopeo_push(skopeo, tmp_path, image, f"docker://{server.host_port}/ci/app:v1")
        await assert_pulls_back(skopeo, server, "ci/app:v1", image, tmp_path / "out")
        # The probes that went to the upstream failed and were counted, not surfaced.
        assert await upstream_errors(http, server, "unavailable") >= 1


@pytest.mark.parametrize("mode", ["deny", "forbid"])
async def test_skopeo_push_succeeds_with_a_default_upstream_that_denies(
    mode: Mode,
    regmirror_server: Start,
    skopeo: Skopeo,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    """Docker Hub answers 401, hands out an anonymous token, then refuses the private
    name (``insufficient_scope``); other registries say 403."""
    async with fake_upstream(mode) as fake:
        server = regmirror_server(env=upstream_env(fake.url))
        image = build_image(seed=402, layers=SMALL_LAYERS)
        await skopeo_push(skopeo, tmp_path, image, f"docker://{server.host_port}/ci/app:v1")
        await assert_pulls_back(skopeo, server, "ci/app:v1", image, tmp_path / "out")
        assert await upstream_errors(http, server, "denied") >= 1


# -- the probe itself ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["down", "deny", "forbid", "hang"])
async def test_a_blob_probe_the_upstream_cannot_answer_is_a_404_and_counted(
    mode: str, regmirror_server: Start, http: aiohttp.ClientSession
) -> None:
    async with fake_upstream("hang" if mode == "hang" else "serve") as fake:
        if mode == "down":
            await fake.stop()
        elif mode != "hang":
            fake.mode = mode  # type: ignore[assignment]
        server = regmirror_server(env=upstream_env(fake.url))
        digest = "sha256:" + "ab" * 32
        started = time.monotonic()
        async with http.head(f"{server.url}/v2/fresh/name/blobs/{digest}") as response:
            assert response.status == 404
        assert time.monotonic() - started < PROBE_BOUND
        kind = "denied" if mode in ("deny", "forbid") else "unavailable"
        assert await upstream_errors(http, server, kind) >= 1
        # A GET is not a probe: a pull that cannot reach its upstream is still an error.
        if mode == "down":
            async with http.get(f"{server.url}/v2/fresh/name/blobs/{digest}") as response:
                assert response.status == 503


async def test_a_repository_with_pushed_content_never_probes_the_upstream(
    regmirror_server: Start, http: aiohttp.ClientSession
) -> None:
    async with fake_upstream() as fake:
        known = fake.add_blob("team/app", os.urandom(1000))  # the upstream has it...
        server = regmirror_server(env=upstream_env(fake.url))
        await push_blob(http, server.url, "team/app", os.urandom(2000))
        for digest in (known, "sha256:" + "cd" * 32):
            async with http.head(f"{server.url}/v2/team/app/blobs/{digest}") as response:
                assert response.status == 404  # ...but team/app is a pushed repository
        assert fake.requests == []


async def test_push_only_names_never_reach_the_upstream(
    regmirror_server: Start, skopeo: Skopeo, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async with fake_upstream() as fake:
        base = build_image(seed=404, layers=SMALL_LAYERS)
        fake.add_image("ci/app", base, "v0")  # would be served, were ci/ not push-only
        fake.add_image("lib/base", base, "v0")
        server = regmirror_server(env=upstream_env(fake.url, push_only="[ci/*, 'secret/**']"))
        async with http.head(f"{server.url}/v2/ci/app/blobs/{base.layers[0].digest}") as response:
            assert response.status == 404
        async with http.get(f"{server.url}/v2/ci/app/manifests/v0") as response:
            assert response.status == 404
            assert await error_code(response) == "MANIFEST_UNKNOWN"
        image = build_image(seed=405, layers=SMALL_LAYERS)
        await skopeo_push(skopeo, tmp_path, image, f"docker://{server.host_port}/ci/app:v1")
        await assert_pulls_back(skopeo, server, "ci/app:v1", image, tmp_path / "out")
        assert fake.names() == set()
        # Names outside the globs still pull through.
        async with http.get(f"{server.url}/v2/lib/base/manifests/v0") as response:
            assert response.status == 200
            assert await response.read() == base.manifest.data
        assert fake.names() == {"lib/base"}


async def test_a_push_still_adopts_layers_the_upstream_serves_for_that_name(
    regmirror_server: Start, http: aiohttp.ClientSession
) -> None:
    """A first push building on an upstream image: the probe finds the base layers
    upstream, the client skips them, and the manifest PUT adopts them into the pushed
    repository (so they are served after the upstream is gone)."""
    async with fake_upstream() as fake:
        image = build_image(seed=406, layers=SMALL_LAYERS)
        for layer in image.layers:
            fake.add_blob("base/app", layer.data)
        server = regmirror_server(env=upstream_env(fake.url))
        for layer in image.layers:
            async with http.head(f"{server.url}/v2/base/app/blobs/{layer.digest}") as response:
                assert response.status == 200
        await push_blob(http, server.url, "base/app", image.config.data)
        await put_manifest(http, server.url, "base/app", "v1", image.manifest)
        await fake.stop()
        for layer in image.layers:
            async with http.get(f"{server.url}/v2/base/app/blobs/{layer.digest}") as response:
                assert response.status == 200
                assert await response.read() == layer.data


# -- configuration ------------------------------------------------------------------------


def test_push_only_is_a_list_of_globs_per_upstream_settable_by_environment(
    tmp_path: Path,
) -> None:
    config = tmp_path / "regmirror.yml"
    config.write_text("upstreams:\n  - url: https://registry-1.docker.io\n    push_only: [ci/*]\n")
    assert load(config, environ={}).upstreams[0].push_only == ["ci/*"]
    environ = {
        "REGMIRROR_UPSTREAMS__0__URL": "https://registry-1.docker.io",
        "REGMIRROR_UPSTREAMS__0__PUSH_ONLY": "[ci/*, team/private/*]",
    }
    assert load(None, environ=environ).upstreams[0].push_only == ["ci/*", "team/private/*"]
    assert load(None, environ={"REGMIRROR_UPSTREAMS__0__URL": "x"}).upstreams[0].push_only == []

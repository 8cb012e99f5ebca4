"""``regmirror warm``, end to end: the real command against a real regmirror process
pulling through from registry:2 behind a counting proxy. Every test asserts what the
upstream saw: a warm fetches each blob once, and a pull after it fetches nothing."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support.oci_layout import Image, build_image, build_index, read_layout
from tests.support.processes import REPO_ROOT, ServerProcess, regmirror_server
from tests.support.pullthrough import (  # pytest fixtures among them
    BOUND,
    UpstreamProxy,
    fetch_hashed,
    http,
    proxy,
    push_image_to,
    push_index_to,
    upstream_env,
)
from tests.support.skopeo import ACCEPT, Skopeo
from tests.support.upstream import (
    BASIC_PASSWORD,
    BASIC_USER,
    CountingProxy,
    TokenProxy,
    basic_registry,
    serve,
    upstream_registry,
)

__all__ = ["basic_registry", "http", "proxy", "regmirror_server", "upstream_registry"]

Start = Callable[..., ServerProcess]


@pytest.fixture
def mirror(regmirror_server: Start, proxy: UpstreamProxy) -> ServerProcess:
    """regmirror pulling through from registry:2 (behind ``proxy``) as Docker Hub's ns."""
    return regmirror_server(env=upstream_env(proxy.url, ns="docker.io"))


class Run:
    def __init__(self, code: int, stdout: str, stderr: str):
        self.code, self.stdout, self.stderr = code, stdout, stderr

    def json(self) -> dict[str, object]:
        document: dict[str, object] = json.loads(self.stdout)
        return document


async def warm(*args: str, env: Mapping[str, str] | None = None) -> Run:
    """``python -m regmirror warm ARGS`` (this checkout's code), awaited without blocking
    the loop the proxies run on."""
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("REGMIRROR_") and k != "WARM_CREDS"
    }
    environ["PYTHONPATH"] = str(REPO_ROOT)
    environ.update(env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "regmirror",
        "warm",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), BOUND * 2)
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def blob_bytes(image: Image) -> int:
    return sum(len(data) for data in image.blobs.values())


async def pull(
    http: aiohttp.ClientSession, server: ServerProcess, repo: str, image: Image, query: str = ""
) -> None:
    """What a client does: the image's manifest by digest, then every blob, verified."""
    url = f"{server.url}/v2/{repo}"
    fetched = await fetch_hashed(
        http, f"{url}/manifests/{image.manifest.digest}{query}", headers={"Accept": ACCEPT}
    )
    assert (fetched.status, fetched.digest) == (200, image.manifest.digest)
    for digest, data in image.blobs.items():
        fetched = await fetch_hashed(http, f"{url}/blobs/{digest}{query}")
        assert (fetched.status, fetched.digest, fetched.size) == (200, digest, len(data))


# -- warming, then pulling with zero upstream requests ------------------------------------


async def test_after_a_warm_skopeo_pulls_the_image_with_no_upstream_request(
    mirror: ServerProcess,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    image = build_image(seed=201)
    await push_image_to(http, upstream_registry.url, "warm/app", image, "v1")

    run = await warm("--url", mirror.url, "warm/app:v1")

    assert run.code == 0, run.stdout + run.stderr
    assert proxy.blob_gets == len(image.blobs)  # each blob once
    assert f"warm   warm/app:v1: 1 manifests, {len(image.blobs)} blobs" in run.stdout
    assert "1 of 1 images warm" in run.stdout
    proxy.requests.clear()

    out = tmp_path / "out"
    skopeo = Skopeo(tmp_path / "skopeo")
    source = f"docker://{mirror.host_port}/warm/app:v1"
    await asyncio.to_thread(skopeo.copy, source, f"oci:{out}:v1", "--preserve-digests")

    pulled = read_layout(out)
    assert pulled.blobs == {image.manifest.digest: image.manifest.data, **image.blobs}
    assert proxy.requests == []


async def test_warming_an_index_warms_every_platform(
    mirror: ServerProcess,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    index = build_index(("linux/amd64", "linux/arm64/v8", "linux/arm/v7"), seed=210)
    await push_index_to(http, upstream_registry.url, "warm/multi", index, "v1")

    run = await warm("--url", mirror.url, "--json", "warm/multi:v1")

    assert run.code == 0, run.stdout + run.stderr
    [result] = run.json()["images"]  # type: ignore[misc]
    assert result["ok"] is True and result["error"] is None
    assert result["digest"] == index.index.digest
    assert result["platforms"] == ["linux/amd64", "linux/arm64/v8", "linux/arm/v7"]
    assert result["manifests"] == 4
    assert result["blobs"] == sum(len(i.blobs) for i in index.images)
    assert result["bytes"] == sum(blob_bytes(i) for i in index.images)
    assert proxy.blob_gets == result["blobs"]
    proxy.requests.clear()

    for image in index.images:
        await pull(http, mirror, "warm/multi", image)
    assert proxy.requests == []


async def test_platform_chooses_what_is_warmed(
    mirror: ServerProcess,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    index = build_index(("linux/amd64", "linux/arm64/v8", "linux/arm/v7"), seed=220)
    amd64, arm64, arm = index.images
    await push_index_to(http, upstream_registry.url, "warm/some", index, "v1")

    # Without a variant, linux/arm64 is any arm64 (here v8).
    args = ("--url", mirror.url, "--json", "--platform", "linux/amd64", "--platform", "linux/arm64")
    run = await warm(*args, "warm/some:v1")

    assert run.code == 0, run.stdout + run.stderr
    [result] = run.json()["images"]  # type: ignore[misc]
    assert result["platforms"] == ["linux/amd64", "linux/arm64/v8"]
    assert result["bytes"] == blob_bytes(amd64) + blob_bytes(arm64)
    asked = {path.rpartition("/")[2] for method, path in proxy.requests if "/blobs/" in path}
    assert asked == set(amd64.blobs) | set(arm64.blobs)
    assert not asked & set(arm.blobs)

    proxy.requests.clear()
    run = await warm("--url", mirror.url, "--platform", "linux/arm/v7", "warm/some:v1")
    assert run.code == 0, run.stdout + run.stderr
    assert proxy.count("GET", "blobs") == len(arm.blobs)
    proxy.requests.clear()
    for image in index.images:
        await pull(http, mirror, "warm/some", image)
    assert proxy.requests == []

    run = await warm("--url", mirror.url, "--platform", "linux/s390x", "warm/some:v1")
    assert run.code == 1
    assert "no manifest for linux/s390x in the index (it has linux/amd64" in run.stdout


async def test_from_file_and_json_report_each_image(
    mirror: ServerProcess,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    one, two = build_image(seed=230, layers=({"a": 5000},)), build_image(seed=231)
    await push_image_to(http, upstream_registry.url, "list/one", one, "1.0")
    await push_image_to(http, upstream_registry.url, "list/two", two, "2.0")
    listing = tmp_path / "weekly.txt"
    listing.write_text(
        "# the weekly base images\n"
        "\n"
        "list/one:1.0   # trailing comments too\n"
        f"  list/two:2.0@{two.manifest.digest}\n"
    )

    run = await warm("--url", mirror.url, "--from", str(listing), "--json")

    assert run.code == 0, run.stdout + run.stderr
    document = run.json()
    assert document["ok"] is True
    images = document["images"]
    assert isinstance(images, list)
    assert [i["reference"] for i in images] == [
        "list/one:1.0",
        f"list/two:2.0@{two.manifest.digest}",
    ]
    assert [i["digest"] for i in images] == [one.manifest.digest, two.manifest.digest]
    assert [i["bytes"] for i in images] == [blob_bytes(one), blob_bytes(two)]
    assert document["bytes"] == blob_bytes(one) + blob_bytes(two)
    # By digest: the tag is not asked for (docker does the same with NAME:tag@digest).
    assert ("GET", "/v2/list/two/manifests/2.0") not in proxy.requests
    proxy.requests.clear()
    await pull(http, mirror, "list/one", one)
    await pull(http, mirror, "list/two", two)
    assert proxy.requests == []


async def test_a_failing_image_fails_the_run_and_the_summary_names_it(
    mirror: ServerProcess,
    upstream_registry: ServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(seed=240, layers=({"a": 100},))
    await push_image_to(http, upstream_registry.url, "fail/good", image, "v1")

    run = await warm("--url", mirror.url, "fail/good:v1", "fail/missing:nope")

    assert run.code == 1
    lines = run.stdout.splitlines()
    assert any(line.startswith("warm   fail/good:v1: ") for line in lines), run.stdout
    assert any(line.startswith("FAILED fail/missing:nope: ") for line in lines), run.stdout
    assert "1 of 2 images warm" in run.stdout and "failed: fail/missing:nope" in run.stdout

    run = await warm("--url", mirror.url, "--json", "fail/good:v1", "fail/missing:nope")
    assert run.code == 1
    document = run.json()
    assert document["ok"] is False
    good, missing = document["images"]  # type: ignore[misc]
    assert good["ok"] is True
    assert missing["ok"] is False
    assert (
        missing["error"] == f"no manifest fail/missing:nope at {mirror.url} (nor at its upstream)"
    )


async def test_a_bad_reference_is_a_usage_error(mirror: ServerProcess) -> None:
    run = await warm("--url", mirror.url, "Not/Valid:tag")
    assert run.code == 2
    assert "'Not/Valid:tag'" in run.stderr and "invalid repository name" in run.stderr
    run = await warm("--url", mirror.url, "--platform", "amd64", "ok/name:1")
    assert run.code == 2 and "not a platform" in run.stderr


async def test_a_docker_io_reference_is_routed_by_ns_with_library_added(
    mirror: ServerProcess,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(seed=250, layers=({"os-release": 300},))
    await push_image_to(http, upstream_registry.url, "library/alpine", image, "3.19")

    run = await warm("--url", mirror.url, "docker.io/alpine:3.19")

    assert run.code == 0, run.stdout + run.stderr
    assert ("HEAD", "/v2/library/alpine/manifests/3.19") in proxy.requests
    proxy.requests.clear()
    # containerd's pull of docker.io/library/alpine:3.19 through hosts.toml
    async with http.get(
        f"{mirror.url}/v2/library/alpine/manifests/3.19?ns=docker.io", headers={"Accept": ACCEPT}
    ) as response:
        assert response.status == 200
        assert response.headers["Docker-Content-Digest"] == image.manifest.digest
    await pull(http, mirror, "library/alpine", image, "?ns=docker.io")
    assert proxy.requests == []


# -- what warm itself checks: digests and credentials ---------------------------------------


async def test_bytes_that_do_not_match_their_digest_fail_the_warm(
    mirror: ServerProcess, upstream_registry: ServerProcess, http: aiohttp.ClientSession
) -> None:
    image = build_image(seed=260, layers=({"a": 1000},))
    await push_image_to(http, upstream_registry.url, "bad/bytes", image, "v1")
    # Something between warm and regmirror flips a byte of every blob body.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        corrupting = CountingProxy(target=mirror.url, session=session, corrupt=True)
        async with serve(corrupting.app()) as url:
            run = await warm("--url", url, "--json", "bad/bytes:v1")

    assert run.code == 1
    [result] = run.json()["images"]  # type: ignore[misc]
    assert "the bytes served hash to" in result["error"]


async def test_warm_answers_a_basic_challenge_with_its_credentials(
    basic_registry: ServerProcess, http: aiohttp.ClientSession
) -> None:
    # warm is a registry client like any other: here registry:2 with htpasswd stands in
    # for a regmirror that demands Basic credentials.
    from regmirror.upstream import basic_authorization
    from tests.support.upstream import push_image as push_small

    auth = basic_authorization(BASIC_USER, BASIC_PASSWORD)
    await push_small(http, basic_registry.url, "auth/basic", "v1", auth=auth)

    run = await warm("--url", basic_registry.url, "--json", "auth/basic:v1")
    assert run.code == 1
    assert "requires credentials" in run.json()["images"][0]["error"]  # type: ignore[index]

    creds = {"WARM_CREDS": f"{BASIC_USER}:{BASIC_PASSWORD}"}
    run = await warm("--url", basic_registry.url, "--json", "auth/basic:v1", env=creds)
    assert run.code == 0, run.stdout + run.stderr

    run = await warm(
        "--url", basic_registry.url, "--creds", f"{BASIC_USER}:wrong", "--json", "auth/basic:v1"
    )
    assert run.code == 1

    # Credentials in the URL are used, and appear in no message.
    host = basic_registry.host_port
    run = await warm("--url", f"http://{BASIC_USER}:{BASIC_PASSWORD}@{host}", "auth/basic:v1")
    assert run.code == 0, run.stdout + run.stderr
    run = await warm("--url", f"http://{BASIC_USER}:not-{BASIC_PASSWORD}@{host}", "auth/nope:1")
    assert run.code == 1
    assert BASIC_PASSWORD not in run.stdout + run.stderr


async def test_warm_fetches_a_bearer_token_with_its_credentials(
    mirror: ServerProcess,
    upstream_registry: ServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(seed=270, layers=({"a": 2000},))
    await push_image_to(http, upstream_registry.url, "auth/token", image, "v1")
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        front = TokenProxy(target=mirror.url, session=session, require_basic=("warm", "pw"))
        async with serve(front.app()) as url:
            front.url = url
            denied = await warm("--url", url, "--json", "auth/token:v1")
            run = await warm("--url", url, "--creds", "warm:pw", "--json", "auth/token:v1")

    assert denied.code == 1
    assert run.code == 0, run.stdout + run.stderr
    assert front.unauthorized >= 1
    assert ["repository:auth/token:pull"] in front.token_scopes


async def test_a_blob_two_references_share_is_downloaded_once(
    mirror: ServerProcess, upstream_registry: ServerProcess, http: aiohttp.ClientSession
) -> None:
    image = build_image(seed=280, layers=({"a": 3000}, {"b": 4000}))
    await push_image_to(http, upstream_registry.url, "dedupe/app", image, "v1")
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        counting = CountingProxy(target=mirror.url, session=session)
        async with serve(counting.app()) as url:
            run = await warm("--url", url, "dedupe/app:v1", f"dedupe/app@{image.manifest.digest}")

    assert run.code == 0, run.stdout + run.stderr
    assert "2 of 2 images warm" in run.stdout
    assert counting.blob_gets == len(image.blobs)


async def test_on_a_terminal_it_draws_bars_and_a_table(
    mirror: ServerProcess, upstream_registry: ServerProcess, http: aiohttp.ClientSession
) -> None:
    image = build_image(seed=290, layers=({"a": 3000},))
    await push_image_to(http, upstream_registry.url, "tty/app", image, "v1")

    # rich's switch for "treat this pipe as a terminal".
    env = {"TTY_COMPATIBLE": "1", "COLUMNS": "160"}
    run = await warm("--url", mirror.url, "tty/app:v1", "tty/missing:1", env=env)

    assert run.code == 1
    screen = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", run.stdout)  # colours and cursor moves
    assert "━" in screen  # progress bars
    assert "┃ image" in screen and "│ tty/app:v1" in screen  # the summary table
    assert "✓ tty/app:v1" in screen and "✗ tty/missing:1" in screen


async def test_a_prefix_route_spelt_like_a_host_is_found_without_ns(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: UpstreamProxy,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(seed=300, layers=({"p": 999},))
    await push_image_to(http, upstream_registry.url, "team/app", image, "v1")
    # localhost:5000/mirror.test/team/app -> the upstream's team/app; no ns answers mirror.test.
    server = regmirror_server(env=upstream_env(proxy.url, prefix="mirror.test"))

    run = await warm("--url", server.url, "mirror.test/team/app:v1")

    assert run.code == 0, run.stdout + run.stderr
    assert proxy.count("GET", "blobs") == len(image.blobs)
    proxy.requests.clear()
    await pull(http, server, "mirror.test/team/app", image)
    assert proxy.requests == []


class ConcurrencyProbe(CountingProxy):
    """A counting proxy that records the most blob GETs it had in flight at once; each
    answer takes a little while (a slow link), so that downloads overlap if allowed to."""

    in_flight = 0
    most = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if "/blobs/" not in request.path:
            return await super()._handle(request)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.05)
            return await super()._handle(request)
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize("jobs", [1, 3])
async def test_jobs_bounds_the_downloads_in_flight(
    jobs: int,
    mirror: ServerProcess,
    upstream_registry: ServerProcess,
    http: aiohttp.ClientSession,
) -> None:
    image = build_image(seed=310 + jobs, layers=tuple({f"f{i}": 2000 + i} for i in range(9)))
    await push_image_to(http, upstream_registry.url, f"jobs/app{jobs}", image, "v1")
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        probe = ConcurrencyProbe(target=mirror.url, session=session)
        async with serve(probe.app()) as url:
            run = await warm("--url", url, "--jobs", str(jobs), f"jobs/app{jobs}:v1")

    assert run.code == 0, run.stdout + run.stderr
    assert probe.blob_gets == len(image.blobs) == 10
    assert probe.most == jobs

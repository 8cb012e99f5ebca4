"""Tag lists of pulled-through repositories: answered from the upstream, end to end.

registry:2 is the upstream. It answers a whole tag list in one page (2.8 ignores ``n``),
so a proxy of this module's own in front of it (:class:`PagingProxy`) can answer in
pages of its own with ``Link`` headers, as Docker Hub, ghcr.io and quay.io do, and can
hold tag list requests until a herd is in. Clients are aiohttp and skopeo.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web

from regmirror.config import UpstreamSettings
from regmirror.errors import NameUnknown, UpstreamUnavailable
from regmirror.upstream import Upstream
from tests.support.oci_layout import build_image
from tests.support.processes import ServerProcess, regmirror_server, run_regmirror
from tests.support.pullthrough import (  # pytest fixtures among them
    BOUND,
    Countdown,
    UpstreamProxy,
    error_code,
    eventually,
    http,
    push_image_to,
    put_manifest,
    upstream_env,
)
from tests.support.skopeo import Skopeo, skopeo
from tests.support.upstream import serve, upstream_registry

__all__ = ["http", "regmirror_server", "skopeo", "upstream_registry"]

Start = Callable[..., ServerProcess]
HERD = 50
_LINK = re.compile(r'<([^>]*)>;\s*rel="next"')


@dataclass
class PagingProxy(UpstreamProxy):
    """An :class:`UpstreamProxy` that answers tag lists itself, from registry:2's whole
    list, in pages of ``page_size`` (or the client's smaller ``n``) linked by ``Link``;
    ``tags_gate`` holds tag list requests until set."""

    page_size: int | None = None
    tags_gate: asyncio.Event | None = None
    tags_held: asyncio.Event = field(default_factory=asyncio.Event)
    tag_pages: list[str] = field(default_factory=list)  # path and query of each asked

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not request.path.endswith("/tags/list"):
            return await super()._handle(request)
        self.requests.append((request.method, request.path))
        self.tag_pages.append(request.path_qs)
        if self.tags_gate is not None:
            self.tags_held.set()
            await asyncio.wait_for(self.tags_gate.wait(), BOUND)
        async with self.session.get(f"{self.target}{request.path}") as upstream:
            if upstream.status != 200 or self.page_size is None:
                return web.Response(
                    status=upstream.status,
                    body=await upstream.read(),
                    content_type="application/json",
                )
            body = await upstream.json()
        tags = sorted(body["tags"] or [])
        if "last" in request.query:
            tags = [t for t in tags if t > request.query["last"]]
        size = min(self.page_size, int(request.query.get("n", self.page_size)))
        page, headers = tags[:size], {}
        if len(tags) > size:
            query = urlencode({"n": size, "last": page[-1]})
            headers["Link"] = f'<{request.path}?{query}>; rel="next"'
        return web.json_response({"name": body["name"], "tags": page}, headers=headers)


@pytest.fixture
async def proxy(
    upstream_registry: ServerProcess, http: aiohttp.ClientSession
) -> AsyncIterator[PagingProxy]:
    running = PagingProxy(target=upstream_registry.url, session=http)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def tag_upstream(
    http: aiohttp.ClientSession, upstream: ServerProcess, repo: str, tags: list[str], seed: int
) -> None:
    """One image under every tag of ``tags`` in ``repo`` upstream."""
    image = build_image(seed=seed, layers=({"f": 10},))
    await push_image_to(http, upstream.url, repo, image, tags[0])
    for tag in tags[1:]:
        await put_manifest(http, upstream.url, repo, tag, image.manifest)


async def list_tags(
    http: aiohttp.ClientSession, server: ServerProcess, repo: str, query: str = ""
) -> tuple[int, list[str], str | None]:
    async with http.get(f"{server.url}/v2/{repo}/tags/list{query}") as response:
        body = await response.json(content_type=None)
        if response.status != 200:
            return response.status, [], None
        assert body["name"] == repo
        return 200, body["tags"], response.headers.get("Link")


async def every_page(http: aiohttp.ClientSession, server: ServerProcess, path_qs: str) -> list[str]:
    """Follow our ``Link`` headers from ``path_qs`` to the last page; every tag seen."""
    seen: list[str] = []
    for _ in range(100):
        async with http.get(f"{server.url}{path_qs}") as response:
            assert response.status == 200, await response.text()
            seen += (await response.json())["tags"]
            link = response.headers.get("Link")
        if link is None:
            return seen
        match = _LINK.fullmatch(link)
        assert match is not None, link
        path_qs = match[1]
    raise AssertionError("more than 100 pages")


# -- the tests --------------------------------------------------------------------------


async def test_skopeo_lists_the_upstreams_tags_through_the_mirror(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: PagingProxy,
    http: aiohttp.ClientSession,
    skopeo: Skopeo,
) -> None:
    tags = ["v1", "latest", "1.0.2", "edge"]
    await tag_upstream(http, upstream_registry, "lt/app", tags, seed=1)
    server = regmirror_server(env=upstream_env(proxy.url))
    result = await asyncio.to_thread(
        skopeo.run, "list-tags", "--tls-verify=false", f"docker://{server.host_port}/lt/app"
    )
    listed = json.loads(result.stdout)
    assert sorted(listed["Tags"]) == sorted(tags)
    assert proxy.count("GET", "tags") == 1


async def test_upstream_pages_are_followed_and_ours_follow_n_last_and_link(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: PagingProxy,
    http: aiohttp.ClientSession,
) -> None:
    tags = sorted(f"t{i:02}" for i in range(7))
    await tag_upstream(http, upstream_registry, "lt/paged", tags, seed=2)
    proxy.page_size = 3  # 7 tags upstream: pages of 3, 3 and 1
    server = regmirror_server(env=upstream_env(proxy.url, tag_ttl=300))

    assert await list_tags(http, server, "lt/paged") == (200, tags, None)
    assert proxy.tag_pages == [
        "/v2/lt/paged/tags/list",
        "/v2/lt/paged/tags/list?n=3&last=t02",
        "/v2/lt/paged/tags/list?n=3&last=t05",
    ]
    status, page, link = await list_tags(http, server, "lt/paged", "?n=2")
    assert (status, page, link) == (
        200,
        tags[:2],
        '</v2/lt/paged/tags/list?n=2&last=t01>; rel="next"',
    )
    assert await list_tags(http, server, "lt/paged", "?n=2&last=t03") == (
        200,
        ["t04", "t05"],
        '</v2/lt/paged/tags/list?n=2&last=t05>; rel="next"',
    )
    assert await list_tags(http, server, "lt/paged", "?n=10&last=t05") == (200, ["t06"], None)
    assert await every_page(http, server, "/v2/lt/paged/tags/list?n=2") == tags
    # containerd's ?ns= names the upstream; every next page keeps it.
    ns = f"?ns={proxy.host_port}&n=3"
    assert await every_page(http, server, f"/v2/lt/paged/tags/list{ns}") == tags
    async with http.get(f"{server.url}/v2/lt/paged/tags/list?n=3&ns={proxy.host_port}") as r:
        assert f"ns={proxy.host_port.replace(':', '%3A')}" in r.headers["Link"]
    async with http.get(f"{server.url}/v2/lt/paged/tags/list?n=x") as response:
        assert response.status == 400
        assert await error_code(response) == "PAGINATION_NUMBER_INVALID"
    assert len(proxy.tag_pages) == 3  # all within the TTL: the upstream was asked once


async def test_a_tag_list_is_cached_for_the_ttl_then_asked_again(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: PagingProxy,
    http: aiohttp.ClientSession,
) -> None:
    ttl = 3.0
    image = build_image(seed=3, layers=({"f": 10},))
    await push_image_to(http, upstream_registry.url, "lt/ttl", image, "a")
    await put_manifest(http, upstream_registry.url, "lt/ttl", "b", image.manifest)
    server = regmirror_server(env=upstream_env(proxy.url, tag_ttl=ttl))
    listed = time.monotonic()  # the list is fetched no earlier than this
    assert (await list_tags(http, server, "lt/ttl"))[1] == ["a", "b"]
    await put_manifest(http, upstream_registry.url, "lt/ttl", "c", image.manifest)
    assert (await list_tags(http, server, "lt/ttl"))[1] == ["a", "b"]
    assert time.monotonic() - listed < ttl, "tagging took longer than the TTL"
    assert proxy.count("GET", "tags") == 1

    async def listed_c() -> bool:
        return (await list_tags(http, server, "lt/ttl"))[1] == ["a", "b", "c"]

    await eventually(listed_c)
    assert proxy.count("GET", "tags") == 2


async def test_a_herd_of_tag_lists_makes_one_upstream_request(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: PagingProxy,
    http: aiohttp.ClientSession,
) -> None:
    tags = [f"h{i}" for i in range(5)]
    await tag_upstream(http, upstream_registry, "lt/herd", tags, seed=4)
    server = regmirror_server(env=upstream_env(proxy.url))
    proxy.page_size, proxy.tags_gate = 2, asyncio.Event()
    sent = Countdown(HERD)
    trace = aiohttp.TraceConfig()

    async def on_sent(*_: object) -> None:
        sent.arrive()

    trace.on_request_headers_sent.append(on_sent)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), trace_configs=[trace]
    ) as herd:
        clients = [asyncio.create_task(list_tags(herd, server, "lt/herd")) for _ in range(HERD)]
        await sent.wait()
        await asyncio.wait_for(proxy.tags_held.wait(), BOUND)
        proxy.tags_gate.set()
        results = await asyncio.wait_for(asyncio.gather(*clients), BOUND)
    assert all(result == (200, tags, None) for result in results)
    assert len(proxy.tag_pages) == 3  # one listing: its three pages


async def test_with_the_upstream_down_the_last_list_is_served_also_after_a_restart(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: PagingProxy,
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    await tag_upstream(http, upstream_registry, "lt/stale", ["s1", "s2"], seed=5)
    server = regmirror_server(env=upstream_env(proxy.url, tag_ttl=1))
    assert (await list_tags(http, server, "lt/stale"))[1] == ["s1", "s2"]
    await proxy.stop()

    async def served_stale() -> bool:
        assert await list_tags(http, server, "lt/stale") == (200, ["s1", "s2"], None)
        return "tags of" in server.logs(None) and "lt/stale stale" in server.logs(None)

    await eventually(served_stale)  # the TTL passed, the upstream failed, the list served
    async with http.get(f"{server.url}/v2/lt/never-listed/tags/list") as response:
        assert response.status == 503
        assert await error_code(response) == "UNAVAILABLE"

    with run_regmirror(
        tmp_path / "restarted", env=upstream_env(proxy.url, tag_ttl=1), data_dir=server.data_dir
    ) as restarted:
        assert await list_tags(http, restarted, "lt/stale") == (200, ["s1", "s2"], None)


async def test_tags_pushed_under_a_pulled_through_name_are_listed_with_the_upstreams(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: PagingProxy,
    http: aiohttp.ClientSession,
) -> None:
    await tag_upstream(http, upstream_registry, "lt/merged", ["b", "d"], seed=6)
    server = regmirror_server(env=upstream_env(proxy.url))
    ours = build_image(seed=7, layers=({"g": 5},))
    for tag in ("a", "d", "e"):
        await push_image_to(http, server.url, "lt/merged", ours, tag)
    await push_image_to(http, server.url, "lt/ours-only", ours, "x")

    assert await list_tags(http, server, "lt/merged") == (200, ["a", "b", "d", "e"], None)
    assert await list_tags(http, server, "lt/merged", "?n=3") == (
        200,
        ["a", "b", "d"],
        '</v2/lt/merged/tags/list?n=3&last=d>; rel="next"',
    )
    # The upstream does not know a name only pushed here, or is down: our tags still list.
    assert await list_tags(http, server, "lt/ours-only") == (200, ["x"], None)
    await proxy.stop()
    assert await list_tags(http, server, "lt/ours-only") == (200, ["x"], None)


async def test_tag_lists_are_routed_like_manifests(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: PagingProxy,
    http: aiohttp.ClientSession,
) -> None:
    await tag_upstream(http, upstream_registry, "lt/routed", ["r1"], seed=8)
    server = regmirror_server(env=upstream_env(proxy.url, prefix="up"))

    assert await list_tags(http, server, "up/lt/routed") == (200, ["r1"], None)
    assert proxy.tag_pages == ["/v2/lt/routed/tags/list"]  # the prefix stripped
    ns = f"?ns={proxy.host_port}"
    assert await list_tags(http, server, "lt/routed", ns) == (200, ["r1"], None)
    # No prefix, no ns: nobody's name; an upstream that does not know it: unknown.
    for repo, query in (("lt/routed", ""), ("up/lt/nothing", ""), ("lt/routed", "?ns=else.test")):
        async with http.get(f"{server.url}/v2/{repo}/tags/list{query}") as response:
            assert response.status == 404
            assert await error_code(response) == "NAME_UNKNOWN"
    assert proxy.tag_pages == ["/v2/lt/routed/tags/list", "/v2/lt/nothing/tags/list"]


async def test_skopeo_syncs_a_whole_mirrored_repository(
    regmirror_server: Start,
    upstream_registry: ServerProcess,
    proxy: PagingProxy,
    http: aiohttp.ClientSession,
    skopeo: Skopeo,
    tmp_path: Path,
) -> None:
    images = {
        tag: build_image(seed=10 + i, layers=({"s": 100 + i},))
        for i, tag in enumerate(("v1", "v2", "v3"))
    }
    for tag, image in images.items():
        await push_image_to(http, upstream_registry.url, "lt/sync", image, tag)
    proxy.page_size = 2
    server = regmirror_server(env=upstream_env(proxy.url))
    out = tmp_path / "synced"
    await asyncio.to_thread(
        skopeo.run,
        "sync",
        "--src",
        "docker",
        "--dest",
        "dir",
        "--src-tls-verify=false",
        "--preserve-digests",
        f"{server.host_port}/lt/sync",
        str(out),
    )
    synced = {path.name: path for path in out.rglob("*:*") if path.is_dir()}
    assert sorted(synced) == ["sync:v1", "sync:v2", "sync:v3"], sorted(out.rglob("*"))
    for tag, image in images.items():
        assert (synced[f"sync:{tag}"] / "manifest.json").read_bytes() == image.manifest.data


# -- the upstream client's tag list, against a fake upstream of these tests' own -------


@dataclass
class FakeTagPages:
    """A registry front that only lists tags: each page (by path and query) is a body
    and an optional ``Link``; every request needs the token ``/token`` hands out."""

    pages: dict[str, tuple[bytes, str | None]]
    url: str = ""
    scopes: list[str] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self._token)
        app.router.add_get("/v2/{path:.*}", self._page)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        self.scopes += request.query.getall("scope", [])
        return web.json_response({"token": "t0k", "expires_in": 300})

    async def _page(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer t0k":
            scope = "repository:lt/fake:pull"
            challenge = f'Bearer realm="{self.url}/token",service="fake",scope="{scope}"'
            return web.json_response({}, status=401, headers={"WWW-Authenticate": challenge})
        self.asked.append(request.path_qs)
        if request.path_qs not in self.pages:
            return web.json_response({"errors": [{"code": "NAME_UNKNOWN"}]}, status=404)
        body, link = self.pages[request.path_qs]
        return web.Response(body=body, headers={"Link": link} if link else {})


@contextlib.asynccontextmanager
async def fake_upstream(
    pages: dict[str, tuple[bytes, str | None]],
) -> AsyncIterator[tuple[Upstream, FakeTagPages]]:
    fake = FakeTagPages(pages)
    async with serve(fake.app()) as url, aiohttp.ClientSession() as session:
        fake.url = url
        yield Upstream(UpstreamSettings(url=url), session), fake


def page(*tags: object) -> bytes:
    return json.dumps({"name": "lt/fake", "tags": list(tags)}).encode()


LIST = "/v2/lt/fake/tags/list"


async def test_the_upstream_client_follows_link_pages_with_its_token() -> None:
    async with fake_upstream({}) as (upstream, fake):
        fake.pages.update(
            {
                LIST: (page("a", "b"), f'<{fake.url}{LIST}?n=2&last=b>; rel="next"'),
                f"{LIST}?n=2&last=b": (
                    page("c", "../up", 7, "d"),
                    f'<{LIST}?n=2&last=d>; rel="next"',
                ),
                f"{LIST}?n=2&last=d": (page("e"), None),
            }
        )
        assert await upstream.list_tags("lt/fake") == ["a", "b", "c", "d", "e"]
    assert fake.asked == [LIST, f"{LIST}?n=2&last=b", f"{LIST}?n=2&last=d"]
    assert set(fake.scopes) == {"repository:lt/fake:pull"}


@pytest.mark.parametrize(
    "pages",
    [
        {LIST: (page("a"), '<http://elsewhere.test/v2/lt/fake/tags/list?last=a>; rel="next"')},
        {LIST: (page("a"), '</v2/lt/other/tags/list?last=a>; rel="next"')},
        {
            LIST: (page("a"), f'<{LIST}?last=a>; rel="next"'),
            f"{LIST}?last=a": (page("b"), f'<{LIST}?last=a>; rel="next"'),
        },
        {LIST: (b"<html>not json</html>", None)},
        {LIST: (json.dumps({"tags": "a"}).encode(), None)},
    ],
    ids=["other-origin", "other-repository", "loop", "not-json", "not-a-list"],
)
async def test_the_upstream_client_refuses_tag_pages_it_cannot_trust(
    pages: dict[str, tuple[bytes, str | None]],
) -> None:
    async with fake_upstream(pages) as (upstream, _):
        with pytest.raises(UpstreamUnavailable):
            await upstream.list_tags("lt/fake")


async def test_the_upstream_client_lists_no_tags_for_null_and_none_for_an_unknown_name() -> None:
    async with fake_upstream(
        {LIST: (json.dumps({"name": "lt/fake", "tags": None}).encode(), None)}
    ) as (
        upstream,
        _,
    ):
        assert await upstream.list_tags("lt/fake") == []
        with pytest.raises(NameUnknown):
            await upstream.list_tags("lt/unknown")

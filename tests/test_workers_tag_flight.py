"""``server.workers``: a tag is asked upstream once per ``tag_ttl`` for the host, also
by a request that reaches a worker after another worker's tag flight has ended but
before that worker has recorded the tag's link (it records it once the manifest is
stored, later: the GET by digest comes first).

The window is held open: the manifest's GET by digest is held upstream while more
requests reach both workers. A worker that took only the outcome of a flight that ended
after its request began would HEAD the tag again (what made the manifest herd tests see
2-3 upstream HEADs with two workers under load: one worker's request began just after
the other's HEAD was answered).
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    ServerProcess,
    regmirror_server,
)
from tests.support.upstream import DOCKER_MANIFEST, push_image, serve, upstream_registry
from tests.test_workers import BOUND, session
from tests.test_workers_flight import (
    MANIFESTS,
    GatedProxy,
    Start,
    both_listening,
    fresh,
    served_by_both,
)

__all__ = ["session", "upstream_registry"]

LATER = 12  # requests sent once the first one's tag flight has ended


async def test_a_request_after_another_workers_tag_flight_ended_asks_no_second_head(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    image = await push_image(session, upstream_registry.url, "team/later")
    proxy = GatedProxy(upstream_registry.url, session)
    # The GET by digest: after the tag's HEAD (its flight over), before its link is written.
    proxy.gate = lambda method, path: method == "GET" and "/manifests/sha256:" in path
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={
                "upstreams": [{"url": upstream_url, "tag_ttl": 600}],
                "server": {"workers": 2},
            }
        )
        await both_listening(server)
        url = f"{server.url}/v2/team/later/manifests/latest"
        first = asyncio.ensure_future(fresh("GET", url, Accept=DOCKER_MANIFEST))
        try:
            await asyncio.wait_for(proxy.gated.wait(), BOUND)
            assert proxy.count("HEAD", "/manifests/latest") == 1, proxy.requests
            later = [
                asyncio.ensure_future(fresh("GET", url, Accept=DOCKER_MANIFEST))
                for _ in range(LATER)
            ]
            await asyncio.sleep(1.5)  # every one reached a worker, and asked if it would
        finally:
            proxy.opened.set()
        results = await asyncio.wait_for(asyncio.gather(first, *later), BOUND)

    assert all(status == 200 and body == image.manifest for status, body, _ in results)
    assert proxy.count("HEAD", "/manifests/latest") == 1, proxy.requests
    assert proxy.count("GET", f"/manifests/{image.digest}") == 1, proxy.requests
    served_by_both(server, MANIFESTS)  # the later requests reached the other worker too

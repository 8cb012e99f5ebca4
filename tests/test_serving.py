"""How a regmirror process serves: ``metrics_listen`` puts ``/metrics`` (and the probes) on
a port of their own, and SIGTERM drains requests in flight before the process exits."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from regmirror.config import ConfigError, load
from tests.support.certs import TestCA
from tests.support.http import session
from tests.support.processes import (  # noqa: F401  (pytest fixtures)
    HOST,
    ServerProcess,
    free_port,
    regmirror_server,
)
from tests.support.upstream import (
    DOCKER_MANIFEST,
    CountingProxy,
    push_image,
    serve,
    upstream_registry,
)

__all__ = ["session", "upstream_registry"]

BOUND = 30.0
Start = Callable[..., ServerProcess]


async def get(session: aiohttp.ClientSession, url: str, **kwargs: object) -> tuple[int, bytes]:
    async with session.get(url, **kwargs) as response:  # type: ignore[arg-type]
        return response.status, await response.read()


async def test_metrics_listen_serves_metrics_there_and_not_on_the_registry_port(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,
) -> None:
    probes = f"{HOST}:{free_port()}"
    server = regmirror_server(config={"metrics_listen": probes})
    status, body = await get(session, f"http://{probes}/metrics")
    assert status == 200 and b"regmirror_http_requests_total" in body
    status, body = await get(session, f"{server.url}/metrics")
    assert status == 404 and b"regmirror_" not in body
    status, body = await get(session, f"http://{probes}/-/status")  # regmirror status reads it
    assert status == 200 and json.loads(body)["version"]
    assert (await get(session, f"{server.url}/-/status"))[0] == 404
    for path in ("/healthz", "/readyz"):  # load balancers probe the registry port
        assert (await get(session, f"{server.url}{path}"))[0] == 200
        assert (await get(session, f"http://{probes}{path}"))[0] == 200
    assert (await get(session, f"http://{probes}/v2/"))[0] == 404  # no registry API there
    # One set of metrics: what the registry port answered is counted on the probe port.
    _, body = await get(session, f"http://{probes}/metrics")
    assert b'route="/v2/",status="200"' in body


async def test_metrics_listen_stays_plain_http_when_the_registry_port_is_https(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    ca = TestCA(tmp_path / "pki")
    issued = ca.server()
    probes = f"{HOST}:{free_port()}"
    config = {
        "metrics_listen": probes,
        "tls": {"cert": str(issued.cert), "key": str(issued.key)},
    }
    trust = ssl.create_default_context(cafile=str(ca.cert))
    server = regmirror_server(config=config, ssl_context=trust)
    assert (await get(session, f"{server.url}/v2/", ssl=trust))[0] == 200
    assert (await get(session, f"http://{probes}/metrics"))[0] == 200


def test_metrics_listen_must_be_host_port() -> None:
    with pytest.raises(ConfigError, match="metrics_listen"):
        load(environ={"REGMIRROR_METRICS_LISTEN": "nine-one-oh-five"}).metrics_host_port()
    settings = load(environ={"REGMIRROR_METRICS_LISTEN": "0.0.0.0:9105"})
    assert settings.metrics_host_port() == ("0.0.0.0", 9105)


async def test_sigterm_lets_a_pull_in_flight_finish_then_exits_cleanly(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    image = await push_image(
        session, upstream_registry.url, "team/drain", layer=b"\x07" * (3 * 1024 * 1024)
    )
    proxy = CountingProxy(upstream_registry.url, session)
    async with serve(proxy.app()) as upstream_url:
        probes = f"{HOST}:{free_port()}"
        server = regmirror_server(
            config={"upstreams": [{"url": upstream_url}], "metrics_listen": probes}
        )
        manifest = f"{server.url}/v2/team/drain/manifests/latest"
        assert (await get(session, manifest, headers={"Accept": DOCKER_MANIFEST}))[0] == 200
        proxy.hold_after = 1024 * 1024
        pull = asyncio.create_task(
            get(session, f"{server.url}/v2/team/drain/blobs/{image.layer_digest}")
        )
        try:
            await asyncio.wait_for(proxy.held.wait(), BOUND)  # the pull is mid-body
            server.stopped = True  # by this test, on purpose
            server.process.send_signal(signal.SIGTERM)
            # The listening sockets close first: a new connection is refused...
            await asyncio.wait_for(refused(session, f"{server.url}/healthz"), BOUND)
            # ...while the probe port, still answering, sends load balancers away.
            status, body = await get(session, f"http://{probes}/readyz")
            assert status == 503 and b"draining" in body
        finally:
            proxy.release.set()
        # ...while the pull in flight gets every byte.
        status, body = await asyncio.wait_for(pull, BOUND)
        assert status == 200 and body == image.layer
        code = await asyncio.to_thread(server.process.wait, BOUND)
    assert code == 0
    assert "draining 1 request(s) in flight" in server.logs()


async def refused(session: aiohttp.ClientSession, url: str) -> None:
    """Returns once ``url`` refuses connections (bounded by the caller). A connection
    accepted just before the signal may get no answer at all: it times out and we ask
    again."""
    while True:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as fresh:
                await get(fresh, url)  # a session of its own: no pooled connection
        except aiohttp.ClientConnectionError:
            return
        except TimeoutError:
            continue
        await asyncio.sleep(0.05)


async def test_sigterm_cuts_a_stalled_pull_at_drain_timeout_and_says_so(
    regmirror_server: Start,  # noqa: F811
    upstream_registry: ServerProcess,
    session: aiohttp.ClientSession,
) -> None:
    """``server.drain_timeout`` is the whole bound: aiohttp used to wait its shutdown
    timeout twice (~61 s for 30 s) and cut the client without a word."""
    image = await push_image(
        session, upstream_registry.url, "team/stall", layer=b"\x09" * (3 * 1024 * 1024)
    )
    proxy = CountingProxy(upstream_registry.url, session)
    async with serve(proxy.app()) as upstream_url:
        server = regmirror_server(
            config={"upstreams": [{"url": upstream_url}], "server": {"drain_timeout": 2}}
        )
        proxy.hold_after = 1024 * 1024  # the upstream stalls the pull mid-body
        pull = asyncio.create_task(
            get(session, f"{server.url}/v2/team/stall/blobs/{image.layer_digest}")
        )
        try:
            await asyncio.wait_for(proxy.held.wait(), BOUND)
            server.stopped = True  # by this test, on purpose
            started = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.process.wait, BOUND)
            took = time.monotonic() - started
            with pytest.raises(aiohttp.ClientError):  # cut: never a clean end of a short body
                await asyncio.wait_for(pull, BOUND)
        finally:
            proxy.release.set()
    assert code == 0
    assert 1.5 <= took < 2 + 3.0
    logs = server.logs()
    assert "draining 1 request(s) in flight on 1 connection(s) (up to 2 s" in logs
    assert "1 request(s) still in flight after 2.0 s: cut" in logs
    assert "1 request(s) cut at server.drain_timeout" in logs

"""The fast path (regmirror.lean): manifests held in memory answered below aiohttp.

Real server processes (two workers each, the default). Every answer is checked against
aiohttp's own for the same request (a server with ``server.fast_path: false`` over the
same content), byte for byte but the ``Date``; ``regmirror_http_fast_path_requests_total``
says which requests the fast path took.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import aiohttp
import pytest

from tests.support.fake_upstream import fake_upstream
from tests.support.fast_path import (
    FAST,
    REPO,
    WARM,
    exchange,
    get,
    narrow_connection,
    read_response,
    serving,
)
from tests.support.http import session  # noqa: F401
from tests.support.metrics import metric
from tests.support.oci_layout import Image, build_image
from tests.support.processes import HOST, ServerProcess, regmirror_server  # noqa: F401
from tests.support.pullthrough import push_image_to, stored_files, upstream_env

Start = Callable[..., ServerProcess]


@pytest.fixture
async def pair(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> tuple[ServerProcess, ServerProcess, Image]:
    """A server with the fast path and one without, holding the same image."""
    image = build_image(seed=41)
    fast = regmirror_server()
    slow = regmirror_server(config={"server": {"fast_path": False}})
    await serving(slow, session, image)
    await serving(
        fast,
        session,
        image,
        f"/v2/{REPO}/manifests/v1",
        f"/v2/{REPO}/blobs/{image.layers[0].digest}",
    )
    return fast, slow, image


async def test_answers_are_aiohttps_byte_for_byte_and_counted(
    pair: tuple[ServerProcess, ServerProcess, Image],
) -> None:
    fast, slow, image = pair
    digest = image.manifest.digest
    etag = f'"{digest}"'
    layer = image.layers[0].digest
    blob = f"/v2/{REPO}/blobs/{layer}"
    blobs = [
        get(blob),
        get(blob, method="HEAD"),
        get(blob, f'If-None-Match: "x", W/"{layer}"'),
        get(blob, "If-None-Match: *"),
        get(blob, 'If-None-Match: "sha256:other"'),
    ]
    manifests = [
        get(f"/v2/{REPO}/manifests/v1"),
        get(f"/v2/{REPO}/manifests/v1", method="HEAD"),
        get(f"/v2/{REPO}/manifests/{digest}"),
        get(f"/v2/{REPO}/manifests/v1", f"If-None-Match: {etag}"),
        get(f"/v2/{REPO}/manifests/v1", 'If-None-Match: "sha256:other"'),
        get(f"/v2/{REPO}/manifests/v1", "Accept: application/vnd.oci.image.manifest.v1+json"),
        get(f"/v2/{REPO}/manifests/v1?ns=docker.io"),
    ]
    left = [  # aiohttp's: errors, and what the fast path does not read
        get(f"/v2/{REPO}/manifests/nope"),
        get(f"/v2/{REPO}/manifests/{'sha256:' + '0' * 64}"),
        get("/v2/Bad_Name/manifests/v1"),
        get(f"/v2/{REPO}/manifests/bad%20tag"),
        get(f"/v2/{REPO}/manifests/v1?n=1"),
        get(f"/v2/{REPO}/manifests/v1", "Connection: close"),
        get(f"/v2/{REPO}/manifests/v1", version="1.0"),
        get(f"/v2/{REPO}/manifests/v1", method="DELETE"),
        get(blob, "Range: bytes=0-99"),
        get(blob, "Range: bytes=0-99", 'If-Range: "sha256:other"'),
        get(f"/v2/{REPO}/blobs/{'sha256:' + '1' * 64}"),
        get(f"/v2/other/blobs/{layer}"),  # not linked there
        get("/v2/"),
        get(f"/v2/{REPO}/manifests/v1", "X-Long: " + "x" * 9000),  # aiohttp's 400
        f"GET /v2/{REPO}/manifests/v1 HTTP/1.1\r\n\r\n".encode(),  # no Host: 400
    ]
    before = metric(fast, FAST)
    counted = metric(
        fast, "regmirror_http_requests_total", route="/v2/{name}/manifests/{reference}"
    )
    for request in blobs + manifests + left:
        assert await exchange(fast, request) == await exchange(slow, request), request
    assert metric(fast, FAST) - before == len(blobs) + len(manifests)
    after = metric(fast, "regmirror_http_requests_total", route="/v2/{name}/manifests/{reference}")
    assert (
        after - counted == len(manifests) + 8
    )  # and aiohttp's on that route (all but the one without Host)


async def test_a_request_waits_for_the_response_aiohttp_still_owes(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    """A manifest asked for on a connection while aiohttp still waits on an upstream
    for the request before it is answered after that one: responses keep their order."""
    async with fake_upstream("hang") as upstream:
        server = regmirror_server(env=upstream_env(upstream.url, prefix="hub"))
        image = build_image(seed=42)
        await serving(server, session, image)
        before = metric(server, FAST)
        reader, writer = await asyncio.open_connection(HOST, server.port)
        try:
            writer.write(get("/v2/hub/library/app/manifests/latest"))
            await asyncio.sleep(0.5)  # aiohttp waits on the upstream
            writer.write(get(f"/v2/{REPO}/manifests/v1"))
            await asyncio.sleep(0.5)
            await upstream.stop()  # its answer: 503
            first = await read_response(reader)
            second = await read_response(reader)
        finally:
            writer.close()
    assert not first.startswith(b"HTTP/1.1 200 "), first
    assert second.startswith(b"HTTP/1.1 200 OK") and second.endswith(image.manifest.data)
    assert metric(server, FAST) == before  # aiohttp answered it, after the first


async def test_a_connection_answered_by_the_fast_path_is_kept_alive_while_used(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    """aiohttp's keep-alive timer, which sees none of the fast path's requests, must
    not close a connection they keep busy; an idle one still closes."""
    image = build_image(seed=43)
    server = regmirror_server(config={"server": {"keepalive_timeout": 1.0}})
    await serving(server, session, image)
    before = metric(server, FAST)
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        for _ in range(10):  # 3 s: three keep-alive timeouts
            writer.write(get(f"/v2/{REPO}/manifests/v1"))
            assert (await read_response(reader)).endswith(image.manifest.data)
            await asyncio.sleep(0.3)
        assert metric(server, FAST) - before == 10
        assert await asyncio.wait_for(reader.read(), 5) == b""  # idle: closed
    finally:
        writer.close()


async def test_a_request_split_over_reads_is_aiohttps_and_so_is_the_rest(
    pair: tuple[ServerProcess, ServerProcess, Image],
) -> None:
    fast, _, image = pair
    before = metric(fast, FAST)
    reader, writer = await asyncio.open_connection(HOST, fast.port)
    try:
        request = get(f"/v2/{REPO}/manifests/v1")
        writer.write(request[:20])
        await asyncio.sleep(0.2)
        writer.write(request[20:])
        for _ in range(3):
            assert (await read_response(reader)).endswith(image.manifest.data)
            writer.write(request)
        assert (await read_response(reader)).endswith(image.manifest.data)
        # Two requests in one write (pipelined): both answered, in order.
        writer.write(get(f"/v2/{REPO}/manifests/v1", method="HEAD") + request)
        assert b"Content-Length: " in await read_response(reader, b"HEAD")
        assert (await read_response(reader)).endswith(image.manifest.data)
    finally:
        writer.close()
    assert metric(fast, FAST) == before


async def test_a_tag_moved_or_deleted_through_one_worker_is_seen_by_every_other(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    server = regmirror_server()
    first, second = build_image(seed=44), build_image(seed=45)
    await push_image_to(session, server.url, REPO, first, "v1")
    for _ in range(WARM):
        assert (await exchange(server, get(f"/v2/{REPO}/manifests/v1"))).endswith(
            first.manifest.data
        )
    await push_image_to(session, server.url, REPO, second, "v1")
    for _ in range(WARM):
        assert (await exchange(server, get(f"/v2/{REPO}/manifests/v1"))).endswith(
            second.manifest.data
        )
    async with session.delete(
        f"{server.url}/v2/{REPO}/manifests/{second.manifest.digest}"
    ) as response:
        assert response.status == 202
    for _ in range(WARM):
        assert (await exchange(server, get(f"/v2/{REPO}/manifests/v1"))).startswith(
            b"HTTP/1.1 404 "
        )


async def test_a_blob_the_socket_cannot_take_at_once_is_sent_whole_then_the_next_answer(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    """A body larger than the kernel buffers (a client reading slowly) goes on from a
    task; the next request on the connection is answered after it."""
    image = build_image(seed=46, layers=[{"size": 24 * 1024 * 1024, "seed": 6}])
    server = regmirror_server()
    layer = image.layers[0]
    path = f"/v2/{REPO}/blobs/{layer.digest}"
    await serving(server, session, image, path, f"/v2/{REPO}/manifests/v1")
    before = metric(server, FAST)
    reader, writer = await narrow_connection(server)
    try:
        writer.write(get(path))
        await asyncio.sleep(0.5)  # the body waits on the client
        writer.write(get(f"/v2/{REPO}/manifests/v1"))
        blob = await read_response(reader)
        manifest = await read_response(reader)
    finally:
        writer.close()
    assert blob.endswith(layer.data) and len(blob) < len(layer.data) + 1024
    assert manifest.startswith(b"HTTP/1.1 200 OK") and manifest.endswith(image.manifest.data)
    assert metric(server, FAST) - before == 2


async def test_a_blob_file_shortened_in_place_is_cut_never_ended_clean(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    image = build_image(seed=47)
    server = regmirror_server()
    layer = image.layers[0]
    path = f"/v2/{REPO}/blobs/{layer.digest}"
    await serving(server, session, image, path, f"/v2/{REPO}/manifests/v1")
    before = metric(server, FAST)
    [stored] = stored_files(server.data_dir, layer.digest)
    os.truncate(stored, len(layer.data) // 2)  # the same inode, shorter
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        writer.write(get(path))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        body = await asyncio.wait_for(reader.read(), 10)  # until the server closes
    finally:
        writer.close()
    assert f"Content-Length: {len(layer.data)}".encode() in head
    assert len(body) == len(layer.data) // 2
    assert metric(server, FAST) - before == 1


async def test_a_drain_lets_a_blob_body_in_flight_finish(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    image = build_image(seed=48, layers=[{"size": 24 * 1024 * 1024, "seed": 7}])
    server = regmirror_server(config={"server": {"drain_timeout": 20}})
    layer = image.layers[0]
    path = f"/v2/{REPO}/blobs/{layer.digest}"
    await serving(server, session, image, path, f"/v2/{REPO}/manifests/v1")
    before = metric(server, FAST)
    reader, writer = await narrow_connection(server)
    try:
        writer.write(get(path))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        first = await asyncio.wait_for(reader.readexactly(1024 * 1024), 10)
        assert metric(server, FAST) - before == 1  # the fast path sends it
        server.stopped = True  # by this test, on purpose
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(1.0)  # draining: the body goes on
        rest = await asyncio.wait_for(reader.read(), 20)  # to the end: then closed
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert first + rest == layer.data
    assert server.process.wait(20) == 0

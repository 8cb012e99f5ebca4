"""An adversarial review of the fast path (regmirror.lean): what it must do as aiohttp's
path does, beyond the bytes of one answer (tests/test_lean.py): the bounds a connection
is held to, and what is counted; and a seeded differential fuzz of single requests.

Real server processes (two workers each, the default), compared with a server run with
``server.fast_path: false`` where the behaviour is aiohttp's.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import struct
import time
import urllib.request
from collections.abc import Callable

import aiohttp
import pytest

from tests.support.fast_path import FAST, REPO, WARM, exchange, get, narrow_connection, warm
from tests.support.http import session  # noqa: F401
from tests.support.metrics import metric
from tests.support.oci_layout import Blob, build_image
from tests.support.processes import HOST, ServerProcess, regmirror_server  # noqa: F401
from tests.support.pullthrough import push_image_to, put_manifest, stored_files

Start = Callable[..., ServerProcess]


async def unread_for(
    server: ServerProcess, request: bytes, seconds: float, times: int = 1
) -> bytes:
    """``request`` (``times`` over, one write each) from a client with a small window that
    reads nothing for ``seconds``, then all it can until the connection ends (or 5 s)."""
    reader, writer = await narrow_connection(server, 4096)
    got = bytearray()
    try:
        for _ in range(times):
            writer.write(request)
            await asyncio.sleep(0.2)
        await asyncio.sleep(seconds)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(1 << 16), 1)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            got += chunk
    finally:
        writer.close()
    return bytes(got)


@pytest.mark.parametrize("fast_path", [True, False])
async def test_a_large_manifest_its_client_does_not_read_is_cut_after_send_timeout(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
    fast_path: bool,
) -> None:
    """A manifest of megabytes written to a client that takes none of it: aiohttp's
    path waits for the client as a request in progress, which ``send_timeout`` cuts; the
    fast path wrote it all to the transport and called the connection idle, whose
    keep-alive close waits to flush it forever (the descriptor held by nobody's timer)."""
    image = build_image(seed=61)
    body = json.loads(image.manifest.data)
    body["annotations"]["padding"] = "x" * (3 * 1024 * 1024)
    big = Blob(image.manifest.media_type, json.dumps(body).encode())
    server = regmirror_server(
        config={"server": {"fast_path": fast_path, "send_timeout": 1.0, "keepalive_timeout": 1.0}}
    )
    await push_image_to(session, server.url, REPO, image, "v1")
    await put_manifest(session, server.url, REPO, "big", big)
    for _ in range(WARM):
        assert (await exchange(server, get(f"/v2/{REPO}/manifests/big"))).endswith(big.data)
    before = metric(server, FAST)
    # Twice: more than the kernel's buffers between the two sockets can hold.
    got = await unread_for(server, get(f"/v2/{REPO}/manifests/big"), 6.0, times=2)
    assert (metric(server, FAST) - before >= 1) == fast_path
    assert got.startswith(b"HTTP/1.1 200 OK")
    assert len(got) < 2 * len(big.data), len(got)  # cut, not kept waiting for the client


@pytest.mark.parametrize("read_mib", [1, 8])  # before, and after, the sending task sent some
async def test_a_client_gone_mid_blob_is_a_disconnect_not_a_short_file(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
    read_mib: int,
) -> None:
    """asyncio's sendfile says a peer that went away with a plain ConnectionError
    ("Connection closed by peer"), as aiohttp's path knows (api.envelope): the fast path
    called it an abort, warned that the file on disk held fewer bytes than its size,
    forgot the blob, and logged only the bytes sent before its task began."""
    image = build_image(seed=62, layers=[{"size": 24 * 1024 * 1024, "seed": 8}])
    server = regmirror_server()
    await push_image_to(session, server.url, REPO, image, "v1")
    layer = image.layers[0]
    path = f"/v2/{REPO}/blobs/{layer.digest}"
    await warm(server, path)
    before = metric(server, FAST)
    reader, writer = await narrow_connection(server)
    try:
        writer.write(get(path))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        await asyncio.wait_for(reader.readexactly(read_mib * 1024 * 1024), 10)
        assert metric(server, FAST) - before == 1
        client = writer.get_extra_info("socket")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    finally:
        writer.close()
    line = await access_line(server, f"GET {path} ")
    assert "bytes on disk" not in server.logs(None)
    assert line.endswith(" ended=client_disconnect"), line
    sent = int(line.split('" 200 ', 1)[1].split(" ", 1)[0])
    assert read_mib * 1024 * 1024 <= sent < len(layer.data)  # what went out, its task's too


async def access_line(server: ServerProcess, request: str) -> str:
    """The access line of ``request`` ("GET /path "), once written."""
    for _ in range(100):
        lines = [line for line in server.logs(None).splitlines() if f'"{request}' in line]
        if lines:
            return lines[-1]
        await asyncio.sleep(0.05)
    raise AssertionError(f"no access line for {request}")


async def test_a_blob_file_that_cannot_be_opened_is_aiohttps_error_not_a_dropped_connection(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    """An OSError other than "not found" (here EISDIR; EMFILE, EIO, ELOOP alike) escaped
    the fast path out of ``data_received``: asyncio dropped the connection with a
    "Fatal error" traceback, where aiohttp's path answers its error envelope."""
    image = build_image(seed=63)
    fast = regmirror_server()
    slow = regmirror_server(config={"server": {"fast_path": False}})
    layer = image.layers[0]
    path = f"/v2/{REPO}/blobs/{layer.digest}"
    answers = []
    for server in (fast, slow):
        await push_image_to(session, server.url, REPO, image, "v1")
        for _ in range(WARM):
            assert (await exchange(server, get(path))).startswith(b"HTTP/1.1 200")
        [stored] = stored_files(server.data_dir, layer.digest)
        stored.unlink()
        stored.mkdir()  # behind the process's back: open() fails, and not with ENOENT
        answers.append(await exchange(server, get(path)))
    assert answers[0] == answers[1]
    assert answers[0].startswith(b"HTTP/1.1 5"), answers[0]
    assert "Fatal error" not in fast.logs(None)


async def test_a_blob_body_cut_at_send_timeout_is_not_called_a_short_file(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    """A client that takes none of a blob's body is cut at ``send_timeout`` (as on
    aiohttp's path); the fast path also warned that the file on disk held fewer bytes
    than its size, and forgot the blob, as for a file shortened in place."""
    image = build_image(seed=64, layers=[{"size": 24 * 1024 * 1024, "seed": 9}])
    server = regmirror_server(config={"server": {"send_timeout": 1.0}})
    await push_image_to(session, server.url, REPO, image, "v1")
    layer = image.layers[0]
    path = f"/v2/{REPO}/blobs/{layer.digest}"
    await warm(server, path)
    before = metric(server, FAST)
    got = await unread_for(server, get(path), 4.0)
    assert metric(server, FAST) - before == 1
    assert got.startswith(b"HTTP/1.1 200 OK") and len(got) < len(layer.data)
    line = await access_line(server, f"GET {path} ")
    assert line.endswith(" ended=aborted"), line
    assert "server.send_timeout" in server.logs(None)
    assert "bytes on disk" not in server.logs(None)


# -- a seeded differential fuzz: what held up --------------------------------------------

FUZZ_REQUESTS = 240
FUZZ_SEED = 7
COUNTED = re.compile(
    r"regmirror_(http_requests_total|bytes_served_total|cache_requests_total"
    r"|http_request_duration_seconds_count)"
)
ACCESS = re.compile(r"regmirror\.access: (.*) \d+\.\d+ (tier=.*)$")


def access_lines(server: ServerProcess) -> list[str]:
    """The access lines so far, their duration left out (but this test's /metrics reads)."""
    return [
        f"{m[1]} {m[2]}"
        for line in server.logs(None).splitlines()
        if (m := ACCESS.search(line)) and '"GET /metrics ' not in line
    ]


def counted(server: ServerProcess) -> dict[str, float]:
    """The request, byte and cache counters, summed over the workers (but /metrics')."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if COUNTED.match(line) and 'route="/metrics"' not in line:
            key, value = line.rsplit(" ", 1)
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def fuzzed(manifest: str, layer: str) -> list[bytes]:
    """Requests with odd but valid (and some invalid) lines and headers, from one seed."""
    rng = random.Random(FUZZ_SEED)
    paths = [
        f"/v2/{REPO}/manifests/v1",
        f"/v2/{REPO}/manifests/{manifest}",
        f"/v2/{REPO}/blobs/{layer}",
        f"/v2/{REPO}/manifests/v1?",
        f"/v2/{REPO}/manifests/v1?ns=docker.io",
        f"/v2/{REPO}/blobs/{layer}?ns=a=b",
        f"/v2/{REPO}/manifests/v1?ns=a;b",
        f"/v2/{REPO}/manifests/v1#frag",
        f"/v2/{REPO}//manifests/v1",
        f"/v2/{REPO}/manifests/{manifest.upper()}",
        f"/v2/{REPO}/blobs/{layer}/",
        f"/v2/./{REPO}/manifests/v1",
        f"//v2/{REPO}/manifests/v1",
        f"/v2/{REPO}/manifests/v1?ns=docker.io&ns=quay.io",
        f"/v2/{REPO}/manifests/v1?ns=a+b",
        f"/v2/{REPO}/manifests/v1?ns=a|b",
    ]
    hosts = [f"Host: {HOST}", f"host: {HOST}", f"HOST: {HOST}", "Host:", f"Host:\t{HOST}"]
    extras = [
        [f'If-None-Match: "{manifest}"'],
        [f'If-None-Match: W/"{layer}"'],
        ["If-None-Match: *"],
        ["If-None-Match: x", f'If-None-Match: "{layer}"'],
        [f'If-None-Match: "{manifest}"', "If-None-Match: x"],
        ["If-None-Match:"],
        ["Accept: application/vnd.oci.image.index.v1+json", "Accept: */*"],
        ["X-Forwarded-For: 1.2.3.4", "X-Forwarded-For: 5.6.7.8"],
        ["Content-Length: 0"],
        ["Content-Length: 00"],
        ["Connection: keep-alive"],
        ["Connection: close, keep-alive"],
        ["Range: bytes=0-"],
        ["If-Range: x"],
        ["X-Weird: a\x01b"],
        ["X-Weird : a"],
        ["X-Weird: a\r\n b"],
        ["X-W\xe9ird: \xe9"],
        ["Transfer-Encoding: identity"],
        ["Expect: 100-continue"],
    ]
    requests = []
    for _ in range(FUZZ_REQUESTS):
        method = rng.choice(["GET", "HEAD", "GET", "HEAD", "get", "OPTIONS"])
        version = rng.choice(["HTTP/1.1"] * 8 + ["HTTP/1.0", "HTTP/2.0"])
        lines = [rng.choice(hosts)]
        for _ in range(rng.randrange(3)):
            lines += rng.choice(extras)
        rng.shuffle(lines)
        start = f"{method} {rng.choice(paths[:3] * 4 + paths)} {version}"
        requests.append(("\r\n".join([start, *lines]) + "\r\n\r\n").encode("latin-1"))
    return requests


async def test_fuzzed_requests_get_aiohttps_bytes_access_lines_and_counts(
    regmirror_server: Start,  # noqa: F811
    session: aiohttp.ClientSession,  # noqa: F811
) -> None:
    image = build_image(seed=65)
    fast = regmirror_server()
    slow = regmirror_server(config={"server": {"fast_path": False}})
    layer = image.layers[0].digest
    for server in (fast, slow):
        await push_image_to(session, server.url, REPO, image, "v1")
        for _ in range(WARM):
            await exchange(server, get(f"/v2/{REPO}/manifests/v1"))
            await exchange(server, get(f"/v2/{REPO}/blobs/{layer}", method="HEAD"))
    before = metric(fast, FAST)
    counts = counted(fast), counted(slow)
    seen = len(access_lines(fast)), len(access_lines(slow))
    for request in fuzzed(str(image.manifest.digest), str(layer)):
        assert await exchange(fast, request) == await exchange(slow, request), request
    await asyncio.sleep(0.5)  # the last lines written
    # The same lines, in whichever order the two workers wrote them.
    lines = access_lines(fast)[seen[0] :], access_lines(slow)[seen[1] :]
    assert sorted(lines[0]) == sorted(lines[1])
    assert metric(fast, FAST) - before > FUZZ_REQUESTS // 4  # the fast path answered many
    after = counted(fast), counted(slow)
    for key in set(after[0]) | set(after[1]):
        grew = [a.get(key, 0.0) - b.get(key, 0.0) for a, b in zip(after, counts, strict=True)]
        assert grew[0] == grew[1], key

"""The fast path's reading of requests (regmirror.lean.wire) and of paths
(regmirror.lean.gate): what it takes, and what it leaves to aiohttp."""

from __future__ import annotations

import pytest

from regmirror.digest import Digest
from regmirror.lean.gate import _route
from regmirror.lean.wire import RequestReader

GET = b"GET /v2/a/b/manifests/v1 HTTP/1.1\r\nHost: x\r\nAccept: a\r\nAccept: b\r\n\r\n"
DIGEST = "sha256:" + "a" * 64


def test_one_whole_request_is_read_with_its_headers_in_order() -> None:
    reader = RequestReader()
    head = reader.read(GET)
    assert head is not None
    assert (head.method, head.path, head.query) == (b"GET", b"/v2/a/b/manifests/v1", b"")
    assert head.headers[b"accept"] == [b"a", b"b"] and head.headers[b"host"] == [b"x"]
    again = reader.read(GET.replace(b"v1 ", b"v1?ns=docker.io "))  # the next one
    assert again is not None and again.query == b"ns=docker.io"


@pytest.mark.parametrize(
    "data",
    [
        GET[:20],  # part of one
        GET + GET,  # two (pipelined)
        GET + b"GET /v2/",  # one and part of the next
        GET.replace(b"Host: x", b"Host: x\r\nContent-Length: 3") + b"abc",  # a body
        GET.replace(b"Host: x", b"Host: x\r\nTransfer-Encoding: chunked") + b"0\r\n\r\n",
        GET.replace(b"Host: x", b"Host: x\r\nConnection: close"),
        GET.replace(b"HTTP/1.1", b"HTTP/1.0"),
        GET.replace(b"Host: x", b"Host: x\r\nExpect: 100-continue"),
        GET.replace(b"Host: x", b"Host: x\r\nUpgrade: websocket\r\nConnection: upgrade"),
        GET.replace(b"Host: x", b"Host: x\r\nX-Long: " + b"x" * 9000),
        b"get /v2/ HTTP/1.1\r\n\r\n",  # not HTTP
        b"\x16\x03\x01\x02\x00",  # a TLS hello on the plain port
    ],
)
def test_anything_but_one_whole_request_without_a_body_is_left_to_aiohttp(data: bytes) -> None:
    assert RequestReader().read(data) is None


def test_a_request_with_an_empty_body_is_still_one_whole_request() -> None:
    assert RequestReader().read(GET.replace(b"Host: x", b"Host: x\r\nContent-Length: 0"))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v2/a/b/manifests/v1", ("manifests", "a/b", "v1")),
        (f"/v2/a/manifests/{DIGEST}", ("manifests", "a", Digest.parse(DIGEST))),
        (f"/v2/a/blobs/{DIGEST}", ("blobs", "a", Digest.parse(DIGEST))),
        # aiohttp's ``{name:.+}`` takes the longest name: so does the fast path.
        (f"/v2/a/manifests/b/blobs/{DIGEST}", ("blobs", "a/manifests/b", Digest.parse(DIGEST))),
        ("/v2/a/blobs/b/manifests/v1", ("manifests", "a/blobs/b", "v1")),
        ("/v2/a/blobs/uploads/", None),
        ("/v2/a/blobs/uploads/0123", None),
        ("/v2/a/blobs/latest", None),  # a blob is asked for by digest
        ("/v2/A/manifests/v1", None),  # NAME_INVALID is aiohttp's answer
        ("/v2/a/manifests/-bad", None),
        ("/v2/a%2Fb/manifests/v1", None),  # escapes: aiohttp's router decodes them
        ("/v2/a/manifests/", None),
        ("/v2/a/tags/list", None),
        ("/v2/", None),
        ("/metrics", None),
    ],
)
def test_paths_are_read_as_aiohttps_router_reads_them(path: str, expected: object) -> None:
    assert _route(path.encode()) == expected

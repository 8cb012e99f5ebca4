"""Requests read whole from one chunk of a connection's bytes, and responses written the
way aiohttp writes them.

The parser is httptools' (llhttp, the parser aiohttp's own is built on), one per
connection: it follows the connection's messages as long as every chunk holds exactly
one complete request without a body. Any other chunk ends it (:meth:`RequestReader.read`
answers None, and the connection is aiohttp's alone from then on).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import formatdate

import httptools
from aiohttp.http import SERVER_SOFTWARE

from regmirror.api.envelope import API_VERSION

# aiohttp refuses a request line or header longer than this (400): such a request is
# left to it.
MAX_HEAD = 8190
# The header lines aiohttp adds after a handler's, besides Content-Length and Date.
TRAILING_HEADERS = (
    f"Server: {SERVER_SOFTWARE}\r\n"
    + "".join(f"{name}: {value}\r\n" for name, value in API_VERSION.items())
    + "\r\n"
).encode()


@dataclass(slots=True)
class Head:
    """A request line and its headers (names lower-cased; each header's values in order)."""

    method: bytes
    path: bytes
    query: bytes
    headers: dict[bytes, list[bytes]]


class RequestReader:
    """The requests of one connection, as long as each chunk read holds one whole."""

    __slots__ = ("_begun", "_body", "_complete", "_headers", "_kept", "_method", "_parser", "_url")

    def __init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[bytes, list[bytes]] = {}
        self._begun = self._complete = 0
        self._body = False
        self._kept = False  # an HTTP/1.1 request that keeps the connection open
        self._method = b""

    def read(self, data: bytes) -> Head | None:
        """The one complete HTTP/1.1 keep-alive request without a body that ``data``
        holds; None when it holds anything else (part of one, more than one, a body, an
        upgrade, bytes that are not HTTP): then this reader is spent."""
        if len(data) > MAX_HEAD:
            return None
        self._url = b""
        self._headers = {}
        self._begun = self._complete = 0
        self._body = self._kept = False
        parser = self._parser
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return None
        headers = self._headers
        length = headers.get(b"content-length")
        if (
            self._begun != 1
            or self._complete != 1
            or self._body
            or not self._kept
            or b"transfer-encoding" in headers
            or b"upgrade" in headers
            or b"expect" in headers
            or (length is not None and length != [b"0"])
        ):
            return None
        path, _, query = self._url.partition(b"?")
        return Head(self._method, path, query, headers)

    # -- httptools' callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        self._begun += 1

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.setdefault(name.lower(), []).append(value)

    def on_headers_complete(self) -> None:
        # Asked now: once the message is complete the parser is reset for the next one.
        parser = self._parser
        self._kept = parser.get_http_version() == "1.1" and parser.should_keep_alive()
        self._method = parser.get_method()

    def on_body(self, body: bytes) -> None:
        self._body = True

    def on_message_complete(self) -> None:
        self._complete += 1


def status_head(status: str, headers: Mapping[str, str], *, without: str = "") -> bytes:
    """A response's status line and ``headers`` (but ``without``) as aiohttp writes them:
    what comes before the lines :meth:`Clock.end_of_head` adds."""
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k != without)
    return f"HTTP/1.1 {status}\r\n{lines}".encode()


class Clock:
    """The ``Date`` header line, formatted once a second as aiohttp does."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def date_line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = f"Date: {formatdate(now, usegmt=True)}\r\n".encode()
        return self._line

    def end_of_head(self) -> bytes:
        """The lines aiohttp adds after a handler's headers, and the blank line."""
        return self.date_line() + TRAILING_HEADERS

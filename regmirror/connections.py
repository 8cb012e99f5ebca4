"""A listening port that bounds its clients: how many connections, how long a client
may take to send its headers, and how SIGTERM drains the requests in flight.

aiohttp's ``TCPSite`` has none of these bounds: a client that sends half a request line
holds a connection (and a file descriptor) until the keep-alive timeout; enough of them
exhaust the fd limit, and then asyncio's accept loop fails with EMFILE, logging an
error every second while nobody new gets in. Its shutdown waits its timeout once for
the handlers and once more after cancelling them.

:class:`Listener` serves an aiohttp ``AppRunner`` on its own ``asyncio.Server`` whose
protocol wraps aiohttp's per-connection handler (:class:`_Connection`, forwarding every
call), which lets it

- close a connection whose request headers are not complete ``header_timeout``
  seconds after it opened, or after the first byte of its next request, and one idle
  for ``keepalive_timeout`` seconds after its last response (aiohttp's own keep-alive
  timer cannot see the requests the fast path answers);
- close a connection whose client acknowledges none of what was sent to it for
  ``send_timeout`` seconds while a response waits to go (a client that stopped reading:
  its zero TCP window would otherwise hold the connection, and at the bound everyone
  else's, until the process stops); a slow reader that makes progress is never cut;
- keep at most ``max_connections`` open: a new one beyond it displaces the connection
  idle the longest (no request in progress: a slow or idle client), else it is refused;
  one WARNING line says so, at most every ``LIMIT_LOG_PERIOD`` seconds;
- drain within one total bound: stop listening, close idle connections, let requests
  in flight finish until the deadline, then cut what is left, logging both ends.

A request is "in progress" from the moment aiohttp hands it to the application until
the task handling it is done (the response written, a file response's sendfile too).

With a fast path (:mod:`regmirror.lean`), a connection's request that arrives whole and
that the fast path answers from memory is answered here, without aiohttp: only while
aiohttp has nothing of the connection's in progress, so responses keep their order.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import resource
import socket
import struct
import termios
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ssl import SSLContext
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from regmirror.lean.blobs import BlobBody
from regmirror.lean.wire import Head, RequestReader
from regmirror.log_limits import RateLimit

log = logging.getLogger("regmirror")

BACKLOG = 1024  # the kernel caps it at net.core.somaxconn
LIMIT_LOG_PERIOD = 10.0
FD_RESERVE_FRACTION = 8  # 1/8 of the fd limit stays for files, upstreams and S3
FD_RESERVE_MIN = 64
CUT_GRACE = 1.0  # seconds aiohttp gets to finish handlers the drain has cut
# aiohttp's own keep-alive timeout: longer than any connection lives, since the listener
# closes idle connections itself (server.keepalive_timeout).
AIOHTTP_KEEPALIVE = 365 * 86400.0

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
# The fast path: (request, client address, plain TCP) -> the whole response, or a stored
# blob's to send, or None for aiohttp to answer it (regmirror.lean.path.FastPath).
FastPath = Callable[[Head, str | None, bool], bytes | BlobBody | None]


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 15.0
    keepalive_timeout: float = 75.0
    max_connections: int = 2048
    send_timeout: float = 60.0


# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a __u64 after 8 bytes of flags, 24
# __u32 and two __u64 (pacing rates); Linux 4.1 and later.
_TCP_INFO_BYTES = 232
_BYTES_ACKED_AT = 120
_INT = struct.Struct("i")


def send_progress(transport: asyncio.BaseTransport) -> tuple[int, int] | None:
    """(bytes the client has acknowledged, bytes waiting for it: in the transport's buffer
    or the socket's send queue), or None where the kernel does not say (not Linux TCP)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
        queued = _INT.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(_INT.size)))[0]
    except (OSError, AttributeError, ValueError):
        return None
    if len(info) < _BYTES_ACKED_AT + 8:
        return None
    (acked,) = struct.unpack_from("=Q", info, _BYTES_ACKED_AT)
    buffered = getattr(transport, "get_write_buffer_size", lambda: 0)()
    return acked, queued + buffered


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (Python keeps the soft
    one, often 1024); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_bound(configured: int, fd_limit: int, ports: int = 1) -> int:
    """``configured``, lowered so that ``ports`` listeners at their bound leave a reserve
    of descriptors under ``fd_limit``."""
    reserve = max(FD_RESERVE_MIN, fd_limit // FD_RESERVE_FRACTION)
    return max(1, min(configured, (fd_limit - reserve) // ports))


class Listener:
    """``runner`` (set up, without sites) served on ``host:port`` within ``limits``."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        limits: Limits,
        ssl_context: SSLContext | None = None,
        name: str = "registry",
        reuse_port: bool = False,
        fast: FastPath | None = None,
    ):
        """``reuse_port``: one of several processes listening on the port
        (:mod:`regmirror.workers`); the kernel spreads new connections over them.
        ``fast``: what is answered without aiohttp (:mod:`regmirror.lean`)."""
        assert runner.server is not None, "runner.setup() first"
        self.runner = runner
        self.host, self.port = host, port
        self.limits = limits
        self.ssl_context = ssl_context
        self.name = name
        self.reuse_port = reuse_port
        self.fast = fast
        self._server: asyncio.base_events.Server | None = None
        self._open: dict[RequestHandler, _Connection] = {}
        self._idle: OrderedDict[_Connection, None] = OrderedDict()  # longest idle first
        self._limit_log = RateLimit(burst=1, period=LIMIT_LOG_PERIOD)
        self.displaced = 0
        self._closed = False
        self.refused = 0
        server = runner.server
        application = server.request_handler
        server.request_handler = self._tracking(application)

    @property
    def connections(self) -> int:
        return len(self._open)

    @property
    def requests(self) -> int:
        """Requests in progress."""
        return sum(1 for conn in self._open.values() if conn.busy)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._protocol,
            self.host,
            self.port,
            ssl=self.ssl_context,
            # A TLS client is handed to the protocol only after its handshake.
            ssl_handshake_timeout=self.limits.header_timeout if self.ssl_context else None,
            backlog=BACKLOG,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
        )

    def stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()  # the listening sockets only; connections stay

    async def drain(self, timeout: float) -> int:
        """Stop listening, close idle connections, wait up to ``timeout`` seconds for the
        requests in flight, cut the rest; then aiohttp's and the app's own cleanup. The
        number of requests cut."""
        self.stop_listening()
        started = time.monotonic()
        for conn in list(self._open.values()):
            conn.finish_after_request()
        if self.requests:
            await self._wait_idle(timeout)
        left = self.requests
        if left:
            log.warning(
                "drain of %s port: %d request(s) still in flight after %.1f s: cut",
                self.name,
                left,
                time.monotonic() - started,
            )
            for conn in list(self._open.values()):
                conn.cut()
        for conn in list(self._open.values()):
            conn.close()
        await self.close()
        return left

    async def close(self) -> None:
        """aiohttp's and the app's own cleanup (once). Nothing is left to wait for but
        cut handlers unwinding: the runner was made with ``shutdown_timeout=CUT_GRACE``."""
        self.stop_listening()
        if not self._closed:
            self._closed = True
            await self.runner.cleanup()

    async def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.requests and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    # -- connections ------------------------------------------------------------------

    def _protocol(self) -> _Connection:
        assert self.runner.server is not None
        return _Connection(self, self.runner.server())

    def _admit(self, conn: _Connection) -> bool:
        if len(self._open) >= self.limits.max_connections:
            victim = next(iter(self._idle), None)
            if victim is None:
                self.refused += 1
                self._log_limit()
                return False
            self.displaced += 1
            self._log_limit()
            self._forget(victim)
            victim.close()
        self._open[conn.handler] = conn
        self._idle[conn] = None
        return True

    def _log_limit(self) -> None:
        if self._limit_log.allow():
            log.warning(
                "%s port: %d connections open, the bound (server.max_connections %d): "
                "closed %d idle or slow connections and refused %d new ones so far",
                self.name,
                len(self._open),
                self.limits.max_connections,
                self.displaced,
                self.refused,
            )

    def _forget(self, conn: _Connection) -> None:
        self._open.pop(conn.handler, None)
        self._idle.pop(conn, None)

    def _set_busy(self, conn: _Connection, busy: bool) -> None:
        if busy:
            self._idle.pop(conn, None)
        elif conn.handler in self._open:
            self._idle[conn] = None
            self._idle.move_to_end(conn)

    def _tracking(self, application: Handler) -> Handler:
        # Not a coroutine itself: it hands aiohttp the application's, one frame less per
        # request; aiohttp awaits it in the task that handles the request.
        def handle(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
            conn = self._open.get(request.protocol)
            task = asyncio.current_task()
            if conn is not None and task is not None:
                conn.request_started(task)
            return application(request)

        return handle


class _Connection(asyncio.Protocol):
    """One client connection: aiohttp's handler, plus the header timer and the state the
    listener's bounds need.

    Its two timers cost nothing per request: a request moves a deadline (a float), and a
    timer, scheduled at most once per deadline's length, looks at it when it fires: gone
    (no longer watched), later (scheduled again for it), or passed (acts). Arming and
    cancelling an asyncio timer for every request of a keep-alive connection cost more
    than the rest of the bounds together."""

    def __init__(self, listener: Listener, handler: RequestHandler):
        self.listener = listener
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.busy = False
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Future[Any] | None = None  # the request in progress
        # When the request headers must be complete by; None: not waiting for any.
        self._header_deadline: float | None = None
        self._header_timer: asyncio.TimerHandle | None = None  # scheduled, maybe earlier
        # When to look at the client's progress next; None: no request in progress.
        self._send_deadline: float | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        # When an idle keep-alive connection is closed; None: not idle.
        self._idle_deadline: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._acked: int | None = None  # what the client had acknowledged at the last look
        self._draining = False
        # The fast path's reader of this connection's requests; None: aiohttp reads them
        # all (no fast path, or one of the connection's chunks was not one whole request).
        self._reader = RequestReader() if listener.fast is not None else None
        self._peer: str | None = None
        self._plain = False  # TCP without TLS: a blob's body may go by sendfile
        self._pending = 0  # whole requests handed to aiohttp and not yet answered
        self._sending = False  # the fast path sends a response from a task
        self._flushed: asyncio.Future[None] | None = None  # set once its write is taken

    # -- asyncio.Protocol, forwarded to aiohttp ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.listener._admit(self):
            transport.abort()
            return
        self.admitted = True
        if self._reader is not None:
            peer = transport.get_extra_info("peername")
            self._peer = str(peer[0]) if isinstance(peer, (list, tuple)) else None
            self._plain = transport.get_extra_info("sslcontext") is None
        self.handler.connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        self._idle_deadline = None
        if self._reader is not None and self._answered(data):
            return
        if not self.busy and self._header_deadline is None:
            self._arm_header_timer()  # the first byte of the next request
        self.handler.data_received(data)

    def _answered(self, data: bytes) -> bool:
        """Whether the fast path answered ``data`` (one whole request); else it is
        aiohttp's, and counted when it is one whole request (aiohttp answers it, and the
        connection is the fast path's again), or the reader is dropped."""
        assert self._reader is not None and self.listener.fast is not None
        head = self._reader.read(data)
        if head is None:
            self._reader = None
            return False
        if not self.busy and not self._pending and not self._draining:
            response = self.listener.fast(head, self._peer, self._plain)
            if response is not None:
                assert self.transport is not None
                self._header_deadline = None
                if isinstance(response, bytes):
                    self._write(response)
                else:
                    self._send(response)
                return True
        self._pending += 1
        return False

    def _write(self, response: bytes) -> None:
        """A whole response; one the transport holds above its high-water mark (a large
        manifest, a client slow to read) is a request in progress until it falls below
        again, as aiohttp's handler waits in ``drain()``: ``send_timeout`` cuts a client
        that takes none of it (an idle connection's close would wait on it forever)."""
        assert self.transport is not None
        self.transport.write(response)
        if not self.handler.writing_paused:
            self._answered_here()
            return
        self._flushed = self._loop.create_future()
        self._in_progress(self._flushed)

    def _send(self, body: BlobBody) -> None:
        """A stored blob's response; the rest of a body the socket did not take at once
        is a request in progress."""
        assert self.transport is not None
        task = body.send(self.transport)
        if task is None:
            self._answered_here()
            return
        self._in_progress(task)

    def _in_progress(self, task: asyncio.Future[None]) -> None:
        """The fast path's response goes on until ``task`` is done: nothing more is read
        from the client until it is sent (so that no response can come between)."""
        assert self.transport is not None
        self.transport.pause_reading()
        self._sending = True
        self.request_started(task)
        task.add_done_callback(self._sent)

    def _answered_here(self) -> None:
        """A response of the fast path's is written: idle again, the most recently used."""
        self.listener._set_busy(self, False)
        self._arm_idle_timer()

    def _sent(self, task: asyncio.Future[Any]) -> None:
        self._sending = False
        if self.transport is not None:
            self.transport.resume_reading()

    def eof_received(self) -> None:
        if self.admitted:
            self.handler.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self._flush_over()
        self.listener._forget(self)
        if self.admitted:
            self.handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.admitted:
            self.handler.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.handler.resume_writing()
        self._flush_over()

    def _flush_over(self) -> None:
        """The fast path's response written (below the high-water mark), or lost."""
        if self._flushed is not None:
            if not self._flushed.done():
                self._flushed.set_result(None)
            self._flushed = None

    # -- requests ------------------------------------------------------------------------

    def request_started(self, task: asyncio.Future[Any]) -> None:
        self._header_deadline = None
        self.busy = True
        self._task = task
        self.listener._set_busy(self, True)
        task.add_done_callback(self._request_done)
        self._watch_send()

    def _request_done(self, task: asyncio.Future[Any]) -> None:
        if self._pending:
            self._pending -= 1
        if self._task is task:
            self._send_deadline = None
            self._acked = None
            self._task = None
            self.busy = False
            self.listener._set_busy(self, False)
            if self._draining:
                self.close()
            else:
                self._arm_idle_timer()

    def _arm_header_timer(self) -> None:
        self._header_deadline = deadline = self._loop.time() + self.listener.limits.header_timeout
        if self._header_timer is None:
            self._header_timer = self._loop.call_at(deadline, self._header_tick)

    def _header_tick(self) -> None:
        self._header_timer = None
        deadline = self._header_deadline
        if deadline is None:
            return  # headers complete since: the next request arms it anew
        if self._loop.time() < deadline:  # moved by a later request
            self._header_timer = self._loop.call_at(deadline, self._header_tick)
            return
        self._header_deadline = None
        self._header_timeout()

    def _arm_idle_timer(self) -> None:
        """A response is over: the next request may take ``keepalive_timeout`` to come."""
        self._idle_deadline = deadline = self._loop.time() + self.listener.limits.keepalive_timeout
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_at(deadline, self._idle_tick)

    def _idle_tick(self) -> None:
        self._idle_timer = None
        deadline = self._idle_deadline
        if deadline is None:
            return  # a byte came since: the header timer watches it
        if self._loop.time() < deadline:  # moved by a later response
            self._idle_timer = self._loop.call_at(deadline, self._idle_tick)
            return
        self._idle_deadline = None
        if not self.busy:
            log.debug(
                "closing a keep-alive connection idle for %g s",
                self.listener.limits.keepalive_timeout,
            )
            self.close()

    def _watch_send(self) -> None:
        """Look every ``send_timeout`` seconds while a request is in progress (nothing is
        asked of the kernel before the first look: most requests are done by then)."""
        self._acked = None
        self._send_deadline = deadline = self._loop.time() + self.listener.limits.send_timeout
        if self._send_timer is None:
            self._send_timer = self._loop.call_at(deadline, self._check_send)

    def _cancel_timers(self) -> None:
        self._header_deadline = self._send_deadline = self._idle_deadline = None
        for timer in (self._header_timer, self._send_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._send_timer = self._idle_timer = None
        self._acked = None

    def _check_send(self) -> None:
        """Cut the request if bytes wait for a client that acknowledged none since the last
        look (a response waiting on an upstream or S3 has nothing waiting: not cut)."""
        self._send_timer = None
        deadline = self._send_deadline
        if deadline is None or not self.busy or self.transport is None:
            return
        if self._loop.time() < deadline:  # a later request started since
            self._send_timer = self._loop.call_at(deadline, self._check_send)
            return
        progress = send_progress(self.transport)
        if progress is None:
            self._send_deadline = None
            return  # the kernel cannot tell: not watched
        acked, waiting = progress
        if waiting and acked == self._acked:
            log.info(
                "cut a response its client took none of for %g s (server.send_timeout)",
                self.listener.limits.send_timeout,
            )
            self.cut()
            self.transport.abort()  # the bytes waiting for it are dropped, not flushed
            return
        self._acked = acked
        self._send_deadline = deadline = self._loop.time() + self.listener.limits.send_timeout
        self._send_timer = self._loop.call_at(deadline, self._check_send)

    def _header_timeout(self) -> None:
        if not self.busy:
            log.debug("closing a connection that sent no complete request headers in time")
            self.close()

    # -- ending --------------------------------------------------------------------------

    def finish_after_request(self) -> None:
        """Drain: an idle connection closes now, a busy one after its response."""
        self._draining = True
        if not self.busy:
            self.close()
        elif not self._sending:  # aiohttp's request: no keep-alive after its response
            self.handler.close()
        # else the fast path's body: closed once sent (_request_done)

    def cut(self) -> None:
        """Drain timed out: end the request in flight and the connection."""
        if self._task is not None:
            self._task.cancel()
        self.close()

    def close(self) -> None:
        self._cancel_timers()
        if self.admitted:
            self.handler.force_close()
        elif self.transport is not None:
            self.transport.abort()


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio reports an accept() that fails for want of descriptors (EMFILE, ENFILE)
    through the loop's exception handler, with a traceback, every second it retries;
    this makes it one WARNING line at most every ``LIMIT_LOG_PERIOD`` seconds."""
    limit = RateLimit(burst=1, period=LIMIT_LOG_PERIOD)
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        message = str(context.get("message", ""))
        if "out of system resource" in message:
            if limit.allow():
                soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                log.warning(
                    "cannot accept connections: %s (fd limit %d); retrying every second",
                    context.get("exception"),
                    soft,
                )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)

"""The fast path the listener asks first (:mod:`regmirror.lean`): manifests and stored
blobs, counted and logged as aiohttp's path counts and logs them."""

from __future__ import annotations

import functools
import time

from aiohttp import web

from regmirror.api.keys import ACCEL_REDIRECT, METRICS, REGISTRY, TRUSTED_PROXIES
from regmirror.auth.clients import Network
from regmirror.auth.middleware import ACCESS_POLICY
from regmirror.lean.blobs import BlobBody, Blobs
from regmirror.lean.gate import ROUTES, Admitted, Gate, log_access
from regmirror.lean.manifests import Manifests
from regmirror.lean.wire import Clock, Head
from regmirror.logs.access import ENABLED
from regmirror.metrics import Metrics

# What the listener does with an answer: write it, or send the blob (None: aiohttp's).
Answer = bytes | BlobBody | None


class FastPath:
    @classmethod
    def of(cls, app: web.Application) -> FastPath:
        """The fast path of ``app`` (:func:`regmirror.app.create_app`'s)."""
        trusted: tuple[Network, ...] = app[TRUSTED_PROXIES]
        metrics = app[METRICS]
        registry = app[REGISTRY]
        clock = Clock()
        return cls(
            Gate(app.get(ACCESS_POLICY), trusted),
            Manifests(registry, clock),
            # accel_redirect: nginx sends stored blobs; the redirect is aiohttp's.
            None
            if ACCEL_REDIRECT in app
            else Blobs(registry, clock, functools.partial(metrics.served, "local")),
            metrics,
            access_log=app[ENABLED],
        )

    def __init__(
        self,
        gate: Gate,
        manifests: Manifests,
        blobs: Blobs | None,
        metrics: Metrics,
        *,
        access_log: bool,
    ):
        self.gate = gate
        self.manifests = manifests
        self.blobs = blobs
        self.metrics = metrics
        self.access_log = access_log

    def __call__(self, head: Head, peer: str | None, plain: bool) -> Answer:
        """The response to ``head`` from ``peer`` (``plain``: over TCP, not TLS), or None
        for aiohttp to answer it."""
        started = time.perf_counter()
        asked = self.gate.admit(head, peer)
        if asked is None:
            return None
        answer: tuple[bytes | BlobBody, int, int] | None
        try:
            if asked.kind == "manifests":
                answer = self.manifests.answer(asked, head)
            elif self.blobs is not None:
                ended = functools.partial(self._ended, asked, head, peer, started)
                answer = self.blobs.answer(asked, head, plain, ended)
            else:
                return None
        except OSError:
            # Storage failing otherwise than "not there" (EMFILE, EIO, EISDIR...): aiohttp's
            # path meets it too and answers its error; raised here, it would end the
            # connection from data_received.
            return None
        if answer is None:
            return None
        if asked.kind == "blobs":
            self.metrics.cache_request(hit=True)
        response, status, nbytes = answer
        self.metrics.observe_request(
            ROUTES[asked.kind], asked.verb, status, time.perf_counter() - started
        )
        self.metrics.fast_path.inc()
        if self.access_log and not isinstance(response, BlobBody):
            client = self.gate.client(peer, asked.forwarded)
            log_access(client, asked, head, status, nbytes, time.perf_counter() - started)
        return response

    def _ended(
        self,
        asked: Admitted,
        head: Head,
        peer: str | None,
        started: float,
        sent: int,
        why: str | None,
    ) -> None:
        """A blob's body is over: its access line (the bytes it sent, how it ended)."""
        if self.access_log:
            client = self.gate.client(peer, asked.forwarded)
            log_access(client, asked, head, 200, sent, time.perf_counter() - started, why)

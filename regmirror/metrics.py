"""Prometheus metrics, in the app's own registry, with bounded labels only.

Labels are route templates, methods, status codes, tiers and results: never a
repository name or a digest, whose number has no bound.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    multiprocess,
)
from prometheus_client.exposition import generate_latest

from regmirror.digest import Digest
from regmirror.fill import RESULTS, STREAM_THROUGH_REASONS

UPLOAD_REFUSALS = (
    "too_large",
    "idle_timeout",
    "too_slow",
    "busy",
    "max_sessions",
    "max_sessions_per_client",
)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # Labelled children of the per-request metrics, by label values (all bounded).
        self._per_request: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._served: dict[str, Counter] = {}
        self.requests = Counter(
            "regmirror_http_requests_total",
            "HTTP requests answered, by route template, method and status (the HTTP status, "
            "client_disconnect, or aborted: a body cut after it started).",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "regmirror_http_request_duration_seconds",
            "Time to the response headers (bodies stream after), by route template and method.",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.fast_path = Counter(
            "regmirror_http_fast_path_requests_total",
            "Of regmirror_http_requests_total, those answered from memory without aiohttp "
            "(server.fast_path: manifests held here).",
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "regmirror_auth_failures_total",
            "Refused logins and permissions, by scheme (basic, bearer) and reason "
            "(bad_password, unknown_user, expired, denied, ...).",
            ["scheme", "reason"],
            registry=self.registry,
        )
        self.bytes_served = Counter(
            "regmirror_bytes_served_total",
            "Blob bytes sent to clients, by where they came from (local disk or a fill).",
            ["tier"],
            registry=self.registry,
        )
        self.cache_requests = Counter(
            "regmirror_cache_requests_total",
            "Blob requests by whether local disk had the blob (hit) or a fill served it (miss).",
            ["result"],
            registry=self.registry,
        )
        self.fills_started = Counter(
            "regmirror_fills_started_total",
            "Fills started: copies of a blob from S3 or an upstream onto local disk.",
            registry=self.registry,
        )
        self.fill_waiters = Counter(
            "regmirror_fill_waiters_total",
            "Requests that joined a fill already in flight instead of starting their own.",
            registry=self.registry,
        )
        self.fills = Counter(
            "regmirror_fills_total",
            "Fills finished, by result (ok, source_error, digest_mismatch, timeout, ...).",
            ["result"],
            registry=self.registry,
        )
        self.stream_through = Counter(
            "regmirror_fill_stream_through_total",
            "Fills served to their waiters without being kept on local disk, by reason "
            "(over_budget: bigger than cache.max_bytes; disk_full: no space and nothing "
            "left to evict; late: a reader that needed bytes a stream-through had passed).",
            ["reason"],
            registry=self.registry,
        )
        self.fill_bytes = Counter(
            "regmirror_fill_bytes_total",
            "Bytes copied onto local disk by fills.",
            registry=self.registry,
        )
        self.clock_skew = Gauge(
            "regmirror_s3_clock_skew_seconds",
            "The correction applied to this host's clock when signing S3 requests.",
            registry=self.registry,
            multiprocess_mode="livemostrecent",
        )
        self.clock_skew_corrections = Counter(
            "regmirror_s3_clock_skew_corrections_total",
            "Times S3 rejected a request as RequestTimeTooSkewed and the clock was corrected.",
            registry=self.registry,
        )
        self.s3_errors = Counter(
            "regmirror_s3_errors_total",
            "S3 operations that failed (unreachable, timed out, 5xx, denied), by operation.",
            ["operation"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "regmirror_upstream_errors_total",
            "Requests to an upstream registry that failed, by upstream host and kind "
            "(unavailable, denied, rate_limited).",
            ["upstream", "kind"],
            registry=self.registry,
        )
        self.cache_size = Gauge(
            "regmirror_cache_bytes",
            "Bytes of blobs on local disk (evictable or not).",
            registry=self.registry,
            multiprocess_mode="livemax",  # reported by the eviction owner (regmirror.workers)
        )
        self.staged_size = Gauge(
            "regmirror_cache_staged_bytes",
            "Bytes of fills in flight and upload sessions, counted toward cache.max_bytes.",
            registry=self.registry,
            multiprocess_mode="livemax",  # reported by the eviction owner (regmirror.workers)
        )
        self.cache_max = Gauge(
            "regmirror_cache_max_bytes",
            "The local cache's byte budget, cache.max_bytes; 0 when there is none.",
            registry=self.registry,
            multiprocess_mode="livemax",  # reported by the eviction owner (regmirror.workers)
        )
        # Set by each worker every half second (regmirror.worker_state); summed over
        # the live workers: the host's, whichever worker /metrics reaches.
        self.fills_in_flight = Gauge(
            "regmirror_fills_in_flight",
            "Fills copying a blob onto local disk now (one per blob, whatever the waiters).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.requests_in_flight = Gauge(
            "regmirror_http_requests_in_flight",
            "Requests on the registry port being handled now.",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.connections_open = Gauge(
            "regmirror_http_connections",
            "Client connections open on the registry port (bounded by server.max_connections).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.evictions = Counter(
            "regmirror_evictions_total",
            "Blobs evicted from local disk to stay within the budget and free-space floor.",
            registry=self.registry,
        )
        self.evicted_bytes = Counter(
            "regmirror_evicted_bytes_total",
            "Bytes of blobs evicted from local disk.",
            registry=self.registry,
        )
        self.fleet_leases = Counter(
            "regmirror_fleet_leases_total",
            "Fleet fill leases by result: won, lost (another host fills), taken_over (from a"
            " dead, stalled or unreachable owner), renew_lost (taken from us), released.",
            ["result"],
            registry=self.registry,
        )
        self.fleet_bytes = Counter(
            "regmirror_fleet_fill_bytes_total",
            "Bytes fills received in fleet mode, by source: upstream, peer or s3.",
            ["source"],
            registry=self.registry,
        )
        self.fleet_peer_errors = Counter(
            "regmirror_fleet_peer_errors_total",
            "Peer streams that failed, by kind: unreachable, status, stalled, broken.",
            ["kind"],
            registry=self.registry,
        )
        self.fleet_tags = Counter(
            "regmirror_fleet_tag_revalidations_total",
            "Tag revalidations in fleet mode: performed (this host asked the upstream) or"
            " shared (another host's answer, read from S3).",
            ["result"],
            registry=self.registry,
        )
        for result in ("won", "lost", "taken_over", "renew_lost", "released"):
            self.fleet_leases.labels(result)
        for source in ("upstream", "peer", "s3"):
            self.fleet_bytes.labels(source)
        for result in ("performed", "shared"):
            self.fleet_tags.labels(result)
        self.upload_refusals = Counter(
            "regmirror_upload_refusals_total",
            "Upload requests refused by the upload limits, by reason (too_large: past "
            "uploads.max_blob_bytes; idle_timeout: a body that stalled; too_slow: one under "
            "uploads.min_rate; busy: a session "
            "another request is writing; max_sessions, max_sessions_per_client).",
            ["reason"],
            registry=self.registry,
        )
        for reason in UPLOAD_REFUSALS:
            self.upload_refusals.labels(reason)
        for result in RESULTS:
            self.fills.labels(result)
        for reason in STREAM_THROUGH_REASONS:
            self.stream_through.labels(reason)
        for result in ("hit", "miss"):
            self.cache_requests.labels(result)

    def served(self, tier: str, nbytes: int) -> None:
        served = self._served.get(tier)
        if served is None:
            served = self._served[tier] = self.bytes_served.labels(tier)
        served.inc(nbytes)

    def cache_request(self, hit: bool) -> None:
        self.cache_requests.labels("hit" if hit else "miss").inc()

    # FillObserver
    def fill_started(self, digest: Digest) -> None:
        self.fills_started.inc()

    def fill_coalesced(self, digest: Digest) -> None:
        self.fill_waiters.inc()

    def fill_finished(self, digest: Digest, result: str, nbytes: int, seconds: float) -> None:
        self.fills.labels(result).inc()
        self.fill_bytes.inc(nbytes)

    def fill_streamed_through(self, digest: Digest, reason: str) -> None:
        self.stream_through.labels(reason).inc()

    # FleetObserver
    def fleet_lease(self, result: str) -> None:
        self.fleet_leases.labels(result).inc()

    def fleet_bytes_received(self, source: str, nbytes: int) -> None:
        self.fleet_bytes.labels(source).inc(nbytes)

    def fleet_peer_error(self, kind: str) -> None:
        self.fleet_peer_errors.labels(kind).inc()

    def fleet_tag(self, result: str) -> None:
        self.fleet_tags.labels(result).inc()

    def upload_refused(self, reason: str) -> None:
        self.upload_refusals.labels(reason).inc()

    def s3_error(self, operation: str) -> None:
        self.s3_errors.labels(operation).inc()

    def upstream_error(self, upstream: str, kind: str) -> None:
        self.upstream_errors.labels(upstream, kind).inc()

    def auth_failure(self, scheme: str, reason: str) -> None:
        self.auth_failures.labels(scheme, reason).inc()

    # CacheObserver
    def cache_bytes(self, total: int) -> None:
        self.cache_size.set(total)

    def staged_bytes(self, total: int) -> None:
        self.staged_size.set(total)

    def blob_evicted(self, nbytes: int) -> None:
        self.evictions.inc()
        self.evicted_bytes.inc(nbytes)

    def s3_clock_skew(self, seconds: float) -> None:
        self.clock_skew.set(seconds)
        self.clock_skew_corrections.inc()

    def observe_request(self, route: str, method: str, status: int | str, seconds: float) -> None:
        """``status``: the HTTP status, or ``client_disconnect`` (the client went away
        before its response was sent: not a server error), or ``aborted`` (the server cut
        a body it had started, e.g. a fill that failed)."""
        key = (route, method, str(status))
        children = self._per_request.get(key)
        if children is None:  # labels() hashes and locks: once per label set, not per request
            children = self.requests.labels(*key), self.latency.labels(route, method)
            self._per_request[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        """This process's metrics; with several workers (prometheus-client's multiprocess
        directory set), every worker's, each counted once."""
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=directory)
        return generate_latest(merged), CONTENT_TYPE_LATEST

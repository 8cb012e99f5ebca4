"""``regmirror status``: what an SRE asks a running regmirror first, in one report.

Three reads, all cheap and read-only: ``/-/status`` (version, uptime, the cache index,
fills in flight; with ``server.workers``, every worker's, and a line per worker),
``/metrics`` (hits and misses, fills, evictions, errors; parsed with
prometheus_client's own parser) and ``/readyz`` (whether local disk and S3 answer).
:func:`read_status` returns the report as a plain dict (what ``--json`` prints);
:func:`render` lays it out for a person.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table
from rich.text import Text

from regmirror.ops.units import size_text

STATUS_PATH = "/-/status"
TIMEOUT = 10.0  # seconds for each read

Samples = dict[str, list[tuple[dict[str, str], float]]]


class Unreachable(Exception):
    """The server did not answer (refused, timed out, or not a regmirror)."""


async def read_status(
    session: aiohttp.ClientSession, url: str, metrics_url: str | None = None
) -> dict[str, Any]:
    """The report of the regmirror at ``url`` (``/metrics`` from ``metrics_url`` if it
    listens elsewhere)."""
    url = url.rstrip("/")
    metrics_base = (metrics_url or url).rstrip("/")
    try:
        (status_code, info), (_, metrics_text), (ready_code, ready) = await asyncio.gather(
            _get(session, f"{metrics_base}{STATUS_PATH}", json=True),
            _get(session, f"{metrics_base}/metrics", json=False),
            _get(session, f"{url}/readyz", json=True),
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise Unreachable(f"{url}: {exc or type(exc).__name__}") from exc
    if not isinstance(metrics_text, str) or "regmirror_" not in metrics_text:
        raise Unreachable(f"{metrics_base}/metrics has no regmirror metrics")
    if status_code != 200 or not isinstance(info, dict):
        info = {}  # an older server without /-/status: what the metrics say
    samples = parse_metrics(metrics_text)
    return build_report(url, info, samples, ready_code == 200, ready)


async def _get(session: aiohttp.ClientSession, url: str, *, json: bool) -> tuple[int, Any]:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as response:
        if not json:
            return response.status, await response.text()
        try:
            return response.status, await response.json(content_type=None)
        except ValueError:
            return response.status, None


def parse_metrics(text: str) -> Samples:
    """Every sample by its name (``regmirror_fills_total``), with its labels."""
    samples: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name].append((dict(sample.labels), float(sample.value)))
    return samples


def _sum(samples: Samples, name: str, **match: str) -> float:
    return sum(
        value
        for labels, value in samples.get(name, [])
        if all(labels.get(k) == v for k, v in match.items())
    )


def _by(samples: Samples, name: str, label: str) -> dict[str, float]:
    found: dict[str, float] = defaultdict(float)
    for labels, value in samples.get(name, []):
        found[labels.get(label, "")] += value
    return dict(found)


def build_report(
    url: str, info: dict[str, Any], samples: Samples, ready: bool, readyz: Any
) -> dict[str, Any]:
    hits = _sum(samples, "regmirror_cache_requests_total", result="hit")
    misses = _sum(samples, "regmirror_cache_requests_total", result="miss")
    fill_results = _by(samples, "regmirror_fills_total", "result")
    upstream_errors: dict[str, dict[str, int]] = defaultdict(dict)
    for labels, value in samples.get("regmirror_upstream_errors_total", []):
        upstream_errors[labels.get("upstream", "")][labels.get("kind", "")] = int(value)
    server_errors = sum(
        value
        for labels, value in samples.get("regmirror_http_requests_total", [])
        if labels.get("status", "").startswith("5")
    )
    cache = dict(info.get("cache") or {})
    cache.setdefault("bytes", int(_sum(samples, "regmirror_cache_bytes")))
    budget = _sum(samples, "regmirror_cache_max_bytes")
    cache.setdefault("max_bytes", int(budget) if budget else None)
    tiers = readyz.get("tiers", {}) if isinstance(readyz, dict) else {}
    upstreams = [
        {**upstream, "errors": upstream_errors.pop(upstream.get("registry", ""), {})}
        for upstream in info.get("upstreams", [])
    ]
    # Errors of upstreams /-/status did not list (an older server): by host alone.
    upstreams += [{"registry": host, "errors": kinds} for host, kinds in upstream_errors.items()]
    s3_errors = {
        k: int(v) for k, v in _by(samples, "regmirror_s3_errors_total", "operation").items()
    }
    return {
        "url": url,
        "ready": ready,
        "tiers": tiers,
        "version": info.get("version"),
        "pid": info.get("pid"),
        "uptime_seconds": info.get("uptime_seconds"),
        "data_dir": info.get("data_dir"),
        "workers": info.get("workers", []),  # with server.workers: one per worker
        "cache": cache,
        "requests": {
            "hits": int(hits),
            "misses": int(misses),
            "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
            "bytes_served": {
                k: int(v) for k, v in _by(samples, "regmirror_bytes_served_total", "tier").items()
            },
            "server_errors": int(server_errors),
        },
        "fills": {
            "in_flight": info.get("fills", []),
            "started": int(_sum(samples, "regmirror_fills_started_total")),
            "coalesced": int(_sum(samples, "regmirror_fill_waiters_total")),
            "ok": int(fill_results.get("ok", 0)),
            "failed": int(
                sum(v for k, v in fill_results.items() if k not in ("ok", "other_process"))
            ),
            "bytes": int(_sum(samples, "regmirror_fill_bytes_total")),
        },
        "evictions": {
            "blobs": int(_sum(samples, "regmirror_evictions_total")),
            "bytes": int(_sum(samples, "regmirror_evicted_bytes_total")),
        },
        "upstreams": upstreams,
        "s3": {
            "configured": bool(info.get("s3")) or "s3" in tiers,
            "state": tiers.get("s3"),
            "errors": s3_errors,
            "clock_skew_seconds": _sum(samples, "regmirror_s3_clock_skew_seconds"),
        },
    }


# -- for a person -------------------------------------------------------------------------


def render(console: Console, report: dict[str, Any]) -> None:
    """The report as a short aligned list, most important first."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    row = grid.add_row
    uptime = _duration(report["uptime_seconds"])
    pid = f", pid {report['pid']}" if report["pid"] else ""
    row(
        "regmirror",
        Text.assemble(
            f"{report['version'] or '?'} at {report['url']}: ",
            ("ready", "green") if report["ready"] else ("NOT READY", "bold red"),
            f", up {uptime}{pid}",
        ),
    )
    for tier, state in report["tiers"].items():
        row("", Text.assemble(f"{tier}: ", _health(state)))
    for worker in report["workers"]:
        row("workers" if worker["index"] == 0 else "", _worker(worker))

    cache = report["cache"]
    used, budget = cache.get("bytes", 0), cache.get("max_bytes")
    line = f"{size_text(used)} used"
    line += f" of {size_text(budget)} budget ({used / budget:.0%})" if budget else " (no budget)"
    if cache.get("blobs") is not None:
        line += f", {cache['blobs']} blobs"
    row("cache", line)
    if cache.get("disk_free_bytes") is not None:
        floor = cache.get("min_free_bytes") or 0
        free = cache["disk_free_bytes"]
        row(
            "disk",
            Text.assemble(
                (f"{size_text(free)} free", "bold red" if free < floor else ""),
                f" of {size_text(cache.get('disk_total_bytes') or 0)} (floor {size_text(floor)})",
            ),
        )

    requests = report["requests"]
    ratio = requests["hit_ratio"]
    hits = f" ({requests['hits']} hits, {requests['misses']} misses)"
    row("hit ratio", ("-" if ratio is None else f"{ratio:.1%}") + hits)
    served = sorted(requests["bytes_served"].items())
    row("served", ", ".join(f"{tier} {size_text(n)}" for tier, n in served) or "-")

    fills = report["fills"]
    row(
        "fills",
        f"{len(fills['in_flight'])} in flight; {fills['started']} started, "
        f"{fills['coalesced']} joined, {fills['failed']} failed, {size_text(fills['bytes'])} filled",
    )
    for fill in fills["in_flight"]:
        size, done = fill.get("size"), fill["bytes"]
        progress = (
            f"{size_text(done)} of {size_text(size)} ({done / size:.0%})" if size else "starting"
        )
        where = f"  (worker {fill['worker']})" if fill.get("worker") is not None else ""
        row("", f"{fill['digest'][:19]}…  {progress}{where}")

    for upstream in report["upstreams"]:
        errors = upstream["errors"]
        where = upstream.get("url") or upstream["registry"]
        route = f" (prefix {upstream['prefix']})" if upstream.get("prefix") else ""
        route += f" (ns {upstream['ns']})" if upstream.get("ns") else ""
        counted = ", ".join(f"{kind} {n}" for kind, n in sorted(errors.items()))
        health = ("errors: " + counted, "yellow") if errors else ("no errors", "green")
        row("upstream", Text.assemble(f"{where}{route}: ", health))
    if not report["upstreams"]:
        row("upstream", "none (no pull-through)")

    s3 = report["s3"]
    if s3["configured"]:
        errors = ", ".join(f"{op} {n}" for op, n in sorted(s3["errors"].items()) if n) or "none"
        row(
            "s3",
            Text.assemble(
                _health(s3["state"] or "?"),
                f"; errors: {errors}; clock skew {s3['clock_skew_seconds']:+.1f}s",
            ),
        )
    else:
        row("s3", "not configured")

    evictions = report["evictions"]
    row("evictions", f"{evictions['blobs']} blobs, {size_text(evictions['bytes'])}")
    row("5xx", str(requests["server_errors"]))
    console.print(grid)


def _worker(worker: dict[str, Any]) -> Text:
    name = f"worker {worker['index']}: pid {worker['pid']}"
    if worker.get("pid") is None:
        return Text.assemble(f"worker {worker['index']}: ", ("not running", "bold red"))
    line = (
        f"{name}, up {_duration(worker.get('uptime_seconds'))}, "
        f"{worker.get('connections', 0)} connections, "
        f"{worker.get('requests_in_flight', 0)} requests, {worker.get('fills', 0)} fills"
    )
    if worker.get("problem"):
        return Text.assemble(f"{line}: ", (worker["problem"], "bold red"))
    return Text(line)


def _health(state: str) -> tuple[str, str]:
    return (state, "green") if state == "ok" else (state, "bold red")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"

#!/usr/bin/env python3
"""A thundering herd of identical blob pulls against pull-through mirrors, side by side.

One origin (registry:2 holding ``herd/big:latest`` with one random ``--size-mib`` layer)
sits behind a counting TCP proxy that counts, per mirror, the requests it forwards and
the bytes the origin sends back. For every ``--clients`` N and every mirror, a fresh
mirror with a cold cache serves one manifest GET and one config-blob GET (what docker
does before it pulls layers), then N clients GET the uncached layer at the same moment.

Mirrors: ``regmirror`` (``upstreams: [{url: <its proxy>}]``; then the same N pulls again
from its warm cache), ``registry`` (registry:2 with ``proxy.remoteurl``) and ``nginx``
(``proxy_cache`` with ``proxy_cache_lock on``). Before them, ``ceiling``: the same herd
against nginx serving the file straight from disk, which is the most this load
generator can take in on this machine; a mirror whose wall time is near it is measured
at the generator's limit, not its own.

Clients run in ``--procs`` processes, each an asyncio loop with N/procs connections.
A body counts as correct when it has exactly the blob's length and the same bytes as
the pushed blob, whose sha256 is the digest (checked once when it is made): that is the
same test as sha256(body) == digest at memcmp speed (about 50 GB/s here, against
1.3 GB/s for sha256 on one idle core). ``--verify sha256`` hashes every body instead.

    python bench/herd.py                                   # all three mirrors, N=50,200
    python bench/herd.py --mirrors registry,nginx --clients 50 --size-mib 64
    python bench/herd.py --json herd.json                  # also every figure as JSON

Only 127.0.0.1 is used. Every client has ``--timeout``; every wait has a deadline.
Temporary directories (origin, caches, logs) are deleted at the end unless ``--keep``.
See bench/README.md, section "Thundering herd".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    HOST,
    MIB,
    TreeMemory,
    http_status,
    nginx_config,
    percentile,
    process_tree,
    quiet_stop,
    status_kib,
    work_dir,
)
from pulls import (
    READY_TIMEOUT,
    REPO,
    SETTLE,
    STOP_TIMEOUT,
    CountingProxy,
    HerdOutcome,
    Image,
    Mirror,
    UpstreamCounts,
    origin_with_image,
    prime,
    run_herd,
    settled_counts,
)

from tests.support.processes import free_port, run_distribution, run_regmirror

MIRRORS = ("regmirror", "registry", "nginx")

TARGETS = {  # what the regmirror design promises under a herd (see bench/README.md)
    "cold_over_warm_wall": 1.15,
    "ttfb_p99_s": 0.2,
    "upstream_blob_gets": 1,
    "peak_rss_mib": 150,
}

# registry:2's proxy.remoteurl and nginx's proxy_pass both point at a counting proxy port.
# Every nginx of a herd answers this once it is up.
READY_LOCATION = """\
        location = /__herd/ready { return 200 "ready\\n"; }
"""
# The mirror: a shared cache, one fill per key. proxy_cache_lock_timeout and
# proxy_cache_lock_age are left at their defaults (5s each): a request that waited 5s for
# the lock goes upstream itself (and its answer is not cached); a fill older than 5s lets
# one more request go upstream.
NGINX_CACHE_HTTP = """\
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=herd:10m max_size={max_size}
                     inactive=1h use_temp_path=off;
"""
NGINX_CACHE_LOCATION = """\
        location /v2/ {{
            proxy_pass http://{host}:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering on;
            proxy_cache herd;
            proxy_cache_key $request_method$uri;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            proxy_read_timeout 300s;
        }}
"""
# The generator's ceiling: the blob straight from disk with sendfile.
NGINX_STATIC_LOCATION = """\
        location = /v2/{repo}/blobs/{digest} {{
            default_type application/octet-stream;
            alias {blob_path};
        }}
"""


# ---------------------------------------------------------------- mirrors under test


@contextlib.contextmanager
def run_nginx(work: Path, *, http_extra: str, locations: str, workers: int) -> Iterator[Mirror]:
    """nginx in the foreground (``daemon off``) with everything under ``work``."""
    port = free_port()
    fill = {"prefix": work, "host": HOST, "port": port}
    argv = nginx_config(
        work,
        port,
        http_extra=http_extra.format(**fill),
        server=READY_LOCATION + locations.format(**fill),
        workers=workers,
    )
    with open(work / "stderr.log", "ab") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while http_status(url + "/__herd/ready") != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {(work / 'error.log').read_text()}")
            time.sleep(0.05)
        yield Mirror("nginx", url, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def start_mirror(name: str, work: Path, upstream: str, *, size: int) -> Iterator[Mirror]:
    """A fresh mirror with an empty cache in ``work``, pulling through ``upstream``."""
    if name == "regmirror":
        env = {"REGMIRROR_UPSTREAMS__0__URL": upstream}
        stop_log = work.parent / f"{work.name}.stop.log"
        with quiet_stop(run_regmirror(work, env=env), stop_log) as server:
            yield Mirror(name, server.url, server.process.pid)
    elif name == "registry":
        stop_log = work.parent / f"{work.name}.stop.log"
        registry = run_distribution(work, proxy_url=upstream, extra={"log": {"level": "warn"}})
        with quiet_stop(registry, stop_log) as server:
            yield Mirror(name, server.url, server.process.pid)
    elif name == "nginx":
        port = upstream.rpartition(":")[2]
        http_extra = NGINX_CACHE_HTTP.replace("{max_size}", str(4 * size))
        locations = NGINX_CACHE_LOCATION.replace("{upstream_port}", port)
        with run_nginx(
            work, http_extra=http_extra, locations=locations, workers=os.cpu_count() or 2
        ) as mirror:
            yield mirror
    else:
        raise ValueError(f"unknown mirror {name!r}; choose from {', '.join(MIRRORS)}")


# ---------------------------------------------------------------- figures


@dataclass
class Row:
    clients: int
    mirror: str  # ceiling, regmirror, registry, nginx
    phase: str  # cold, warm or static
    correct: int = 0
    failed: int = 0  # errors, non-200, short bodies
    wrong: int = 0  # full-length bodies with other bytes
    wall_s: float | None = None
    ttfb_p50_s: float | None = None
    ttfb_p99_s: float | None = None
    total_p50_s: float | None = None
    total_p99_s: float | None = None
    client_mb_s: float | None = None  # bytes all clients received per second of wall time
    upstream_blob_gets: int | None = None  # GETs of the big layer's digest
    upstream_mib: float | None = None  # bytes the origin sent to the mirror
    upstream_requests: dict[str, int] = field(default_factory=dict)
    proxy_cpu_s: float | None = None
    rss_before_mib: float | None = None  # summed over the tree just before the herd
    peak_rss_mib: float | None = None  # sampled, summed over the process tree
    hwm_mib: float | None = None  # summed VmHWM (since process start)
    mirror_cpu_s: float | None = None  # the mirror's process tree, during the herd
    generator_cpu_s: float | None = None
    generator_cores: float | None = None  # generator CPU seconds per second of wall time
    load_1min: float | None = None
    errors: list[str] = field(default_factory=list)  # a few distinct ones
    skipped: str = ""


def summarize(row: Row, outcome: HerdOutcome) -> Row:
    results = outcome.results
    row.correct = sum(r.correct for r in results)
    row.wrong = sum(r.wrong for r in results)
    row.failed = len(results) - row.correct - row.wrong
    row.wall_s = outcome.wall
    ttfbs = [r.ttfb for r in results if r.ttfb is not None]
    totals = [r.total for r in results if r.correct and r.total is not None]
    row.ttfb_p50_s, row.ttfb_p99_s = percentile(ttfbs, 50), percentile(ttfbs, 99)
    row.total_p50_s, row.total_p99_s = percentile(totals, 50), percentile(totals, 99)
    received = sum(r.nbytes for r in results)
    row.client_mb_s = received / outcome.wall / 1e6 if outcome.wall > 0 else None
    row.generator_cpu_s = outcome.generator_cpu
    row.generator_cores = outcome.generator_cpu / outcome.wall if outcome.wall > 0 else None
    row.load_1min = outcome.load_after
    row.errors = sorted({r.error for r in results if r.error})[:3]
    return row


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


COLUMNS = [
    ("N", "clients", "d"),
    ("mirror", "label", ""),
    ("up GETs", "upstream_blob_gets", "d"),
    ("up MiB", "upstream_mib", ".0f"),
    ("wall s", "wall_s", ".2f"),
    ("TTFB p50", "ttfb_p50_s", ".3f"),
    ("TTFB p99", "ttfb_p99_s", ".3f"),
    ("total p99", "total_p99_s", ".2f"),
    ("MB/s", "client_mb_s", ".0f"),
    ("bad", "bad", ""),
    ("RSS0 MiB", "rss_before_mib", ".0f"),
    ("RSS MiB", "peak_rss_mib", ".0f"),
    ("HWM MiB", "hwm_mib", ".0f"),
    ("srv CPU s", "mirror_cpu_s", ".1f"),
    ("gen cores", "generator_cores", ".2f"),
    ("proxy CPU s", "proxy_cpu_s", ".1f"),
    ("load", "load_1min", ".1f"),
]


def table(rows: list[Row]) -> str:
    lines = []
    cells = []
    for row in rows:
        values = dataclasses.asdict(row)
        values["label"] = f"{row.mirror} {row.phase}".strip()
        values["bad"] = f"{row.failed}/{row.wrong}"
        if row.skipped:
            cells.append([str(row.clients), values["label"], f"skipped: {row.skipped}"])
            continue
        cells.append([_fmt(values[key], spec) for _, key, spec in COLUMNS])
    widths = [len(title) for title, _, _ in COLUMNS]
    for cell in cells:
        if len(cell) == len(COLUMNS):
            widths = [max(w, len(c)) for w, c in zip(widths, cell)]
    lines.append("  ".join(t.rjust(w) for (t, _, _), w in zip(COLUMNS, widths)))
    for cell in cells:
        if len(cell) == len(COLUMNS):
            lines.append("  ".join(c.rjust(w) for c, w in zip(cell, widths)))
        else:
            lines.append("  ".join(cell[:2]).rjust(widths[0] + widths[1] + 2) + "  " + cell[2])
    return "\n".join(lines)


def _find(rows: list[Row], n: int, mirror: str, phase: str) -> Row | None:
    for row in rows:
        if row.clients == n and row.mirror == mirror and row.phase == phase and not row.skipped:
            return row
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


_CHECKS = {  # key -> (how the target reads, whether a value meets it)
    "cold_over_warm_wall": ("<= 1.15", lambda v: v <= TARGETS["cold_over_warm_wall"]),
    "ttfb_p99_s": ("<= 0.2", lambda v: v <= TARGETS["ttfb_p99_s"]),
    "upstream_blob_gets": ("= 1", lambda v: v == TARGETS["upstream_blob_gets"]),
    "peak_rss_mib": ("<= 150", lambda v: v <= TARGETS["peak_rss_mib"]),
}


def _targets(rows: list[Row], n: int, name: str) -> dict[str, Any]:
    cold, warm = _find(rows, n, name, "cold"), _find(rows, n, name, "warm")
    nginx = _find(rows, n, "nginx", "cold")
    if cold is None:
        return {}
    rss = [v for v in (cold.peak_rss_mib, cold.hwm_mib, warm and warm.peak_rss_mib) if v]
    return {
        "cold_over_warm_wall": _ratio(cold.wall_s, warm.wall_s if warm else None),
        "cold_over_nginx_cold_wall": _ratio(cold.wall_s, nginx.wall_s if nginx else None),
        "ttfb_p99_s": cold.ttfb_p99_s,
        "upstream_blob_gets": cold.upstream_blob_gets,
        "peak_rss_mib": max(rss) if rss else None,
    }


def _against_ceiling(rows: list[Row], n: int, ceiling: Row) -> tuple[list[str], dict[str, float]]:
    assert ceiling.wall_s
    lines = [
        (
            f"N={n} generator ceiling: {_fmt(ceiling.client_mb_s, '.0f')} MB/s into the "
            f"clients, {ceiling.wall_s:.2f} s wall, {_fmt(ceiling.generator_cores)} cores "
            "busy in the clients (nginx static, sendfile)"
        )
    ]
    data = {}
    for row in rows:
        if row.clients != n or row.mirror == "ceiling" or row.skipped or not row.wall_s:
            continue
        slack = row.wall_s / ceiling.wall_s
        note = (
            "within 15% of the ceiling: the generator may have set this pace (the mirror "
            "is at least this fast)"
            if slack < 1.15
            else "the mirror set this pace"
        )
        lines.append(
            f"  {row.mirror} {row.phase}: wall {slack:.2f}x the ceiling, clients "
            f"{_fmt(row.generator_cores)} cores busy; {note}"
        )
        data[f"{row.mirror}_{row.phase}_over_ceiling"] = slack
    return lines, data


def verdicts(rows: list[Row], clients: list[int]) -> tuple[list[str], dict[str, Any]]:
    """The ratios the targets care about, and whether the generator limited each figure."""
    lines: list[str] = []
    data: dict[str, Any] = {}
    for n in clients:
        entry: dict[str, Any] = {}
        if any(r.clients == n and r.mirror == "regmirror" for r in rows):
            figures = entry["regmirror"] = _targets(rows, n, "regmirror")
            lines.append(f"N={n} regmirror:" + ("" if figures else " no cold figures (skipped)"))
            for key, value in figures.items():
                goal, met = _CHECKS.get(key, ("", None))
                mark = "" if met is None or value is None else "  ok" if met(value) else "  MISSED"
                lines.append(
                    f"  {key:26s} {_fmt(value, '.3f'):>8s}"
                    + (f"  (target {goal}){mark}" if goal else "")
                )
        ceiling = _find(rows, n, "ceiling", "static")
        if ceiling is not None and ceiling.wall_s:
            more, entry["over_ceiling"] = _against_ceiling(rows, n, ceiling)
            lines += more
        data[str(n)] = entry
    return lines, data


# ---------------------------------------------------------------- the run


def measure_mirror(
    name: str, n: int, args: argparse.Namespace, image: Image, proxy: CountingProxy, work: Path
) -> list[Row]:
    rows = [Row(n, name, "cold")]
    proxy.reset(name)
    with start_mirror(name, work, proxy.url(name), size=image.size) as mirror:
        problem = prime(mirror, image)
        if problem:
            rows[0].skipped = f"pull-through not working: {problem}"
            return rows
        url = f"{mirror.url}/v2/{REPO}/blobs/{image.digest}"
        phases = ["cold", "warm"] if name == "regmirror" else ["cold"]
        for phase in phases:
            row = rows[0] if phase == "cold" else Row(n, name, phase)
            if phase == "warm":
                rows.append(row)
                time.sleep(SETTLE)
            before, cpu_before = proxy.counts(name)
            image.warm_page_cache()
            row.rss_before_mib = (
                sum(status_kib(p, "VmRSS") for p in process_tree(mirror.pid)) / 1024
            )
            with TreeMemory(mirror.pid) as memory:
                outcome = run_herd(
                    url,
                    image,
                    clients=n,
                    procs=args.procs,
                    timeout=args.timeout,
                    verify=args.verify,
                )
            after, cpu_after = settled_counts(proxy, name)
            summarize(row, outcome)
            row.peak_rss_mib = memory.peak_kib / 1024
            row.hwm_mib = memory.hwm_kib() / 1024
            row.mirror_cpu_s = memory.cpu
            row.upstream_blob_gets = after.blob_gets.get(image.digest, 0) - before.blob_gets.get(
                image.digest, 0
            )
            # cold: everything since the mirror started (its prime included); warm: the herd
            base = UpstreamCounts() if phase == "cold" else before
            row.upstream_mib = (after.bytes_down - base.bytes_down) / MIB
            row.upstream_requests = {
                k: v - base.requests.get(k, 0)
                for k, v in after.requests.items()
                if v - base.requests.get(k, 0)
            }
            row.proxy_cpu_s = cpu_after - cpu_before
    return rows


def measure_ceiling(n: int, args: argparse.Namespace, image: Image, work: Path) -> Row:
    row = Row(n, "ceiling", "static")
    location = NGINX_STATIC_LOCATION.format(
        repo=REPO, digest=image.digest, blob_path=image.blob_path
    )
    location = location.replace("{", "{{").replace("}", "}}")
    with run_nginx(work, http_extra="", locations=location, workers=os.cpu_count() or 2) as server:
        url = f"{server.url}/v2/{REPO}/blobs/{image.digest}"
        image.warm_page_cache()
        with TreeMemory(server.pid) as memory:
            outcome = run_herd(
                url, image, clients=n, procs=args.procs, timeout=args.timeout, verify=args.verify
            )
        summarize(row, outcome)
        row.peak_rss_mib = memory.peak_kib / 1024
        row.hwm_mib = memory.hwm_kib() / 1024
        row.mirror_cpu_s = memory.cpu
    return row


def regmirror_pull_through_works(image: Image, proxy: CountingProxy, work: Path) -> str:
    """'' when a cold regmirror answers an uncached blob GET with the right bytes."""
    with start_mirror("regmirror", work, proxy.url("regmirror"), size=image.size) as mirror:
        return prime(mirror, image)


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    with (
        work_dir("regmirror-herd-", args.work_dir, keep=args.keep) as root,
        origin_with_image(root, args.size_mib * MIB) as (origin, image),
        CountingProxy(list(args.mirrors), origin.port) as proxy,
    ):
        print(f"# blob {image.digest} ({args.size_mib} MiB)", file=sys.stderr)
        for n in args.clients:
            if args.ceiling_runs:
                print(
                    f"# N={n} ceiling (nginx static), best of {args.ceiling_runs}",
                    file=sys.stderr,
                )
                tries = []
                for i in range(args.ceiling_runs):
                    tries.append(measure_ceiling(n, args, image, root / f"ceiling-{n}-{i}"))
                    _progress(tries[-1])
                    time.sleep(SETTLE)
                rows.append(min(tries, key=lambda r: (r.failed + r.wrong, r.wall_s or 1e9)))
            for name in args.mirrors:
                print(f"# N={n} {name}", file=sys.stderr)
                work = root / f"{name}-{n}"
                rows += measure_mirror(name, n, args, image, proxy, work)
                for row in rows[-2:]:
                    if row.mirror == name and row.clients == n:
                        _progress(row)
                if not args.keep:
                    shutil.rmtree(work, ignore_errors=True)  # free its cache's disk now
                time.sleep(SETTLE)
    lines, ratios = verdicts(rows, args.clients)
    return rows, {"ratios": ratios, "verdict_lines": lines}


def _progress(row: Row) -> None:
    if row.skipped:
        print(f"#   {row.mirror} {row.phase}: skipped: {row.skipped}", file=sys.stderr)
        return
    print(
        f"#   {row.mirror} {row.phase}: wall {row.wall_s:.2f}s, ttfb p99 "
        f"{_fmt(row.ttfb_p99_s, '.3f')}s, ok {row.correct}/{row.clients}, upstream GETs "
        f"{_fmt(row.upstream_blob_gets)}, load {_fmt(row.load_1min, '.1f')}"
        + (f", errors {row.errors}" if row.errors else ""),
        file=sys.stderr,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="50,200", help="herd sizes N, comma-separated (50,200)")
    p.add_argument("--size-mib", type=int, default=256, help="size of the layer in MiB (256)")
    p.add_argument(
        "--mirrors",
        default=",".join(MIRRORS),
        help=f"comma-separated, from {','.join(MIRRORS)} (all)",
    )
    p.add_argument("--procs", type=int, default=3, help="client processes (3)")
    p.add_argument(
        "--timeout", type=float, default=180.0, help="per-client total timeout in seconds (180)"
    )
    p.add_argument(
        "--verify",
        choices=["compare", "sha256"],
        default="compare",
        help="body check: byte comparison with the pushed blob (default) or sha256",
    )
    p.add_argument(
        "--ceiling-runs",
        type=int,
        default=2,
        help="herds against nginx static per N; the best is the ceiling (2; 0: none)",
    )
    p.add_argument(
        "--probe",
        action="store_true",
        help="only say whether regmirror's pull-through answers an uncached blob",
    )
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE ('-': stdout)")
    p.add_argument("--work-dir", help="parent of the temporary directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and logs")
    args = p.parse_args(argv)
    args.clients = list(dict.fromkeys(int(c) for c in args.clients.split(",") if c.strip()))
    args.mirrors = [m.strip() for m in args.mirrors.split(",") if m.strip()]
    unknown = set(args.mirrors) - set(MIRRORS)
    if unknown or not args.clients or min(args.clients) < 1:
        p.error(f"bad --mirrors {sorted(unknown)} or --clients")
    return args


def probe(args: argparse.Namespace) -> int:
    with (
        work_dir("regmirror-herd-probe-", args.work_dir) as root,
        origin_with_image(root, MIB) as (origin, image),
        CountingProxy(["regmirror"], origin.port) as proxy,
    ):
        problem = regmirror_pull_through_works(image, proxy, root / "regmirror")
    print("regmirror pull-through: " + ("works" if not problem else f"NOT working: {problem}"))
    return 0 if not problem else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        return probe(args)
    started = time.time()
    rows, extra = run(args)
    load = os.getloadavg()
    header = (
        f"thundering herd: {args.size_mib} MiB layer, N in {args.clients}, "
        f"{args.procs} client processes, verify={args.verify}, "
        f"{os.cpu_count()} CPUs, load at end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(header)
    print(table(rows))
    print(
        "up GETs: origin GETs of the layer; up MiB: bytes the origin sent the mirror "
        "(manifest and config included); bad: failed/wrong bodies; RSS0: before the herd; "
        "RSS: peak of the sampled tree sum; HWM: summed VmHWM since the process started; "
        "srv CPU s: the mirror's CPU seconds in the herd; gen cores: client CPU s / wall s; load: 1-min load average after the herd"
    )
    print("\n".join(extra["verdict_lines"]))
    if args.json:
        doc = {
            "started": started,
            "args": {k: v for k, v in vars(args).items()},
            "cpus": os.cpu_count(),
            "nginx_cache_lock": {
                "proxy_cache_lock": "on",
                "proxy_cache_lock_timeout": "5s (default)",
                "proxy_cache_lock_age": "5s (default)",
            },
            "rows": [dataclasses.asdict(r) for r in rows],
            "ratios": extra["ratios"],
            "targets": TARGETS,
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

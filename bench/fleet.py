#!/usr/bin/env python3
"""A fleet-wide herd: K hosts x M concurrent pulls of one uncached blob, side by side.

One origin (registry:2 holding ``herd/big:latest`` with one random ``--size-mib`` layer)
behind the counting TCP proxy of ``pulls.py`` (one port per scenario; every host of a
scenario goes through the same port, so its counts are the fleet's). One moto S3 server.
Scenarios, each with K fresh hosts (own data directories), run one after the other:

- ``fleet``: regmirror with ``s3`` + ``write_back`` + ``fleet.advertise_url`` (fleet mode)
  on a fresh bucket;
- ``no-fleet``: the same without ``fleet.advertise_url`` (every host fills on its own);
- ``registry``: registry:2 with ``proxy.remoteurl`` on every host;
- ``fleet-warm-s3``: K new fleet hosts on the ``fleet`` bucket, which now holds the blob:
  the fleet pulling from a warm S3, the yardstick of the cold fleet's wall time.

Each host is primed as docker would (manifest by tag, then config blob; all hosts at once),
then K x M clients GET the layer at the same moment (one client process per host).
Printed: upstream blob GETs, manifest GETs and HEADs, TTFB p50/p99 over every client,
wall time, bodies correct.

    python bench/fleet.py                              # K=8, M=10, 64 MiB
    python bench/fleet.py --hosts 16 --size-mib 256
    python bench/fleet.py --hosts 3 --clients 4 --size-mib 16 --scenarios fleet,no-fleet
    python bench/fleet.py --hosts 4 --workers 2           # hosts of two workers each

Only 127.0.0.1 is used; every wait has a deadline; temp directories are deleted unless
``--keep``. See bench/README.md, section "Fleet".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import MIB, percentile, quiet_stop, work_dir
from pulls import (
    SETTLE,
    CountingProxy,
    Image,
    origin_with_image,
    prime,
    run_herd,
    settled_counts,
)
from pulls import (
    Mirror as Host,
)

from tests.support.processes import run_distribution, run_regmirror
from tests.support.s3 import run_moto
from tests.support.s3_registry import regmirror_env

SCENARIOS = ("fleet", "no-fleet", "registry", "fleet-warm-s3")
SECRET = "bench-fleet-secret"
LOG_LEVEL = os.environ.get("BENCH_LOG_LEVEL", "WARNING")  # the hosts' --log-level
TARGETS = {"upstream_blob_gets": 1, "manifest_gets": 1, "ttfb_p99_s": 0.5, "cold_over_warm": 1.3}


@dataclass
class Row:
    scenario: str
    hosts: int
    clients: int  # per host
    upstream_blob_gets: int = 0
    manifest_gets: int = 0
    manifest_heads: int = 0
    upstream_mib: float = 0.0
    ttfb_p50_s: float | None = None
    ttfb_p99_s: float | None = None
    wall_s: float | None = None
    correct: int = 0
    total: int = 0
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def start_hosts(
    scenario: str, count: int, work: Path, upstream: str, moto: Any, bucket: str, workers: int
) -> Iterator[list[Host]]:
    """``count`` fresh hosts of ``scenario``, all pulling through ``upstream``; regmirror
    hosts run ``workers`` serving processes each."""
    with contextlib.ExitStack() as stack:
        hosts = []
        for i in range(count):
            base = work / f"{scenario}-{i}"
            stop_log = work / f"{scenario}-{i}.stop.log"
            if scenario == "registry":
                server = stack.enter_context(
                    quiet_stop(
                        run_distribution(
                            base, proxy_url=upstream, extra={"log": {"level": "warn"}}
                        ),
                        stop_log,
                    )
                )
            else:
                env = regmirror_env(moto, bucket, write_back="true")
                env["REGMIRROR_UPSTREAMS__0__URL"] = upstream
                env["REGMIRROR_SERVER__WORKERS"] = str(workers)
                if scenario != "no-fleet":
                    env["REGMIRROR_FLEET__ADVERTISE_URL"] = "http://127.0.0.1:{port}"
                    env["REGMIRROR_FLEET__SECRET"] = SECRET
                server = stack.enter_context(
                    quiet_stop(run_regmirror(base, env=env, log_level=LOG_LEVEL), stop_log)
                )
            hosts.append(Host(scenario, server.url, server.process.pid))
        yield hosts


def measure(
    scenario: str,
    args: argparse.Namespace,
    image: Image,
    proxy: CountingProxy,
    moto: Any,
    bucket: str,
    work: Path,
) -> Row:
    row = Row(scenario, args.hosts, args.clients)
    proxy.reset(scenario)
    with start_hosts(
        scenario, args.hosts, work, proxy.url(scenario), moto, bucket, args.workers
    ) as hosts:
        with ThreadPoolExecutor(len(hosts)) as pool:  # every host primes at once
            problems = [p for p in pool.map(lambda h: prime(h, image), hosts) if p]
        if problems:
            row.errors = problems[:3]
            return row
        image.warm_page_cache()
        urls = [f"{h.url}/v2/herd/big/blobs/{image.digest}" for h in hosts]
        outcome = run_herd(
            urls,
            image,
            clients=args.clients,
            procs=len(urls),
            timeout=args.timeout,
            verify=args.verify,
        )
        counts, _ = settled_counts(proxy, scenario)
    results = outcome.results
    ttfbs = [r.ttfb for r in results if r.ttfb is not None]
    row.upstream_blob_gets = counts.blob_gets.get(image.digest, 0)
    row.manifest_gets = counts.requests.get("GET manifest", 0)
    row.manifest_heads = counts.requests.get("HEAD manifest", 0)
    row.upstream_mib = counts.bytes_down / MIB
    row.ttfb_p50_s, row.ttfb_p99_s = percentile(ttfbs, 50), percentile(ttfbs, 99)
    row.wall_s = outcome.wall
    row.correct = sum(r.correct for r in results)
    row.total = len(results)
    row.errors = sorted({r.error for r in results if r.error})[:3]
    return row


def table(rows: list[Row]) -> str:
    head = (
        f"{'scenario':<15}{'KxM':>7}{'blob GETs':>11}{'mf GETs':>9}{'mf HEADs':>10}"
        f"{'up MiB':>8}{'TTFB p50':>10}{'TTFB p99':>10}{'wall s':>8}{'ok':>9}"
    )
    lines = [head]
    for r in rows:

        def f(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        lines.append(
            f"{r.scenario:<15}{f'{r.hosts}x{r.clients}':>7}{r.upstream_blob_gets:>11}"
            f"{r.manifest_gets:>9}{r.manifest_heads:>10}{r.upstream_mib:>8.0f}"
            f"{f(r.ttfb_p50_s, '.3f'):>10}{f(r.ttfb_p99_s, '.3f'):>10}{f(r.wall_s, '.2f'):>8}"
            f"{f'{r.correct}/{r.total}':>9}"
        )
        lines += [f"    error: {e}" for e in r.errors]
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    by = {r.scenario: r for r in rows}
    lines = []
    cold, warm = by.get("fleet"), by.get("fleet-warm-s3")
    if cold is not None:
        lines.append(
            f"fleet: {cold.upstream_blob_gets} upstream blob GET(s) (target "
            f"{TARGETS['upstream_blob_gets']}), {cold.manifest_gets} manifest GET(s) (target "
            f"{TARGETS['manifest_gets']}), TTFB p99 {cold.ttfb_p99_s}s (target <= "
            f"{TARGETS['ttfb_p99_s']}s), {cold.correct}/{cold.total} bodies correct"
        )
    if cold and warm and cold.wall_s and warm.wall_s:
        lines.append(
            f"cold fleet / fleet on a warm S3 wall time: {cold.wall_s / warm.wall_s:.2f}x "
            f"(target <= {TARGETS['cold_over_warm']}x)"
        )
    return lines


def run(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    with (
        work_dir("regmirror-fleet-", args.work_dir, keep=args.keep) as root,
        run_moto(root) as moto,
        origin_with_image(root, args.size_mib * MIB) as (origin, image),
        CountingProxy(list(args.scenarios), origin.port) as proxy,
    ):
        print(f"# blob {image.digest} ({args.size_mib} MiB)", file=sys.stderr)
        fleet_bucket = moto.new_bucket("fleet")
        for scenario in args.scenarios:
            bucket = moto.new_bucket("nofleet") if scenario == "no-fleet" else fleet_bucket
            print(f"# {scenario}: {args.hosts} hosts x {args.clients} pulls", file=sys.stderr)
            work = root / scenario
            work.mkdir()
            rows.append(measure(scenario, args, image, proxy, moto, bucket, work))
            print(table(rows[-1:]).splitlines()[1], file=sys.stderr)
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
            time.sleep(SETTLE)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=8, help="K: hosts per scenario (8)")
    parser.add_argument("--clients", type=int, default=10, help="M: pulls per host (10)")
    parser.add_argument("--size-mib", type=int, default=64, help="the layer's size (64)")
    parser.add_argument(
        "--scenarios",
        type=lambda text: [s for s in text.split(",") if s],
        default=list(SCENARIOS),
        help=f"comma-separated, in order ({','.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="server.workers of each regmirror host (1)"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="per client (300 s)")
    parser.add_argument("--verify", choices=("compare", "sha256"), default="compare")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--work-dir", type=Path, help="where the temp directory goes")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}")
    if "fleet-warm-s3" in args.scenarios and "fleet" not in args.scenarios:
        parser.error("fleet-warm-s3 needs fleet to run first (it warms the bucket)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    print(table(rows))
    for line in verdicts(rows):
        print(line)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if all(r.correct == r.total and r.total for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

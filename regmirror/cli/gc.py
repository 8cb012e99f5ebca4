"""``regmirror gc``: remove what a stopped server left behind, and trim the cache."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

from regmirror.config import ConfigError, load
from regmirror.datalock import DataDirBusy
from regmirror.gc import EVICTED, PARTIAL, SESSION, UNREFERENCED, Report, collect
from regmirror.ops.units import size_text

# Exit statuses: 0 done, 2 bad usage or config, 3 a server is running on the data directory.
USAGE = 2
BUSY = 3


def add_parser(commands: Any) -> argparse.ArgumentParser:
    gc: argparse.ArgumentParser = commands.add_parser(
        "gc",
        help="with the server stopped: remove expired upload sessions and partial files, "
        "trim the cache to its low watermark",
    )
    gc.add_argument("--config", help="YAML config file (data_dir, cache, uploads, s3)")
    gc.add_argument("--data-dir", help="the data directory to collect")
    gc.add_argument(
        "--unreferenced",
        action="store_true",
        help="delete every local blob no repository link references, not only those "
        "unused for cache.unreferenced_grace",
    )
    gc.add_argument("--dry-run", action="store_true", help="print what would go; remove nothing")
    gc.add_argument("--json", action="store_true", help="print the report as JSON")
    return gc


def run(args: argparse.Namespace) -> int:
    try:
        settings = load(args.config, overrides={"data_dir": args.data_dir})
    except ConfigError as exc:
        print(f"regmirror: {exc}", file=sys.stderr)
        return USAGE
    try:
        report = collect(settings, unreferenced=args.unreferenced, dry_run=args.dry_run)
    except FileNotFoundError:
        print(f"regmirror: data directory {settings.data_dir} does not exist", file=sys.stderr)
        return USAGE
    except DataDirBusy as exc:
        print(f"regmirror: {exc}; stop it first (gc runs offline)", file=sys.stderr)
        return BUSY
    if args.json:
        print(json.dumps(_as_json(report), indent=2))
    else:
        _print(report)
    return 0


def _as_json(report: Report) -> dict[str, Any]:
    body = asdict(report)
    body["totals"] = {
        kind: {"count": report.count_of(kind), "bytes": report.bytes_of(kind)}
        for kind in (SESSION, PARTIAL, UNREFERENCED, EVICTED)
    }
    return body


def _print(report: Report) -> None:
    verb = "would remove" if report.dry_run else "removed"
    for removal in report.removed:
        print(
            f"{verb} {removal.kind} {removal.path} ({size_text(removal.bytes)}): {removal.reason}"
        )
    for kind in (SESSION, PARTIAL, UNREFERENCED, EVICTED):
        done = "to remove" if report.dry_run else "removed"
        print(f"{kind}s {done}: {report.count_of(kind)} ({size_text(report.bytes_of(kind))})")
    if report.unreferenced_kept:
        print(
            f"{report.unreferenced_kept} unreferenced blobs kept (within "
            "cache.unreferenced_grace); --unreferenced deletes them"
        )
    budget = f" of max_bytes {size_text(report.max_bytes)}" if report.max_bytes else ""
    low = report.low_watermark_bytes
    print(
        f"{report.data_dir}: cache {size_text(report.cache_bytes)}{budget}"
        + (f" (low watermark {size_text(low)})" if low is not None else "")
    )

"""``regmirror fsck``: re-hash the local store and report (or quarantine) corrupt blobs."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from regmirror.config import ConfigError, load
from regmirror.fsck import QUARANTINE, Report, check_store

# Exit statuses: 0 every checked blob is sound, 1 a bad one was found, 2 bad usage or config.
BAD_BLOBS = 1
USAGE = 2


def add_parser(commands: Any) -> argparse.ArgumentParser:
    fsck: argparse.ArgumentParser = commands.add_parser(
        "fsck", help="re-hash the local store and report blobs whose bytes do not match"
    )
    fsck.add_argument("--config", help="YAML config file (for data_dir)")
    fsck.add_argument("--data-dir", help="the data directory to check")
    fsck.add_argument(
        "--sample", type=int, metavar="N", help="re-hash N blobs chosen at random, not all"
    )
    fsck.add_argument(
        "--quarantine",
        action="store_true",
        help=f"move bad blobs into <data_dir>/{QUARANTINE}/ (never deleted) so they are "
        "fetched or pushed again",
    )
    fsck.add_argument("--json", action="store_true", help="print the report as JSON")
    return fsck


def run(args: argparse.Namespace) -> int:
    if args.sample is not None and args.sample < 1:
        print("regmirror: --sample must be at least 1", file=sys.stderr)
        return USAGE
    try:
        settings = load(args.config, overrides={"data_dir": args.data_dir})
    except ConfigError as exc:
        print(f"regmirror: {exc}", file=sys.stderr)
        return USAGE
    data_dir = Path(settings.data_dir)
    if not data_dir.is_dir():
        print(f"regmirror: data directory {data_dir} does not exist", file=sys.stderr)
        return USAGE
    report = check_store(data_dir, sample=args.sample, quarantine=args.quarantine)
    if args.json:
        print(json.dumps(_as_json(data_dir, report), indent=2))
    else:
        _print(data_dir, report)
    return 0 if report.ok else BAD_BLOBS


def _as_json(data_dir: Path, report: Report) -> dict[str, Any]:
    return {
        "data_dir": str(data_dir),
        "blobs": report.blobs,
        "checked": report.checked,
        "bytes_checked": report.bytes_checked,
        "ok": report.ok,
        "bad": [asdict(finding) for finding in report.bad],
    }


def _print(data_dir: Path, report: Report) -> None:
    for finding in report.bad:
        line = f"{finding.problem}: {finding.path}"
        if finding.actual:
            line += f" (content is {finding.actual})"
        if finding.quarantined_to:
            line += f" -> moved to {finding.quarantined_to}"
        print(line)
    print(
        f"{data_dir}: {report.checked} of {report.blobs} blobs re-hashed "
        f"({report.bytes_checked} bytes), {len(report.bad)} bad"
    )

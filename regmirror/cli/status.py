"""``regmirror status``: ask a running regmirror how it is doing."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import aiohttp
from rich.console import Console

from regmirror.cli import remote
from regmirror.ops.status import Unreachable, read_status, render


def add_parser(commands: Any) -> argparse.ArgumentParser:
    status: argparse.ArgumentParser = commands.add_parser(
        "status",
        help="show what a running regmirror is doing",
        description="Version and uptime, cache use and budget, hit ratio, fills in flight, "
        "upstream and S3 health, evictions and errors of a running regmirror. Exit status: "
        "0 ready, 1 not ready, 2 unreachable.",
    )
    remote.add_url(status)
    status.add_argument(
        "--metrics-url",
        help="where /metrics and /-/status are served, if not at --url (metrics_listen)",
    )
    status.add_argument("--json", action="store_true", help="print the report as JSON")
    return status


def run(args: argparse.Namespace) -> int:
    async def read() -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            return await read_status(session, args.url, args.metrics_url)

    try:
        report = asyncio.run(read())
    except Unreachable as exc:
        print(f"regmirror status: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(Console(file=sys.stdout, highlight=False), report)
    return 0 if report["ready"] else 1

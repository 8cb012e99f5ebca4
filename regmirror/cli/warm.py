"""``regmirror warm IMAGE...``: pre-pull images into a running regmirror."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import aiohttp
from rich.console import Console
from yarl import URL

from regmirror.cli import remote
from regmirror.ops.reference import BadReference, parse_platform, parse_reference, read_references
from regmirror.ops.warm import ImageResult, Warmer
from regmirror.ops.warm_display import PlainProgress, TerminalProgress, print_summary

# Not REGMIRROR_*: serve reads every such variable as a setting and refuses unknown ones.
CREDS_ENV = "WARM_CREDS"


def add_parser(commands: Any) -> argparse.ArgumentParser:
    warm: argparse.ArgumentParser = commands.add_parser(
        "warm",
        help="pre-pull images into a running regmirror",
        description="Pull every manifest and blob of each IMAGE through a running regmirror, "
        "so later pulls are served from its local disk. IMAGE is written as a client pulls "
        "it through regmirror (library/alpine:3.19, NAME@sha256:...); a registry host in "
        "front (docker.io/library/alpine:3.19) routes by containerd's ?ns=.",
    )
    warm.add_argument("images", nargs="*", metavar="IMAGE", help="image references")
    remote.add_url(warm)
    warm.add_argument(
        "--from",
        dest="from_files",
        action="append",
        default=[],
        metavar="FILE",
        help="read references from FILE, one a line ('#' comments); '-' is stdin",
    )
    warm.add_argument(
        "--platform",
        action="append",
        default=[],
        help="warm only this platform of an index (os/arch[/variant]; repeatable; default all)",
    )
    warm.add_argument(
        "--creds",
        help=f"USER:PASSWORD for regmirror (default ${CREDS_ENV}; prefer the variable, "
        "a command line is visible to every user)",
    )
    warm.add_argument("--jobs", type=int, default=4, help="blob downloads at once (default 4)")
    warm.add_argument("--json", action="store_true", help="print one JSON document, no progress")
    return warm


def run(args: argparse.Namespace) -> int:
    try:
        texts = list(args.images)
        for path in args.from_files:
            texts += read_references(sys.stdin.read() if path == "-" else _read(path))
        if not texts:
            raise BadReference("no images given (IMAGE... or --from FILE)")
        references = [parse_reference(text) for text in texts]
        platforms = [parse_platform(text) for text in args.platform]
        username, password = _credentials(args.creds or os.environ.get(CREDS_ENV))
        url = URL(args.url)
        if url.user is not None:  # http://user:pass@host: used, and kept out of every message
            if username is None:
                username, password = url.user, url.password or ""
            url = url.with_user(None)
        if args.jobs < 1:
            raise BadReference("--jobs must be at least 1")
    except (BadReference, OSError) as exc:
        print(f"regmirror warm: {exc}", file=sys.stderr)
        return 2
    console = Console(file=sys.stdout, highlight=False)
    started = time.monotonic()
    display = None
    if not args.json:
        display = TerminalProgress(console) if console.is_terminal else PlainProgress(console)

    async def warm() -> list[ImageResult]:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            warmer = Warmer(
                str(url),
                session,
                username=username,
                password=password,
                platforms=platforms,
                jobs=args.jobs,
                progress=display,
            )
            if display is None:
                return await warmer.warm(references)
            with display:
                return await warmer.warm(references)

    results = asyncio.run(warm())
    seconds = time.monotonic() - started
    if args.json:
        document = {
            "ok": all(r.ok for r in results),
            "url": str(url),
            "images": [r.to_json() for r in results],
            "bytes": sum(r.total_bytes for r in results if r.ok),
            "seconds": round(seconds, 3),
        }
        print(json.dumps(document, indent=2))
    else:
        print_summary(console, results, seconds)
    return 0 if all(r.ok for r in results) else 1


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def _credentials(text: str | None) -> tuple[str | None, str | None]:
    if not text:
        return None, None
    username, sep, password = text.partition(":")
    if not sep or not username:
        raise BadReference("credentials must be USER:PASSWORD")
    return username, password

#!/usr/bin/env python3
"""Startup time with a large store: how soon regmirror answers and serves a stored blob.

Builds a data directory of ``--blobs`` small blobs (default 100,000), each linked into
one of 100 repositories as a previous run leaves them, then starts
``python -m regmirror serve`` on it ``--repeat`` times per variant and measures, from
the spawn:

- ``v2``: until ``GET /v2/`` answers 200 (polled every 5 ms);
- ``blob``: until a stored blob (a different one each run) has been served whole and
  re-hashed;
- ``index``: until the server logs that its index of the store is built.

Variants: this checkout (``new``), and with ``--compare REV`` that git revision too
(``old``, checked out into a temporary worktree); each with a warm page cache and, with
``--cold``, after dropping the page cache (``echo 3 > /proc/sys/vm/drop_caches``; needs
root, and is reported when not permitted). Target: ``blob`` <= 1.5 s with 100,000 blobs.

    python bench/startup.py                              # new, warm, 100,000 blobs
    python bench/startup.py --cold --compare main        # old vs new, warm and cold
    python bench/startup.py --blobs 20000 --repeat 1 --data-dir /tmp/store   # kept, reused

Only 127.0.0.1 is used; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import HOST, REPO_ROOT, drop_page_cache

from regmirror import layout
from regmirror.digest import Digest
from tests.support.processes import free_port

REPOSITORIES = 100
MARKER = "bench-startup.json"  # what the data directory holds, so a kept one is reused
DEADLINE = 180.0  # seconds any one measurement may take
INDEX_LINES = ("local cache indexed", "local cache:")  # this checkout's, older ones'


def repository(i: int) -> str:
    return f"bench/r{i % REPOSITORIES}"


def blob_of(i: int) -> bytes:
    """The bytes of blob ``i``: small, distinct, reproducible."""
    return hashlib.sha256(b"%d" % i).digest() * (1 + i % 8)


def build_store(data_dir: Path, count: int) -> None:
    marker = data_dir / MARKER
    if marker.exists() and json.loads(marker.read_text()).get("blobs") == count:
        print(f"reusing {data_dir} ({count} blobs)", file=sys.stderr)
        return
    started = time.monotonic()
    for i in range(count):
        data = blob_of(i)
        digest = Digest.of(data)
        blob = data_dir / layout.blob_data(digest)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = data_dir / layout.layer_link(repository(i), digest)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.write_text(str(digest))
    marker.write_text(json.dumps({"blobs": count}))
    print(f"wrote {count} blobs in {time.monotonic() - started:.1f}s", file=sys.stderr)


@contextlib.contextmanager
def checkout(rev: str, under: Path) -> Iterator[Path]:
    """``rev`` checked out in a temporary git worktree."""
    tree = under / "compare"
    subprocess.run(
        ["git", "-C", str(REPO_ROOT), "worktree", "add", "--detach", "-q", str(tree), rev],
        check=True,
    )
    try:
        yield tree
    finally:
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "worktree", "remove", "--force", str(tree)], check=False
        )


def get(port: int, path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def measure(code: Path, data_dir: Path, run: int, count: int, log_path: Path) -> dict[str, float]:
    """One start of the server in ``code`` on ``data_dir``: seconds to each milestone."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGMIRROR_")}
    env["PYTHONPATH"] = str(code)
    i = (run * 7919) % count  # a different blob each run, never one read before
    data = blob_of(i)
    digest = Digest.of(data)
    argv = [sys.executable, "-m", "regmirror", "serve", "--listen", f"{HOST}:{port}"]
    argv += ["--data-dir", str(data_dir), "--log-level", "INFO"]
    with open(log_path, "wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=code)
    figures: dict[str, float] = {}
    try:
        deadline = started + DEADLINE
        while "v2" not in figures:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not come up:\n{log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if get(port, "/v2/")[0] == 200:
                    figures["v2"] = time.monotonic() - started
                    break
            time.sleep(0.005)
        status, body = get(port, f"/v2/{repository(i)}/blobs/{digest}")
        if status != 200 or Digest.of(body) != digest:
            raise RuntimeError(f"blob {digest}: HTTP {status}, {len(body)} bytes")
        figures["blob"] = time.monotonic() - started
        while "index" not in figures:
            if any(line in log_path.read_text() for line in INDEX_LINES):
                figures["index"] = time.monotonic() - started
            elif time.monotonic() > deadline:
                raise RuntimeError("the index never finished loading")
            else:
                time.sleep(0.01)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    return figures


def summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        key: {
            "median": round(statistics.median(r[key] for r in runs), 3),
            "min": round(min(r[key] for r in runs), 3),
            "max": round(max(r[key] for r in runs), 3),
        }
        for key in ("v2", "blob", "index")
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3, help="starts per variant and cache")
    parser.add_argument("--cold", action="store_true", help="also measure with no page cache")
    parser.add_argument("--compare", metavar="REV", help="also measure this git revision")
    parser.add_argument("--data-dir", type=Path, help="keep the store here (reused if built)")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON ('-': stdout)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="regmirror-startup-") as tmp:
        work = Path(tmp)
        data_dir = args.data_dir or work / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        build_store(data_dir, args.blobs)
        variants = {"new": REPO_ROOT}
        with contextlib.ExitStack() as stack:
            if args.compare:
                variants["old"] = stack.enter_context(checkout(args.compare, work))
            caches = ["warm", "cold"] if args.cold else ["warm"]
            results: dict[str, Any] = {"blobs": args.blobs, "runs": {}}
            cold_note = None
            run = 0
            for cache in caches:
                for name, code in variants.items():
                    runs = []
                    if cache == "warm":  # one start, unmeasured, to warm the page cache
                        measure(code, data_dir, run, args.blobs, work / "warmup.log")
                        run += 1
                    for _ in range(args.repeat):
                        if cache == "cold" and (cold_note := drop_page_cache()) is not None:
                            break
                        log = work / f"{name}-{cache}-{run}.log"
                        runs.append(measure(code, data_dir, run, args.blobs, log))
                        run += 1
                    if runs:
                        results["runs"][f"{name}/{cache}"] = {"summary": summary(runs), "all": runs}
            if cold_note:
                results["cold"] = cold_note
    print(f"{args.blobs} blobs on disk; seconds from spawn (median [min-max] of {args.repeat}):")
    print(f"{'variant':<12}{'/v2/ answers':>22}{'first blob served':>22}{'index built':>22}")
    for variant, figures in results["runs"].items():
        cells = [
            f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}]"
            for s in (figures["summary"][k] for k in ("v2", "blob", "index"))
        ]
        print(f"{variant:<12}" + "".join(f"{c:>22}" for c in cells))
    if cold_note:
        print(f"cold: not measured ({cold_note})")
    if args.json:
        text = json.dumps(results, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

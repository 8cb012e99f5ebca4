"""What one aiohttp process costs per request on this host, doing nothing else.

The bound under regmirror's manifest figure: a bare aiohttp server (no middleware, no
listener bounds, no metrics, no access log) answers ``GET /v2/<name>/manifests/<tag>``
with a fixed 1 KiB body and a manifest's headers, under the manifest step's wrk load
(``-t2 -c64``, docker's Accept list). It prints requests/s and server CPU per request
(utime+stime, :func:`harness.cpu_seconds`) for each round, then the medians; with
``--uvloop`` (if installed) the same server runs on uvloop's event loop::

    python bench/aiohttp_floor.py [--rounds 3] [--duration 5] [--uvloop]

Everything is bounded: the server is started with a deadline and killed at the end,
wrk runs ``--duration`` seconds and is killed 60 s after that. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from harness import HOST, cpu_seconds, process_tree

BENCH_DIR = Path(__file__).resolve().parent
WRK_LUA = BENCH_DIR / "wrk_report.lua"
BODY = b"{" + b" " * 1022 + b"}"  # a small manifest's size
HEADERS = {
    "Content-Type": "application/vnd.docker.distribution.manifest.v2+json",
    "Docker-Content-Digest": "sha256:" + "0" * 64,
    "ETag": '"sha256:' + "0" * 64 + '"',
    "Docker-Distribution-API-Version": "registry/2.0",
}
ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
)
START_TIMEOUT = 30.0
WRK_GRACE = 60.0


def serve(port: int, use_uvloop: bool) -> None:
    """The server itself (run in a child process)."""
    import asyncio

    from aiohttp import web

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(body=BODY, headers=HEADERS)

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", manifest)
    if use_uvloop:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(app, host=HOST, port=port, access_log=None, print=None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the server did not answer within {START_TIMEOUT:.0f} s")


def run_wrk(url: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [args.wrk, "-t2", "-c64", f"-d{args.duration}s", "-s", str(WRK_LUA)]
    cmd += ["-H", f"Accept: {ACCEPT}", url]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.duration + WRK_GRACE, check=True
    ).stdout
    for line in out.splitlines():
        if line.startswith("WRKJSON "):
            return dict(json.loads(line[len("WRKJSON ") :]))
    raise SystemExit(f"wrk gave no report:\n{out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=int, default=5)
    p.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # the child's port
    args = p.parse_args()
    if args.serve:
        serve(args.serve, args.uvloop)
        return 0
    port = free_port()
    child = [sys.executable, __file__, "--serve", str(port)] + (["--uvloop"] if args.uvloop else [])
    proc = subprocess.Popen(child, stdin=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}/v2/floor/manifests/latest"
    rates, costs = [], []
    try:
        wait_ready(url, proc)
        for rnd in range(1, args.rounds + 1):
            load = os.getloadavg()[0]
            before = cpu_seconds(process_tree(proc.pid))
            w = run_wrk(url, args)
            cpu = cpu_seconds(process_tree(proc.pid)) - before
            requests = int(w["requests"])
            if requests == 0 or any(w["errors"].values()):
                raise SystemExit(f"wrk saw errors or no requests: {w}")
            rate = requests / (int(w["duration_us"]) / 1e6)
            rates.append(rate)
            costs.append(cpu / requests * 1e6)
            print(
                f"round {rnd}: {rate:,.0f} req/s, server CPU {costs[-1]:.1f} us/req, "
                f"load {load:.2f}",
                flush=True,
            )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    loop = "uvloop" if args.uvloop else "asyncio"
    print(
        f"bare aiohttp ({loop}), medians of {args.rounds}: {statistics.median(rates):,.0f} req/s, "
        f"{statistics.median(costs):.1f} us CPU per request"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

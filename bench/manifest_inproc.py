"""The Python cost of one stored-manifest GET through regmirror's whole serving stack,
without the network: a figure that a loaded shared machine disturbs far less than wrk's.

It builds the application as ``regmirror serve`` does (``create_app`` with default
settings on a temp data directory, aiohttp's runner, the :class:`Listener`'s
per-connection protocol), stores a small image through the registry, then feeds one
keep-alive connection's protocol the manifest step's request bytes (docker's Accept
list) from memory, ``--requests`` times per round, the response going to an in-memory
transport. It prints the CPU time (``time.process_time``) per request of each round and
their minimum: the least disturbed round. Event-loop iterations still cost what they
cost (an ``epoll_wait`` of zero timeout each), the socket writes and reads do not.
With ``--fast`` the listener has regmirror's fast path (:mod:`regmirror.lean`, on in
``regmirror serve`` by default), which answers in ``data_received`` itself::

    python bench/manifest_inproc.py [--rounds 5] [--requests 4000] [--fast]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from harness import HOST  # also puts the repository on sys.path

from regmirror.api.keys import REGISTRY
from regmirror.app import create_app
from regmirror.config import Settings
from regmirror.connections import Limits, Listener
from regmirror.digest import Digest
from regmirror.lean.path import FastPath
from regmirror.logs.access import runner_options

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT = (
    f"{MANIFEST_V2}, application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"
)
TURNS = 50  # event-loop turns a response may take before the run is declared stuck


class MemoryTransport(asyncio.Transport):
    """A client connection whose bytes go to memory."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = bytearray()
        self.closing = False

    def write(self, data: Any) -> None:
        self.sent += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (HOST, 40000), "sockname": (HOST, 5000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def digest_of(data: bytes) -> Digest:
    return Digest.parse("sha256:" + hashlib.sha256(data).hexdigest())


async def store_image(app: web.Application, data_dir: Path) -> bytes:
    """bench/small:latest, as registry_bench.py pushes it; its manifest's bytes."""
    registry = app[REGISTRY]
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    layer = os.urandom(4096)
    for blob in (config, layer):
        upload = data_dir / "upload.tmp"
        upload.write_bytes(blob)
        await registry.commit_blob("bench/small", digest_of(blob), upload)
    doc = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_V2,
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": len(config),
            "digest": str(digest_of(config)),
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": len(layer),
                "digest": str(digest_of(layer)),
            }
        ],
    }
    raw = json.dumps(doc, indent=3).encode()
    await registry.put_manifest("bench/small", "latest", raw, MANIFEST_V2)
    return raw


async def measure(args: argparse.Namespace) -> list[float]:
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # one process: plain metrics
    with tempfile.TemporaryDirectory(prefix="manifest-inproc-") as tmp:
        app = create_app(Settings(data_dir=tmp))
        runner = web.AppRunner(app, **runner_options(app))
        await runner.setup()
        try:
            raw = await store_image(app, Path(tmp))
            fast = FastPath.of(app) if args.fast else None
            listener = Listener(runner, HOST, 0, limits=Limits(), fast=fast)
            request = (
                "GET /v2/bench/small/manifests/latest HTTP/1.1\r\n"
                f"Host: {HOST}\r\nAccept: {ACCEPT}\r\nUser-Agent: wrk\r\n\r\n"
            ).encode()
            connection = listener._protocol()
            transport = MemoryTransport()
            connection.connection_made(transport)

            async def one() -> None:
                connection.data_received(request)
                for _ in range(TURNS):
                    await asyncio.sleep(0)
                    if transport.sent.endswith(raw):
                        transport.sent.clear()
                        return
                raise SystemExit(f"no whole response: {bytes(transport.sent[:300])!r}")

            for _ in range(args.requests // 2):  # warm every cache on the way
                await one()
            costs = []
            for _ in range(args.rounds):
                started = time.process_time()
                for _ in range(args.requests):
                    await one()
                costs.append((time.process_time() - started) / args.requests * 1e6)
            connection.connection_lost(None)
            return costs
        finally:
            await runner.cleanup()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=4000, help="per round")
    p.add_argument("--fast", action="store_true", help="with the fast path (regmirror.lean)")
    args = p.parse_args()
    logging.disable(logging.WARNING)
    costs = asyncio.run(measure(args))
    path = "fast path" if args.fast else "aiohttp's path"
    print(f"CPU us per manifest GET ({path}), by round:", ", ".join(f"{c:.1f}" for c in costs))
    print(f"min {min(costs):.1f} us (load average {os.getloadavg()[0]:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""A soak: many concurrent clients mixing every kind of request against a warm regmirror.

regmirror starts on a fresh data directory and gets a few images pushed (a 4 KiB, a
1 MiB and an 8 MiB layer under tags). After a warm-up, ``--clients`` clients (in
``--procs`` processes) run for ``--duration`` seconds, each picking at random: manifest
GETs by tag, whole blob GETs, blob GETs with a random ``Range``, HEADs, pushes of a new
small blob (monolithic upload, then a HEAD of it), and slow readers that take a large
blob 64 KiB at a time with pauses. Every body is compared with the bytes it must be.

It prints requests, non-2xx by status, wrong bodies, latency p50/p99 per kind, and the
server's RSS and open file descriptors at start (after warm-up), peak and end (after the
clients stop and the server settles). Targets: 0 5xx, 0 wrong bodies, RSS and fds back
to their warm-up level. The warm-up runs at the full concurrency: what 500 connections
take once (socket and parser buffers, the allocator's high-water mark: about 15 MiB,
measured, and not given back by ``malloc_trim``) is the server's working set, and the
soak asks whether the minute after it grows past it (a leak), not whether it was ever
reached.

    python bench/soak.py                         # 500 clients, 60 s
    python bench/soak.py --clients 50 --duration 10 --json -

Only 127.0.0.1 is used; every request has a timeout and the run has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp
from harness import MIB, TreeMemory, open_fds, percentile, status_kib

from tests.support.processes import run_regmirror

REPO = "soak/app"
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
LAYER_SIZES = {"small": 4096, "mib": MIB, "big": 8 * MIB}
KINDS = {  # kind -> weight
    "manifest": 30,
    "blob": 15,
    "range": 20,
    "head": 15,
    "push": 10,
    "slow": 10,
}
REQUEST_TIMEOUT = 60.0
SLOW_PIECE = 64 * 1024
SLOW_PAUSE = 0.05  # seconds between a slow reader's pieces
SETTLE_S = 5.0  # after the clients stop, before the end figures
FD_INTERVAL = 0.2
TARGET_GROWTH = 1.25  # end RSS within 25% (and fds within 10 + 10%) of the warm-up level


@dataclass
class Content:
    layers: dict[str, bytes]  # tag -> layer bytes
    digests: dict[str, str]  # tag -> layer digest
    manifests: dict[str, bytes]  # tag -> manifest bytes


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_content(seed: int = 7) -> Content:
    rng = random.Random(seed)
    layers, digests, manifests = {}, {}, {}
    for tag, size in LAYER_SIZES.items():
        layer = rng.randbytes(size)
        config = json.dumps({"os": "linux", "architecture": "amd64", "tag": tag}).encode()
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST_V2,
                "config": {"mediaType": CONFIG_V1, "size": len(config), "digest": sha256(config)},
                "layers": [{"mediaType": LAYER, "size": size, "digest": sha256(layer)}],
            }
        ).encode()
        layers[tag], digests[tag], manifests[tag] = layer, sha256(layer), manifest
        layers[f"{tag}.config"], digests[f"{tag}.config"] = config, sha256(config)
    return Content(layers, digests, manifests)


async def push_blob(session: aiohttp.ClientSession, base: str, data: bytes) -> int:
    async with session.post(
        f"{base}/v2/{REPO}/blobs/uploads/", params={"digest": sha256(data)}, data=data
    ) as response:
        await response.read()
        return response.status


async def push(base: str, content: Content) -> None:
    async with aiohttp.ClientSession() as session:
        for data in content.layers.values():
            if await push_blob(session, base, data) != 201:
                raise RuntimeError("pushing the soak content failed")
        for tag, manifest in content.manifests.items():
            url = f"{base}/v2/{REPO}/manifests/{tag}"
            headers = {"Content-Type": MANIFEST_V2}
            async with session.put(url, data=manifest, headers=headers) as response:
                if response.status != 201:
                    raise RuntimeError(f"pushing manifest {tag}: HTTP {response.status}")


# ---------------------------------------------------------------- the clients


@dataclass
class Tally:
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # exceptions by type
    wrong: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.wrong += other.wrong
        for kind, values in other.latencies.items():
            self.latencies[kind] += values


class Client:
    def __init__(self, base: str, content: Content, session: aiohttp.ClientSession, seed: int):
        self.base, self.content, self.session = base, content, session
        self.rng = random.Random(seed)
        self.tally = Tally()

    async def run(self, deadline: float) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < deadline:
            kind = self.rng.choices(kinds, weights)[0]
            started = time.monotonic()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    status, correct = await getattr(self, kind)()
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                self.tally.errors[type(exc).__name__] += 1
                continue
            self.tally.requests += 1
            self.tally.statuses[status] += 1
            self.tally.wrong += not correct
            self.tally.latencies[kind].append(time.monotonic() - started)

    def _tag(self) -> str:
        return self.rng.choice(list(LAYER_SIZES))

    async def manifest(self) -> tuple[int, bool]:
        tag = self._tag()
        url = f"{self.base}/v2/{REPO}/manifests/{tag}"
        async with self.session.get(url, headers={"Accept": MANIFEST_V2}) as response:
            body = await response.read()
            return response.status, body == self.content.manifests[tag]

    async def blob(self) -> tuple[int, bool]:
        tag = self.rng.choice(list(self.content.digests))
        async with self.session.get(self._blob_url(tag)) as response:
            body = await response.read()
            return response.status, body == self.content.layers[tag]

    async def range(self) -> tuple[int, bool]:
        tag = self._tag()
        layer = self.content.layers[tag]
        start = self.rng.randrange(len(layer))
        end = min(len(layer) - 1, start + self.rng.randrange(1, 256 * 1024))
        headers = {"Range": f"bytes={start}-{end}"}
        async with self.session.get(self._blob_url(tag), headers=headers) as response:
            body = await response.read()
            return response.status, response.status == 206 and body == layer[start : end + 1]

    async def head(self) -> tuple[int, bool]:
        tag = self._tag()
        if self.rng.random() < 0.5:
            url, expected = self._blob_url(tag), len(self.content.layers[tag])
        else:
            url = f"{self.base}/v2/{REPO}/manifests/{tag}"
            expected = len(self.content.manifests[tag])
        async with self.session.head(url, headers={"Accept": MANIFEST_V2}) as response:
            return response.status, response.content_length == expected

    async def push(self) -> tuple[int, bool]:
        data = self.rng.randbytes(self.rng.randrange(1, 64 * 1024))
        status = await push_blob(self.session, self.base, data)
        if status != 201:
            return status, True
        url = f"{self.base}/v2/{REPO}/blobs/{sha256(data)}"
        async with self.session.head(url) as response:
            return response.status, response.content_length == len(data)

    async def slow(self) -> tuple[int, bool]:
        """A reader that takes the big blob 64 KiB at a time, then stops after ~1 MiB."""
        layer = self.content.layers["big"]
        async with self.session.get(self._blob_url("big")) as response:
            got = bytearray()
            for _ in range(16):  # bounded: 1 MiB at most
                piece = await response.content.read(SLOW_PIECE)
                if not piece:
                    break
                got += piece
                await asyncio.sleep(SLOW_PAUSE)
            response.close()  # a client that walks away mid-body
            return response.status, bytes(got) == layer[: len(got)]

    def _blob_url(self, tag: str) -> str:
        return f"{self.base}/v2/{REPO}/blobs/{self.content.digests[tag]}"


def client_process(base: str, clients: int, duration: float, seed: int) -> Tally:
    """One process's share of the clients, on its own event loop."""

    async def main() -> Tally:
        content = make_content()
        connector = aiohttp.TCPConnector(limit=0)
        total = Tally()
        deadline = time.monotonic() + duration
        async with aiohttp.ClientSession(connector=connector) as session:
            workers = [Client(base, content, session, seed * 10_000 + i) for i in range(clients)]
            await asyncio.gather(*(w.run(deadline) for w in workers))
        for worker in workers:
            total.merge(worker.tally)
        return total

    return asyncio.run(main())


def run_clients(base: str, clients: int, procs: int, duration: float) -> Tally:
    shares = [clients // procs + (i < clients % procs) for i in range(procs)]
    total = Tally()
    with concurrent.futures.ProcessPoolExecutor(procs) as pool:
        futures = [
            pool.submit(client_process, base, share, duration, i)
            for i, share in enumerate(shares)
            if share
        ]
        for future in futures:
            total.merge(future.result(timeout=duration + 2 * REQUEST_TIMEOUT))
    return total


# ---------------------------------------------------------------- the server's figures


class FdPeak:
    """Samples the open descriptors of a process tree in a thread; keeps the peak."""

    def __init__(self, root: int):
        self.root, self.peak = root, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, open_fds(self.root))
            self._stop.wait(FD_INTERVAL)


def rss_mib(pid: int) -> float:
    return status_kib(pid, "VmRSS") / 1024


def soak(args: argparse.Namespace) -> dict[str, Any]:
    content = make_content()
    with (
        tempfile.TemporaryDirectory(prefix="soak-") as work,
        run_regmirror(Path(work), log_level="WARNING") as server,
    ):
        pid = server.process.pid
        asyncio.run(push(server.url, content))
        run_clients(server.url, args.clients, args.procs, args.warmup)
        start = {"rss_mib": rss_mib(pid), "fds": open_fds(pid)}
        wall = time.monotonic()
        with TreeMemory(pid) as memory, FdPeak(pid) as fds:
            tally = run_clients(server.url, args.clients, args.procs, args.duration)
        wall = time.monotonic() - wall
        time.sleep(SETTLE_S)
        end = {"rss_mib": rss_mib(pid), "fds": open_fds(pid)}
        peak = {"rss_mib": memory.peak_kib / 1024, "fds": fds.peak}
        server_cpu = memory.cpu
    return report(args, tally, start, peak, end, wall, server_cpu)


def report(
    args: argparse.Namespace,
    tally: Tally,
    start: dict[str, float],
    peak: dict[str, float],
    end: dict[str, float],
    wall: float,
    server_cpu: float,
) -> dict[str, Any]:
    ok = {200, 201, 202, 204, 206}
    non_2xx = {str(s): n for s, n in sorted(tally.statuses.items()) if s not in ok}
    five_xx = sum(n for s, n in tally.statuses.items() if s >= 500)
    latency = {
        kind: {"n": len(v), "p50_ms": _ms(percentile(v, 50)), "p99_ms": _ms(percentile(v, 99))}
        for kind, v in sorted(tally.latencies.items())
    }
    verdicts = {
        "no_5xx": five_xx == 0,
        "no_wrong_bodies": tally.wrong == 0,
        "rss_back": end["rss_mib"] <= start["rss_mib"] * TARGET_GROWTH,
        "fds_back": end["fds"] <= start["fds"] * 1.1 + 10,
    }
    return {
        "clients": args.clients,
        "procs": args.procs,
        "duration_s": args.duration,
        "wall_s": round(wall, 2),
        "requests": tally.requests,
        "requests_per_s": round(tally.requests / wall, 1) if wall else None,
        "non_2xx": non_2xx,
        "client_errors": dict(tally.errors),
        "wrong_bodies": tally.wrong,
        "latency": latency,
        "server": {"start": start, "peak": peak, "end": end, "cpu_s": round(server_cpu, 1)},
        "verdicts": verdicts,
        "load": os.getloadavg(),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def print_report(result: dict[str, Any]) -> None:
    print(
        f"soak: {result['clients']} clients in {result['procs']} processes for "
        f"{result['duration_s']} s (wall {result['wall_s']} s), {os.cpu_count()} CPUs, "
        f"load {' '.join(f'{x:.1f}' for x in result['load'])}"
    )
    print(
        f"requests {result['requests']} ({result['requests_per_s']}/s), non-2xx "
        f"{result['non_2xx'] or 0}, client errors {result['client_errors'] or 0}, "
        f"wrong bodies {result['wrong_bodies']}"
    )
    print(f"{'kind':10} {'n':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for kind, row in result["latency"].items():
        print(f"{kind:10} {row['n']:>8} {row['p50_ms']:>8} {row['p99_ms']:>8}")
    s = result["server"]
    print(f"{'server':10} {'start':>8} {'peak':>8} {'end':>8}")
    for key in ("rss_mib", "fds"):
        print(f"{key:10} {s['start'][key]:>8.0f} {s['peak'][key]:>8.0f} {s['end'][key]:>8.0f}")
    print(f"server CPU {s['cpu_s']} s")
    for name, passed in result["verdicts"].items():
        print(f"  {name:18} {'ok' if passed else 'MISSED'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=500, help="concurrent clients (500)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (60)")
    p.add_argument("--procs", type=int, default=2, help="client processes (2)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of warm-up traffic at full concurrency (5)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON ('-': stdout)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = soak(args)
    if args.json == "-":
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        print_report(result)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    return 0 if all(result["verdicts"].values()) else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())

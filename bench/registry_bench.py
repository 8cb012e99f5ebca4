#!/usr/bin/env python3
"""Benchmark regmirror against registry:2 (CNCF distribution) and nginx static on this host.

Starts both registries on free 127.0.0.1 ports with fresh data directories, pushes
the same images into each through the registry HTTP API, and starts nginx serving the
same bytes as static files (sendfile, one worker per core) at the same paths: the bound
a file server reaches on this machine. Then it measures all three with wrk:

* manifest GET by tag with docker's Accept list: requests/s and p99 latency;
* 1 MiB blob GET: requests/s;
* one 256 MiB blob GET: MB/s (10**6 bytes/s), wrk with ``--big-connections``
  connections each fetching the whole blob again and again.

Each step runs for every server back to back (the order turns round every round)
for ``--rounds`` rounds; the table shows medians, the ratio regmirror / registry:2
(for p99 latency and CPU cost: registry:2 / regmirror), so a ratio above 1 always
means regmirror did better, and regmirror's ratio to nginx static, read the same way
(1 would be a static file server's speed). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from harness import cpu_seconds, nginx_static, process_tree
from yarl import URL

BENCH_DIR = Path(__file__).resolve().parent
WRK_LUA = BENCH_DIR / "wrk_report.lua"
HOST = "127.0.0.1"  # the only address this script talks to or listens on
MIB = 1024 * 1024

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
# What docker (through containerd's resolver) sends when it pulls by tag. wrk keeps one
# value per header name, so the list goes in one comma-joined header (same meaning).
DOCKER_ACCEPT = (
    "application/vnd.docker.distribution.manifest.v2+json, "
    "application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.oci.image.index.v1+json, */*"
)

START_TIMEOUT = 30.0  # seconds for a server to answer GET /v2/
STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL
WRK_GRACE = 60.0  # seconds wrk may run past --duration before it is killed
PY_SPY_GRACE = 60.0
PUSH_TIMEOUT = aiohttp.ClientTimeout(total=900, sock_connect=10, sock_read=120)
READ_TIMEOUT = aiohttp.ClientTimeout(total=300, sock_connect=10, sock_read=60)
WRITE_CHUNK = 4 * MIB

REGMIRROR = "regmirror"
REGISTRY2 = "registry:2"
NGINX = "nginx static"


class BenchError(Exception):
    """Something that makes the figures meaningless: the run stops."""


# -- servers ------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_file: Any = None
    static: bool = False  # serves files laid out by lay_out_static(), takes no pushes

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_regmirror(work: Path, workers: int = 1) -> Server:
    server = Server(REGMIRROR, free_port(), work / "regmirror-data", work / "regmirror.log")
    server.data_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGMIRROR_")}
    env["REGMIRROR_SERVER__WORKERS"] = str(workers)  # server.workers (0: one per CPU)
    server.log_file = open(server.log_path, "wb")  # noqa: SIM115 (open while the server runs; stop() closes)
    server.proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "regmirror",
            "serve",
            "--listen",
            f"{HOST}:{server.port}",
            "--data-dir",
            str(server.data_dir),
            "--log-level",
            "WARNING",
        ],
        stdin=subprocess.DEVNULL,
        stdout=server.log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return server


def start_registry2(work: Path, binary: str) -> Server:
    server = Server(REGISTRY2, free_port(), work / "registry2-data", work / "registry2.log")
    server.data_dir.mkdir()
    config = work / "registry2-config.yml"
    # The registry:2 image's stock config, minus the access log (regmirror writes
    # none either), at log level warn, on the filesystem driver.
    config.write_text(
        "version: 0.1\n"
        "log:\n"
        "  level: warn\n"
        "  accesslog:\n"
        "    disabled: true\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {server.data_dir}\n"
        "  cache:\n"
        "    blobdescriptor: inmemory\n"
        "  delete:\n"
        "    enabled: true\n"
        "http:\n"
        f"  addr: {HOST}:{server.port}\n"
        "  secret: regmirror-bench-not-secret\n"
        "  headers:\n"
        "    X-Content-Type-Options: [nosniff]\n"
    )
    server.log_file = open(server.log_path, "wb")  # noqa: SIM115 (open while the server runs; stop() closes)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    server.proc = subprocess.Popen(
        [binary, "serve", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=server.log_file,
        stderr=subprocess.STDOUT,
        env=env,
    )
    return server


def start_nginx(work: Path, images: dict[str, Image], workers: int) -> Server:
    """nginx serving each step's bytes as a static file at the step's own path."""
    server = Server(NGINX, free_port(), work / "nginx-root", work / "nginx" / "error.log")
    lay_out_static(server.data_dir, images)
    command = nginx_static(work / "nginx", server.data_dir, server.port, workers)
    server.log_file = open(work / "nginx.log", "wb")  # noqa: SIM115 (open while the server runs; stop() closes)
    server.proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=server.log_file, stderr=subprocess.STDOUT
    )
    server.static = True
    server.log_path.touch()
    return server


def lay_out_static(root: Path, images: dict[str, Image]) -> None:
    """Each image's manifest at ``/v2/<repo>/manifests/<tag>`` and its layer at
    ``/v2/<repo>/blobs/<digest>`` under ``root`` (the big layer hard-linked, not copied)."""
    for image in images.values():
        manifests = root / "v2" / image.repo / "manifests"
        blobs = root / "v2" / image.repo / "blobs"
        manifests.mkdir(parents=True)
        blobs.mkdir(parents=True)
        (manifests / image.tag).write_bytes(image.manifest)
        layer = image.layer
        if layer.path is not None:
            os.link(layer.path, blobs / layer.digest)
        else:
            assert layer.data is not None
            (blobs / layer.digest).write_bytes(layer.data)


async def wait_ready(session: aiohttp.ClientSession, server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    for _ in range(int(START_TIMEOUT / 0.1) + 1):
        assert server.proc is not None
        if server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with {server.proc.returncode}; "
                f"see {server.log_path}:\n{tail(server.log_path)}"
            )
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(
                f"{server.base}/v2/", timeout=aiohttp.ClientTimeout(total=2)
            ) as r:
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    raise BenchError(f"{server.name} did not answer GET /v2/ within {START_TIMEOUT:.0f} s")


def stop(server: Server) -> None:
    proc = server.proc
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
    if server.log_file is not None:
        server.log_file.close()
        server.log_file = None


def tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def count_tracebacks(path: Path, offset: int) -> int:
    """Python tracebacks the server logged after ``offset`` (a few come from wrk
    cutting connections when its time is up; many mean a server-side bug)."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return sum(line.startswith(b"Traceback ") for line in handle)


# -- content ------------------------------------------------------------------


@dataclass
class Blob:
    digest: str
    size: int
    data: bytes | None = None  # small blobs
    path: Path | None = None  # big blobs, streamed from disk


def blob_of(data: bytes) -> Blob:
    return Blob("sha256:" + hashlib.sha256(data).hexdigest(), len(data), data=data)


def big_blob(path: Path, size: int, seed: int) -> Blob:
    """``size`` pseudo-random bytes written to ``path`` in chunks, hashed on the way."""
    rng, digest, left = random.Random(seed), hashlib.sha256(), size
    with open(path, "wb") as handle:
        for _ in range(size // WRITE_CHUNK + 1):
            if left <= 0:
                break
            chunk = rng.randbytes(min(WRITE_CHUNK, left))
            digest.update(chunk)
            handle.write(chunk)
            left -= len(chunk)
    return Blob("sha256:" + digest.hexdigest(), size, path=path)


@dataclass
class Image:
    repo: str
    tag: str
    config: Blob
    layer: Blob
    manifest: bytes = b""
    digest: str = ""

    def __post_init__(self) -> None:
        doc = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V2,
            "config": {
                "mediaType": CONFIG_V1,
                "size": self.config.size,
                "digest": self.config.digest,
            },
            "layers": [
                {"mediaType": LAYER_GZIP, "size": self.layer.size, "digest": self.layer.digest}
            ],
        }
        self.manifest = json.dumps(doc, indent=3).encode()
        self.digest = "sha256:" + hashlib.sha256(self.manifest).hexdigest()


def make_images(work: Path, big_mib: int) -> dict[str, Image]:
    rng = random.Random(20240601)

    def config_for(layer: Blob) -> Blob:
        doc = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [layer.digest]},
        }
        return blob_of(json.dumps(doc).encode())

    small_layer = blob_of(rng.randbytes(4096))
    mib_layer = blob_of(rng.randbytes(MIB))
    big_layer = big_blob(work / "big.bin", big_mib * MIB, seed=42)
    return {
        "small": Image("bench/small", "latest", config_for(small_layer), small_layer),
        "mib": Image("bench/mib", "latest", config_for(mib_layer), mib_layer),
        "big": Image("bench/big", "latest", config_for(big_layer), big_layer),
    }


# -- pushing (registry HTTP API: monolithic upload, then the manifest) -------------


async def push_blob(session: aiohttp.ClientSession, base: str, repo: str, blob: Blob) -> None:
    async with session.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
        if r.status != 202 or "Location" not in r.headers:
            raise BenchError(f"POST upload to {base} {repo}: {r.status} {await r.text()}")
        location = r.headers["Location"]
    if location.startswith("/"):
        location = base + location
    if not location.startswith(f"http://{HOST}:"):
        raise BenchError(f"upload Location {location!r} is not on {HOST}")
    sep = "&" if "?" in location else "?"
    url = URL(f"{location}{sep}digest={blob.digest.replace(':', '%3A')}", encoded=True)
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)}
    with contextlib.ExitStack() as stack:
        body: Any = blob.data
        if body is None:
            assert blob.path is not None
            body = stack.enter_context(open(blob.path, "rb"))  # noqa: ASYNC230 (streamed by aiohttp)
        async with session.put(url, data=body, headers=headers) as r:
            if r.status != 201:
                raise BenchError(
                    f"PUT blob {blob.digest} to {base} {repo}: {r.status} {await r.text()}"
                )


async def push_image(session: aiohttp.ClientSession, server: Server, image: Image) -> None:
    for blob in (image.config, image.layer):
        await push_blob(session, server.base, image.repo, blob)
    url = f"{server.base}/v2/{image.repo}/manifests/{image.tag}"
    async with session.put(url, data=image.manifest, headers={"Content-Type": MANIFEST_V2}) as r:
        if r.status != 201:
            raise BenchError(
                f"PUT manifest {image.repo}:{image.tag} to {server.name}: "
                f"{r.status} {await r.text()}"
            )
    async with session.get(url, headers={"Accept": DOCKER_ACCEPT}) as r:
        body = await r.read()
        if r.status != 200 or body != image.manifest:
            raise BenchError(
                f"{server.name} serves {image.repo}:{image.tag} as {r.status} "
                f"{body[:200]!r}, not the manifest pushed"
            )
        if r.headers.get("Docker-Content-Digest") != image.digest:
            raise BenchError(
                f"{server.name}: manifest digest {r.headers.get('Docker-Content-Digest')}"
                f" != {image.digest}"
            )


async def fetch(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], size: int, digest: str | None
) -> None:
    """GET ``url`` to the end: warms the server's file pages (the VM drops idle ones after
    ~30 s) and checks status, length and, when ``digest`` is given, the content."""
    hasher = hashlib.sha256() if digest else None
    got = 0
    async with session.get(url, headers=headers, timeout=READ_TIMEOUT) as r:
        if r.status != 200:
            raise BenchError(f"GET {url}: {r.status} {(await r.read())[:300]!r}")
        async for chunk in r.content.iter_chunked(MIB):
            got += len(chunk)
            if hasher is not None:
                hasher.update(chunk)
    if got != size:
        raise BenchError(f"GET {url}: {got} bytes, expected {size}")
    if hasher is not None and "sha256:" + hasher.hexdigest() != digest:
        raise BenchError(f"GET {url}: content does not match {digest}")


# -- measuring ------------------------------------------------------------------


@dataclass
class Step:
    key: str
    label: str
    path: str
    headers: dict[str, str]
    body_size: int
    digest: str | None
    connections: int


@dataclass
class Run:
    step: str
    server: str
    round: int
    wrk: dict[str, Any]
    server_cpu_s: float
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    server_log_tracebacks: int = 0
    figures: dict[str, float] = field(default_factory=dict)
    # regmirror: the share of the step's requests its fast path answered (server.fast_path)
    fast_share: float | None = None


def steps_for(images: dict[str, Image], args: argparse.Namespace) -> list[Step]:
    small, mib, big = images["small"], images["mib"], images["big"]
    return [
        Step(
            "manifest",
            "manifest GET by tag",
            f"/v2/{small.repo}/manifests/{small.tag}",
            {"Accept": DOCKER_ACCEPT},
            len(small.manifest),
            small.digest,
            args.connections,
        ),
        Step(
            "blob_1mib",
            "1 MiB blob GET",
            f"/v2/{mib.repo}/blobs/{mib.layer.digest}",
            {},
            mib.layer.size,
            mib.layer.digest,
            args.connections,
        ),
        Step(
            "blob_big",
            f"{args.big_mib} MiB blob GET",
            f"/v2/{big.repo}/blobs/{big.layer.digest}",
            {},
            big.layer.size,
            big.layer.digest,
            args.big_connections,
        ),
    ]


async def run_wrk(url: str, step: Step, args: argparse.Namespace) -> dict[str, Any]:
    threads = min(args.threads, step.connections)
    cmd = [
        args.wrk,
        f"-t{threads}",
        f"-c{step.connections}",
        f"-d{args.duration}s",
        "--timeout",
        f"{args.timeout}s",
        "--latency",
        "-s",
        str(WRK_LUA),
    ]
    for name, value in step.headers.items():
        cmd += ["-H", f"{name}: {value}"]
    cmd.append(url)
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), args.duration + WRK_GRACE)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise BenchError(f"wrk ran more than {args.duration + WRK_GRACE:.0f} s: {' '.join(cmd)}")
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    text = out.decode(errors="replace")
    for line in text.splitlines():
        if line.startswith("WRKJSON "):
            return dict(json.loads(line[len("WRKJSON ") :]))
    raise BenchError(
        f"wrk gave no report (exit {proc.returncode}):\n{text}\n{err.decode(errors='replace')}"
    )


def check(run: Run, step: Step) -> None:
    w = run.wrk
    errors = w["errors"]
    where = f"{step.label} on {run.server} (round {run.round})"
    if errors["status"]:
        raise BenchError(f"{where}: {errors['status']} non-2xx/3xx responses of {w['requests']}")
    socket_errors = {k: v for k, v in errors.items() if k != "status" and v}
    if socket_errors:
        raise BenchError(
            f"{where}: socket errors {socket_errors} (timeouts mean the --timeout "
            f"was too short for this load; p99 would be wrong)"
        )
    if w["requests"] < 1:
        raise BenchError(f"{where}: no request completed in {args_duration_hint(w)}")
    if w["bytes"] < w["requests"] * step.body_size:
        raise BenchError(
            f"{where}: {w['bytes']} bytes read for {w['requests']} responses of "
            f"{step.body_size} bytes: bodies were cut short"
        )


def args_duration_hint(w: dict[str, Any]) -> str:
    return f"{w['duration_us'] / 1e6:.1f} s"


def figures(run: Run, step: Step) -> dict[str, float]:
    w = run.wrk
    seconds = w["duration_us"] / 1e6
    lat = w["latency_us"]
    out = {
        "req_per_s": w["requests"] / seconds,
        "MB_per_s": w["bytes"] / seconds / 1e6,
        "p50_ms": lat["p50"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "server_cpu_s": run.server_cpu_s,
        "server_cpu_us_per_req": run.server_cpu_s / w["requests"] * 1e6,
        "server_cpu_s_per_GB": run.server_cpu_s / (w["bytes"] / 1e9) if w["bytes"] else 0.0,
    }
    return out


async def fast_answers(session: aiohttp.ClientSession, server: Server) -> float | None:
    """regmirror's ``regmirror_http_fast_path_requests_total`` (every worker's); None for
    the other servers."""
    if server.name != REGMIRROR:
        return None
    async with session.get(server.base + "/metrics") as response:
        text = await response.text()
    for line in text.splitlines():
        if line.startswith("regmirror_http_fast_path_requests_total "):
            return float(line.split()[1])
    return 0.0


async def measure(
    session: aiohttp.ClientSession, server: Server, step: Step, rnd: int, args: argparse.Namespace
) -> Run:
    url = server.base + step.path
    # Warm the page cache (and check the answer) right before the timed run.
    await fetch(session, url, step.headers, step.body_size, step.digest)
    assert server.proc is not None
    load_before = os.getloadavg()
    log_offset = server.log_path.stat().st_size
    # utime + stime of the server and its workers (/proc/<pid>/stat), before and after
    tree = process_tree(server.proc.pid)
    fast_before = await fast_answers(session, server)
    cpu_before = cpu_seconds(tree)
    result = await run_wrk(url, step, args)
    cpu = cpu_seconds(tree) - cpu_before
    run = Run(step.key, server.name, rnd, result, cpu, load_before, os.getloadavg())
    if fast_before is not None:
        answered = (await fast_answers(session, server) or 0.0) - fast_before
        run.fast_share = answered / max(1, int(result["requests"]))
    run.server_log_tracebacks = count_tracebacks(server.log_path, log_offset)
    if server.proc.poll() is not None:
        raise BenchError(f"{server.name} died during {step.label}:\n{tail(server.log_path)}")
    check(run, step)
    run.figures = figures(run, step)
    return run


async def profile(
    session: aiohttp.ClientSession, server: Server, step: Step, args: argparse.Namespace
) -> Path:
    """One extra, uncounted wrk run of ``step`` with py-spy recording regmirror."""
    assert server.proc is not None
    out_dir = Path(args.profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = {"raw": "txt", "flamegraph": "svg", "speedscope": "json"}[args.profile_format]
    target = out_dir / f"{step.key}.{suffix}"
    await fetch(session, server.base + step.path, step.headers, step.body_size, None)
    spy = await asyncio.create_subprocess_exec(
        args.py_spy,
        "record",
        "--pid",
        str(server.proc.pid),
        "--duration",
        str(args.duration),
        "--rate",
        "250",
        "--nonblocking",
        "--threads",
        "--subprocesses",
        "--format",
        args.profile_format,
        "--output",
        str(target),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await asyncio.sleep(1.0)  # let py-spy attach before the load starts
        run = await run_wrk(server.base + step.path, step, args)
        out, _ = await asyncio.wait_for(spy.communicate(), args.duration + PY_SPY_GRACE)
    finally:
        if spy.returncode is None:
            spy.kill()
            await spy.wait()
    if spy.returncode != 0:
        raise BenchError(f"py-spy failed ({spy.returncode}): {out.decode(errors='replace')}")
    rps = run["requests"] / (run["duration_us"] / 1e6)
    print(f"  profiled {step.label}: {rps:,.0f} req/s under py-spy -> {target}", flush=True)
    return target


# -- reporting ------------------------------------------------------------------


ROWS = [
    # step, figure, label, unit format, higher is better
    ("manifest", "req_per_s", "manifest GET by tag", "req/s", True),
    ("manifest", "p99_ms", "manifest GET by tag", "p99 ms", False),
    ("manifest", "server_cpu_us_per_req", "manifest GET by tag", "server CPU us/req", False),
    ("blob_1mib", "req_per_s", "1 MiB blob GET", "req/s", True),
    ("blob_1mib", "p99_ms", "1 MiB blob GET", "p99 ms", False),
    ("blob_1mib", "server_cpu_us_per_req", "1 MiB blob GET", "server CPU us/req", False),
    ("blob_big", "MB_per_s", "{big} MiB blob GET", "MB/s", True),
    ("blob_big", "server_cpu_s_per_GB", "{big} MiB blob GET", "server CPU s/GB", False),
]


def medians(runs: list[Run]) -> dict[tuple[str, str, str], float]:
    grouped: dict[tuple[str, str, str], list[float]] = {}
    for run in runs:
        for name, value in run.figures.items():
            grouped.setdefault((run.step, run.server, name), []).append(value)
    return {k: statistics.median(v) for k, v in grouped.items()}


def table(runs: list[Run], args: argparse.Namespace) -> str:
    med = medians(runs)
    head = (
        f"{'step':<20} {'figure':<18} {REGMIRROR:>12} {REGISTRY2:>12} {NGINX:>12} "
        f"{'vs r:2':>7} {'vs nginx':>8}  (ratio >1: regmirror better)"
    )
    lines = [head, "-" * len(head)]
    for step, fig, label, unit, higher in ROWS:
        ours = med.get((step, REGMIRROR, fig))
        if ours is None:
            continue
        cells, ratios = [], []
        for other in (REGISTRY2, NGINX):
            theirs = med.get((step, other, fig))
            cells.append(fmt(theirs) if theirs is not None else "-")
            ratios.append("-" if theirs is None else f"{ratio(ours, theirs, higher):.2f}")
        lines.append(
            f"{label.format(big=args.big_mib):<20} {unit:<18} {fmt(ours):>12} {cells[0]:>12} "
            f"{cells[1]:>12} {ratios[0]:>7} {ratios[1]:>8}"
        )
    return "\n".join(lines)


def ratio(ours: float, theirs: float, higher_is_better: bool) -> float:
    """Above 1 when regmirror did better: ours/theirs for throughput, theirs/ours for costs."""
    if higher_is_better:
        return ours / theirs if theirs else float("inf")
    return theirs / ours if ours else float("inf")


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def machine_load(label: str) -> str:
    try:
        top = subprocess.run(
            ["top", "-bn1", "-w", "200"], capture_output=True, text=True, timeout=20, check=False
        ).stdout.splitlines()
    except (OSError, subprocess.TimeoutExpired):
        top = []
    return f"--- {label}: load average {os.getloadavg()}, {os.cpu_count()} CPUs\n" + "\n".join(
        top[:15]
    )


# -- main ---------------------------------------------------------------------


async def bench(args: argparse.Namespace, work: Path, servers: list[Server]) -> dict[str, Any]:
    """Everything between generating content and stopping the servers; ``servers`` gets
    each server as it starts so that the caller can stop it whatever happens."""
    print(f"generating content in {work} ({args.big_mib} MiB blob)...", flush=True)
    images = await asyncio.to_thread(make_images, work, args.big_mib)
    report: dict[str, Any] = {"args": {k: v for k, v in vars(args).items()}, "runs": []}
    try:
        regmirror = start_regmirror(work, args.regmirror_workers)
        servers.append(regmirror)
        servers.append(start_registry2(work, args.registry_binary))
        if not args.no_nginx:
            servers.append(start_nginx(work, images, args.nginx_workers))
        connector = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=connector, timeout=PUSH_TIMEOUT) as session:
            for server in servers:
                await wait_ready(session, server)
                print(
                    f"{server.name} ready on {server.base} (pid {server.proc.pid if server.proc else '?'})",
                    flush=True,
                )
            for server in servers:
                if server.static:
                    continue
                started = time.monotonic()
                for image in images.values():
                    await push_image(session, server, image)
                print(
                    f"pushed 3 images to {server.name} in {time.monotonic() - started:.1f} s",
                    flush=True,
                )
            steps = steps_for(images, args)
            print(machine_load("before the runs"), flush=True)
            report["load_before"] = machine_load("before")
            runs: list[Run] = []
            for rnd in range(1, args.rounds + 1):
                turn = (rnd - 1) % len(servers)
                order = servers[turn:] + servers[:turn]
                for step in steps:
                    if step.key not in args.steps:
                        continue
                    for server in order:
                        run = await measure(session, server, step, rnd, args)
                        runs.append(run)
                        f = run.figures
                        print(
                            f"round {rnd} {step.label:<18} {server.name:<12} "
                            f"{f['req_per_s']:>9,.1f} req/s {f['MB_per_s']:>9,.1f} MB/s "
                            f"p99 {f['p99_ms']:>8.2f} ms  cpu {f['server_cpu_s']:5.1f} s  "
                            f"load {run.loadavg_before[0]:.2f}->{run.loadavg_after[0]:.2f}"
                            + (
                                f"  fast path {run.fast_share:.0%}"
                                if run.fast_share is not None
                                else ""
                            )
                            + (
                                f"  server log: {run.server_log_tracebacks} tracebacks"
                                if run.server_log_tracebacks
                                else ""
                            ),
                            flush=True,
                        )
            report["runs"] = [dataclasses.asdict(r) for r in runs]
            print(machine_load("after the runs"), flush=True)
            report["load_after"] = machine_load("after")
            report["table"] = table(runs, args)
            print()
            print(report["table"])
            loads = [r.loadavg_before[0] for r in runs] + [r.loadavg_after[0] for r in runs]
            print(
                f"1-min load average during the runs: {min(loads):.2f} .. {max(loads):.2f} "
                f"on {os.cpu_count()} CPUs (wrk itself uses up to {args.threads} of them)"
            )
            if args.profile:
                print(f"profiling regmirror with py-spy into {args.profile}...", flush=True)
                report["profiles"] = []
                for step in steps:
                    if step.key in args.profile_steps:
                        target = await profile(session, regmirror, step, args)
                        report["profiles"].append(str(target))
    finally:
        for server in servers:
            stop(server)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of every step on both servers (3)")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    p.add_argument(
        "--connections", type=int, default=64, help="wrk connections, manifest and 1 MiB (64)"
    )
    p.add_argument(
        "--big-connections", type=int, default=4, help="wrk connections for the big blob (4)"
    )
    p.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    p.add_argument("--timeout", type=int, default=10, help="wrk per-request timeout, seconds (10)")
    p.add_argument("--big-mib", type=int, default=256, help="size of the big blob in MiB (256)")
    p.add_argument(
        "--steps",
        default="manifest,blob_1mib,blob_big",
        help="comma-separated subset of manifest,blob_1mib,blob_big",
    )
    p.add_argument(
        "--json", metavar="FILE", help="also write every raw figure to FILE ('-': stdout)"
    )
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the rounds, one extra py-spy-recorded run per --profile-steps step",
    )
    p.add_argument("--profile-steps", default="manifest,blob_1mib")
    p.add_argument(
        "--profile-format",
        choices=["raw", "flamegraph", "speedscope"],
        default="raw",
        help="raw = collapsed stacks, read with bench/profile_summary.py (raw)",
    )
    p.add_argument("--work-dir", help="parent for the temporary data dirs (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep data dirs and server logs")
    p.add_argument(
        "--registry-binary", default=shutil.which("docker-registry") or "/usr/bin/docker-registry"
    )
    p.add_argument("--wrk", default=shutil.which("wrk") or "/usr/bin/wrk")
    p.add_argument(
        "--nginx-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="nginx static's worker processes (one per core)",
    )
    p.add_argument(
        "--regmirror-workers",
        type=int,
        default=0,
        help="regmirror's server.workers (0, as its default: one per CPU; 1: one process)",
    )
    p.add_argument("--no-nginx", action="store_true", help="leave out the nginx static column")
    p.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    args = p.parse_args(argv)
    args.steps = [s for s in args.steps.split(",") if s]
    args.profile_steps = [s for s in args.profile_steps.split(",") if s]
    known = {"manifest", "blob_1mib", "blob_big"}
    for s in args.steps + args.profile_steps:
        if s not in known:
            p.error(f"unknown step {s!r}; choose from {sorted(known)}")
    if not 1 <= args.rounds <= 100 or not 1 <= args.duration <= 3600:
        p.error("--rounds must be 1..100 and --duration 1..3600")
    if args.connections < 1 or args.big_connections < 1 or args.threads < 1:
        p.error("--connections, --big-connections and --threads must be positive")
    for tool in (args.wrk, args.registry_binary):
        if not os.access(tool, os.X_OK):
            p.error(f"{tool} is not executable")
    if not args.no_nginx and not shutil.which("nginx"):
        p.error("the nginx static column needs nginx (apt-get install nginx-light), or --no-nginx")
    if args.nginx_workers < 1:
        p.error("--nginx-workers must be positive")
    if args.regmirror_workers < 0:
        p.error("--regmirror-workers must be 0 (one per CPU) or more")
    if args.profile and not shutil.which(args.py_spy):
        p.error("--profile needs py-spy (pip install py-spy)")
    return args


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM ends the run as Ctrl-C does: the finally blocks stop both servers."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="regmirror-bench-", dir=args.work_dir))
    signal.signal(signal.SIGTERM, _interrupt)
    servers: list[Server] = []
    try:
        report = asyncio.run(bench(args, work, servers))
    except BenchError as exc:
        print(f"\nBENCH FAILED: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        for server in servers:
            stop(server)  # again: a no-op unless the event loop died before its finally
        if args.keep:
            print(f"kept {work} (data dirs, server logs)", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        text = json.dumps(report, indent=1, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            print(f"raw figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

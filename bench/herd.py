#!/usr/bin/env python3
"""A thundering herd of identical blob pulls against pull-through mirrors, side by side.

One origin (registry:2 holding ``herd/big:latest`` with one random ``--size-mib`` layer)
sits behind a counting TCP proxy that counts, per mirror, the requests it forwards and
the bytes the origin sends back. For every ``--clients`` N and every mirror, a fresh
mirror with a cold cache serves one manifest GET and one config-blob GET (what docker
does before it pulls layers), then N clients GET the uncached layer at the same moment.

Mirrors: ``regmirror`` (``upstreams: [{url: <its proxy>}]``; then the same N pulls again
from its warm cache), ``registry`` (registry:2 with ``proxy.remoteurl``) and ``nginx``
(``proxy_cache`` with ``proxy_cache_lock on``). Before them, ``ceiling``: the same herd
against nginx serving the file straight from disk, which is the most this load
generator can take in on this machine; a mirror whose wall time is near it is measured
at the generator's limit, not its own.

Clients run in ``--procs`` processes, each an asyncio loop with N/procs connections.
A body counts as correct when it has exactly the blob's length and the same bytes as
the pushed blob, whose sha256 is the digest (checked once when it is made): that is the
same test as sha256(body) == digest at memcmp speed (about 50 GB/s here, against
1.3 GB/s for sha256 on one idle core). ``--verify sha256`` hashes every body instead.

    python bench/herd.py                                   # all three mirrors, N=50,200
    python bench/herd.py --mirrors registry,nginx --clients 50 --size-mib 64
    python bench/herd.py --json herd.json                  # also every figure as JSON

Only 127.0.0.1 is used. Every client has ``--timeout``; every wait has a deadline.
Temporary directories (origin, caches, logs) are deleted at the end unless ``--keep``.
See bench/README.md, section "Thundering herd".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from harness import HOST, MIB, TreeMemory, make_blob, percentile, process_tree, status_kib

from tests.support.processes import free_port, run_distribution, run_regmirror

REPO = "herd/big"
TAG = "latest"
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MIRRORS = ("regmirror", "registry", "nginx")
READY_TIMEOUT = 30.0  # seconds for a server (or the proxy, or a client process) to be up
STOP_TIMEOUT = 10.0  # seconds from SIGTERM to SIGKILL
SETTLE = 1.0  # seconds of quiet between herds, so one herd's tail does not load the next
CHUNK = MIB  # client read buffer and push chunk

TARGETS = {  # what the regmirror design promises under a herd (see bench/README.md)
    "cold_over_warm_wall": 1.15,
    "ttfb_p99_s": 0.2,
    "upstream_blob_gets": 1,
    "peak_rss_mib": 150,
}

# registry:2's proxy.remoteurl and nginx's proxy_pass both point at a counting proxy port.
NGINX_CONF = """\
daemon off;
{user}worker_processes {workers};
worker_rlimit_nofile 16384;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy_temp;
    fastcgi_temp_path {prefix}/fastcgi_temp;
    uwsgi_temp_path {prefix}/uwsgi_temp;
    scgi_temp_path {prefix}/scgi_temp;
{http_extra}
    server {{
        listen {host}:{port} backlog=4096;
        location = /__herd/ready {{ return 200 "ready\\n"; }}
{locations}
    }}
}}
"""

# The mirror: a shared cache, one fill per key. proxy_cache_lock_timeout and
# proxy_cache_lock_age are left at their defaults (5s each): a request that waited 5s for
# the lock goes upstream itself (and its answer is not cached); a fill older than 5s lets
# one more request go upstream.
NGINX_CACHE_HTTP = """\
    proxy_cache_path {prefix}/cache levels=1:2 keys_zone=herd:10m max_size={max_size}
                     inactive=1h use_temp_path=off;
"""
NGINX_CACHE_LOCATION = """\
        location /v2/ {{
            proxy_pass http://{host}:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_buffering on;
            proxy_cache herd;
            proxy_cache_key $request_method$uri;
            proxy_cache_valid 200 1h;
            proxy_cache_lock on;
            proxy_read_timeout 300s;
        }}
"""
# The generator's ceiling: the blob straight from disk with sendfile.
NGINX_STATIC_LOCATION = """\
        location = /v2/{repo}/blobs/{digest} {{
            default_type application/octet-stream;
            alias {blob_path};
        }}
"""


# ---------------------------------------------------------------- the blob and the origin


@dataclass
class Image:
    """The pushed image: its big layer on local disk (the reference bytes) and its config."""

    blob_path: Path
    digest: str  # sha256:<hex> of the layer
    size: int
    config: bytes
    config_digest: str
    manifest: bytes
    origin_path: Path | None = None  # the layer's data file in the origin's storage

    def warm_page_cache(self) -> None:
        """Read the reference file and the origin's copy once, so that no herd starts on
        a disk read (this VM drops idle file pages within a minute)."""
        for path in (self.blob_path, self.origin_path):
            if path is not None:
                with open(path, "rb") as f:
                    for _ in range(self.size // (8 * MIB) + 2):  # bounded
                        if not f.read(8 * MIB):
                            break


def make_image(work: Path, size: int) -> Image:
    blob_path = work / "blob"
    digest = make_blob(blob_path, size)
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest]},
            "config": {},
        }
    ).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_V2,
            "config": {"mediaType": CONFIG_V1, "size": len(config), "digest": config_digest},
            "layers": [{"mediaType": LAYER_GZIP, "size": size, "digest": digest}],
        },
        indent=3,
    ).encode()
    return Image(blob_path, digest, size, config, config_digest, manifest)


async def _push_blob(session: aiohttp.ClientSession, base: str, digest: str, body: Any) -> None:
    async with session.post(f"{base}/v2/{REPO}/blobs/uploads/") as resp:
        if resp.status != 202:
            raise RuntimeError(f"start upload: HTTP {resp.status} {await resp.text()}")
        location = resp.headers["Location"]
    url = location if location.startswith("http") else base + location
    sep = "&" if "?" in url else "?"
    headers = {"Content-Type": "application/octet-stream"}
    async with session.put(f"{url}{sep}digest={digest}", data=body, headers=headers) as resp:
        if resp.status != 201:
            raise RuntimeError(f"finish upload: HTTP {resp.status} {await resp.text()}")


async def push_image(base: str, image: Image) -> None:
    """Push the layer (streamed from its file), the config and the manifest to ``base``."""
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with open(image.blob_path, "rb") as body:  # noqa: ASYNC230 (aiohttp reads it in a thread)
            await _push_blob(session, base, image.digest, body)
        await _push_blob(session, base, image.config_digest, image.config)
        url = f"{base}/v2/{REPO}/manifests/{TAG}"
        headers = {"Content-Type": MANIFEST_V2}
        async with session.put(url, data=image.manifest, headers=headers) as resp:
            if resp.status != 201:
                raise RuntimeError(f"push manifest: HTTP {resp.status} {await resp.text()}")


# ---------------------------------------------------------------- the counting proxy

_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$")
_BLOB_PATH = re.compile(r"^/v2/.+/blobs/(sha256:[0-9a-f]{64})$")
_MANIFEST_PATH = re.compile(r"^/v2/.+/manifests/[^/]+$")


@dataclass
class UpstreamCounts:
    """What one mirror asked of the origin, as seen by its counting proxy port."""

    blob_gets: dict[str, int] = field(default_factory=dict)  # digest -> GETs
    requests: dict[str, int] = field(default_factory=dict)  # "GET blob" -> count
    bytes_down: int = 0  # origin -> mirror, headers included
    bytes_up: int = 0  # mirror -> origin
    connections: int = 0
    peak_connections: int = 0
    open_connections: int = 0

    def count_request(self, method: str, path: str) -> None:
        path = path.split("?", 1)[0]
        blob = _BLOB_PATH.match(path)
        kind = "blob" if blob else "manifest" if _MANIFEST_PATH.match(path) else "other"
        key = f"{method} {kind}"
        self.requests[key] = self.requests.get(key, 0) + 1
        if blob and method == "GET":
            self.blob_gets[blob[1]] = self.blob_gets.get(blob[1], 0) + 1


class _MirrorSide(asyncio.Protocol):
    """A connection from a mirror; its bytes are spliced to a new origin connection."""

    def __init__(self, counts: UpstreamCounts, origin: tuple[str, int]):
        self.counts = counts
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.peer: _OriginSide | None = None
        self.backlog: list[bytes] = []
        self.closed = False
        self.head = bytearray()
        self.skip = 0  # request body bytes still to pass through unparsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=8 * MIB)
        self.counts.connections += 1
        self.counts.open_connections += 1
        self.counts.peak_connections = max(
            self.counts.peak_connections, self.counts.open_connections
        )
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, peer = await loop.create_connection(lambda: _OriginSide(self), *self.origin)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.peer = peer
        assert peer.transport is not None
        for chunk in self.backlog:
            peer.transport.write(chunk)
        self.backlog.clear()
        if self.closed:
            peer.transport.close()

    def data_received(self, data: bytes) -> None:
        self.counts.bytes_up += len(data)
        self._parse(data)
        if self.peer is None or self.peer.transport is None:
            self.backlog.append(data)
        else:
            self.peer.transport.write(data)

    def _parse(self, data: bytes) -> None:
        """Count request lines; mirrors send heads and (rarely) bodies with a length."""
        if self.skip >= len(data):
            self.skip -= len(data)
            return
        self.head += data[self.skip :]
        self.skip = 0
        for _ in range(1000):  # bounded: at most this many requests in one read
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                del self.head[: max(0, len(self.head) - 64 * 1024)]  # never grows unbounded
                return
            lines = bytes(self.head[:end]).split(b"\r\n")
            del self.head[: end + 4]
            match = _REQUEST_LINE.match(lines[0])
            if match:
                self.counts.count_request(match[1].decode(), match[2].decode("latin-1"))
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and value.strip().isdigit():
                    self.skip = int(value)
            if self.skip:
                taken = min(self.skip, len(self.head))
                del self.head[:taken]
                self.skip -= taken

    def pause_writing(self) -> None:  # the mirror is slow: stop reading from the origin
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.counts.open_connections -= 1
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class _OriginSide(asyncio.Protocol):
    def __init__(self, mirror: _MirrorSide):
        self.mirror = mirror
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=8 * MIB)

    def data_received(self, data: bytes) -> None:
        self.mirror.counts.bytes_down += len(data)
        assert self.mirror.transport is not None
        self.mirror.transport.write(data)

    def pause_writing(self) -> None:
        assert self.mirror.transport is not None
        self.mirror.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.mirror.transport is not None
        self.mirror.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.mirror.transport is not None:
            self.mirror.transport.close()


def _proxy_main(names: list[str], origin_port: int, conn: Any) -> None:
    """The counting proxy process: one listening port per name; answers ``conn``."""
    asyncio.run(_proxy_serve(names, origin_port, conn))


def _mirror_side(
    counts: dict[str, UpstreamCounts], name: str, origin: tuple[str, int]
) -> _MirrorSide:
    return _MirrorSide(counts[name], origin)  # the counts in force when the mirror connects


async def _proxy_serve(names: list[str], origin_port: int, conn: Any) -> None:
    loop = asyncio.get_running_loop()
    counts = {name: UpstreamCounts() for name in names}
    servers, ports = [], {}
    for name in names:
        server = await loop.create_server(
            functools.partial(_mirror_side, counts, name, (HOST, origin_port)),
            HOST,
            0,
            backlog=4096,
        )
        servers.append(server)
        ports[name] = server.sockets[0].getsockname()[1]
    conn.send(ports)
    while True:
        command, name = await loop.run_in_executor(None, conn.recv)
        if command == "stop":
            break
        if command == "reset":
            counts[name] = UpstreamCounts()
            conn.send(None)
        elif command == "counts":
            usage = resource.getrusage(resource.RUSAGE_SELF)
            conn.send((dataclasses.asdict(counts[name]), usage.ru_utime + usage.ru_stime))
    for server in servers:
        server.close()


class CountingProxy:
    """The parent's handle on the counting proxy process."""

    def __init__(self, names: list[str], origin_port: int):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_proxy_main, args=(names, origin_port, child), daemon=True
        )
        self._process.start()
        self.ports: dict[str, int] = self._recv()

    def _recv(self) -> Any:
        if not self._conn.poll(READY_TIMEOUT):
            raise RuntimeError("counting proxy did not answer")
        return self._conn.recv()

    def url(self, name: str) -> str:
        return f"http://{HOST}:{self.ports[name]}"

    def reset(self, name: str) -> None:
        self._conn.send(("reset", name))
        self._recv()

    def counts(self, name: str) -> tuple[UpstreamCounts, float]:
        """The counts for ``name`` and the proxy process's CPU seconds so far."""
        self._conn.send(("counts", name))
        data, cpu = self._recv()
        return UpstreamCounts(**data), float(cpu)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(("stop", ""))
        self._process.join(STOP_TIMEOUT)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(STOP_TIMEOUT)


# ---------------------------------------------------------------- the herd (client processes)


@dataclass
class ClientResult:
    status: int = 0
    ttfb: float | None = None  # seconds from the herd's start to the first body byte
    total: float | None = None  # seconds from the herd's start to the end of the body
    nbytes: int = 0
    correct: bool = False  # exact length and the blob's bytes
    wrong: bool = False  # a body of full length (or more) whose bytes differ
    error: str = ""


@dataclass
class ClientSpec:
    url: str
    clients: int
    timeout: float
    blob_path: str
    size: int
    verify: str  # "compare" or "sha256"
    digest: str


def _client_main(spec: ClientSpec, conn: Any) -> None:
    """One client process: load the reference bytes, report ready, wait for the start
    moment (a ``time.monotonic()`` value: the clock is system-wide on Linux), pull."""
    reference = Path(spec.blob_path).read_bytes() if spec.verify == "compare" else b""
    conn.send("ready")
    if not conn.poll(READY_TIMEOUT * 2):
        return
    start_at = conn.recv()
    before = resource.getrusage(resource.RUSAGE_SELF)
    results = asyncio.run(_herd(spec, start_at, reference))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    conn.send(([dataclasses.asdict(r) for r in results], cpu))


async def _herd(spec: ClientSpec, start_at: float, reference: bytes) -> list[ClientResult]:
    timeout = aiohttp.ClientTimeout(total=spec.timeout)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=connector, read_bufsize=CHUNK, auto_decompress=False
    ) as session:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        pulls = [_pull(session, spec, start_at, reference) for _ in range(spec.clients)]
        return list(await asyncio.gather(*pulls))


async def _pull(
    session: aiohttp.ClientSession, spec: ClientSpec, start_at: float, reference: bytes
) -> ClientResult:
    result = ClientResult()
    hasher = hashlib.sha256() if spec.verify == "sha256" else None
    loop = asyncio.get_running_loop()
    try:
        async with session.get(spec.url) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return result
            offset, same = 0, True
            async for chunk in resp.content.iter_any():
                if result.ttfb is None:
                    result.ttfb = time.monotonic() - start_at
                if hasher is not None:  # hashlib drops the GIL on big buffers
                    await loop.run_in_executor(None, hasher.update, chunk)
                elif same and not reference.startswith(chunk, offset):
                    same = False
                offset += len(chunk)
            result.nbytes = offset
            if hasher is not None:
                same = "sha256:" + hasher.hexdigest() == spec.digest
            result.correct = same and offset == spec.size
            result.wrong = not result.correct and offset >= spec.size
            if offset < spec.size:
                result.error = f"short body: {offset} of {spec.size} bytes"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        result.total = time.monotonic() - start_at
    return result


@dataclass
class HerdOutcome:
    results: list[ClientResult]
    wall: float  # herd start to the last client's end
    generator_cpu: float  # CPU seconds of all client processes during the herd
    load_before: float
    load_after: float


def run_herd(
    url: str | list[str],
    image: Image,
    *,
    clients: int,
    procs: int,
    timeout: float,
    verify: str,
) -> HerdOutcome:
    """``clients`` concurrent GETs of ``url`` from ``procs`` processes, started together.
    Several URLs (hosts of a fleet): ``clients`` GETs of each, one process per URL."""
    ctx = multiprocessing.get_context("spawn")
    if isinstance(url, str):
        procs = max(1, min(procs, clients))
        shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        targets = [(url, share) for share in shares]
    else:
        targets = [(each, clients) for each in url]
    workers = []
    for target, share in targets:
        spec = ClientSpec(
            target, share, timeout, str(image.blob_path), image.size, verify, image.digest
        )
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_client_main, args=(spec, child), daemon=True)
        process.start()
        workers.append((process, parent))
    try:
        for process, conn in workers:
            if not conn.poll(READY_TIMEOUT):
                raise RuntimeError("a client process did not start")
            conn.recv()
        load_before = os.getloadavg()[0]
        start_at = time.monotonic() + 0.2
        for _, conn in workers:
            conn.send(start_at)
        results: list[ClientResult] = []
        cpu = 0.0
        deadline = start_at + timeout + 60.0
        for process, conn in workers:
            if not conn.poll(max(1.0, deadline - time.monotonic())):
                raise RuntimeError(f"client process {process.pid} gave no results in time")
            rows, used = conn.recv()
            results += [ClientResult(**row) for row in rows]
            cpu += used
    finally:
        for process, _ in workers:
            process.join(STOP_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join(STOP_TIMEOUT)
    wall = max((r.total or 0.0) for r in results)
    return HerdOutcome(results, wall, cpu, load_before, os.getloadavg()[0])


# ---------------------------------------------------------------- mirrors under test


@dataclass
class Mirror:
    name: str
    url: str
    pid: int


def _http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


@contextlib.contextmanager
def _quiet_stop(server: contextlib.AbstractContextManager[Any], log: Path) -> Iterator[Any]:
    """Enter ``server``; on the way out send what tests.support prints (the server's log
    tail) to ``log`` instead of our stderr."""
    value = server.__enter__()
    try:
        yield value
    except BaseException:
        with open(log, "a") as out, contextlib.redirect_stderr(out):
            if not server.__exit__(*sys.exc_info()):
                raise
    else:
        with open(log, "a") as out, contextlib.redirect_stderr(out):
            server.__exit__(None, None, None)


@contextlib.contextmanager
def run_nginx(work: Path, *, http_extra: str, locations: str, workers: int) -> Iterator[Mirror]:
    """nginx in the foreground (``daemon off``) with everything under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    fill = {"prefix": work, "host": HOST, "port": port}
    # As root, workers would run as nobody and could not read our 0700 temp directory.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = NGINX_CONF.format(
        user=user,
        workers=workers,
        http_extra=http_extra.format(**fill),
        locations=locations.format(**fill),
        **fill,
    )
    (work / "nginx.conf").write_text(conf)
    with open(work / "stderr.log", "ab") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [
                "nginx",
                "-p",
                str(work),
                "-c",
                str(work / "nginx.conf"),
                "-e",
                str(work / "error.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while _http_status(url + "/__herd/ready") != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {(work / 'error.log').read_text()}")
            time.sleep(0.05)
        yield Mirror("nginx", url, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)


@contextlib.contextmanager
def start_mirror(name: str, work: Path, upstream: str, *, size: int) -> Iterator[Mirror]:
    """A fresh mirror with an empty cache in ``work``, pulling through ``upstream``."""
    if name == "regmirror":
        env = {"REGMIRROR_UPSTREAMS__0__URL": upstream}
        stop_log = work.parent / f"{work.name}.stop.log"
        with _quiet_stop(run_regmirror(work, env=env), stop_log) as server:
            yield Mirror(name, server.url, server.process.pid)
    elif name == "registry":
        stop_log = work.parent / f"{work.name}.stop.log"
        registry = run_distribution(work, proxy_url=upstream, extra={"log": {"level": "warn"}})
        with _quiet_stop(registry, stop_log) as server:
            yield Mirror(name, server.url, server.process.pid)
    elif name == "nginx":
        port = upstream.rpartition(":")[2]
        http_extra = NGINX_CACHE_HTTP.replace("{max_size}", str(4 * size))
        locations = NGINX_CACHE_LOCATION.replace("{upstream_port}", port)
        with run_nginx(
            work, http_extra=http_extra, locations=locations, workers=os.cpu_count() or 2
        ) as mirror:
            yield mirror
    else:
        raise ValueError(f"unknown mirror {name!r}; choose from {', '.join(MIRRORS)}")


def prime(mirror: Mirror, image: Image) -> str:
    """What docker asks before the layers: the manifest by tag, then the config blob.
    An empty string when both answered 200 with the right bytes, else what went wrong."""
    manifest = urllib.request.Request(
        f"{mirror.url}/v2/{REPO}/manifests/{TAG}", headers={"Accept": MANIFEST_V2}
    )
    config = urllib.request.Request(f"{mirror.url}/v2/{REPO}/blobs/{image.config_digest}")
    for what, request, expected in (
        ("manifest", manifest, image.manifest),
        ("config blob", config, image.config),
    ):
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                body = resp.read()
        except urllib.error.HTTPError as exc:
            return f"{what} GET: HTTP {exc.code} {exc.read()[:200]!r}"
        except (urllib.error.URLError, OSError) as exc:
            return f"{what} GET: {exc}"
        if body != expected:
            return f"{what} GET: wrong body ({len(body)} bytes)"
    return ""


# ---------------------------------------------------------------- figures


@dataclass
class Row:
    clients: int
    mirror: str  # ceiling, regmirror, registry, nginx
    phase: str  # cold, warm or static
    correct: int = 0
    failed: int = 0  # errors, non-200, short bodies
    wrong: int = 0  # full-length bodies with other bytes
    wall_s: float | None = None
    ttfb_p50_s: float | None = None
    ttfb_p99_s: float | None = None
    total_p50_s: float | None = None
    total_p99_s: float | None = None
    client_mb_s: float | None = None  # bytes all clients received per second of wall time
    upstream_blob_gets: int | None = None  # GETs of the big layer's digest
    upstream_mib: float | None = None  # bytes the origin sent to the mirror
    upstream_requests: dict[str, int] = field(default_factory=dict)
    proxy_cpu_s: float | None = None
    rss_before_mib: float | None = None  # summed over the tree just before the herd
    peak_rss_mib: float | None = None  # sampled, summed over the process tree
    hwm_mib: float | None = None  # summed VmHWM (since process start)
    mirror_cpu_s: float | None = None  # the mirror's process tree, during the herd
    generator_cpu_s: float | None = None
    generator_cores: float | None = None  # generator CPU seconds per second of wall time
    load_1min: float | None = None
    errors: list[str] = field(default_factory=list)  # a few distinct ones
    skipped: str = ""


def summarize(row: Row, outcome: HerdOutcome) -> Row:
    results = outcome.results
    row.correct = sum(r.correct for r in results)
    row.wrong = sum(r.wrong for r in results)
    row.failed = len(results) - row.correct - row.wrong
    row.wall_s = outcome.wall
    ttfbs = [r.ttfb for r in results if r.ttfb is not None]
    totals = [r.total for r in results if r.correct and r.total is not None]
    row.ttfb_p50_s, row.ttfb_p99_s = percentile(ttfbs, 50), percentile(ttfbs, 99)
    row.total_p50_s, row.total_p99_s = percentile(totals, 50), percentile(totals, 99)
    received = sum(r.nbytes for r in results)
    row.client_mb_s = received / outcome.wall / 1e6 if outcome.wall > 0 else None
    row.generator_cpu_s = outcome.generator_cpu
    row.generator_cores = outcome.generator_cpu / outcome.wall if outcome.wall > 0 else None
    row.load_1min = outcome.load_after
    row.errors = sorted({r.error for r in results if r.error})[:3]
    return row


def _fmt(value: Any, spec: str = ".2f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


COLUMNS = [
    ("N", "clients", "d"),
    ("mirror", "label", ""),
    ("up GETs", "upstream_blob_gets", "d"),
    ("up MiB", "upstream_mib", ".0f"),
    ("wall s", "wall_s", ".2f"),
    ("TTFB p50", "ttfb_p50_s", ".3f"),
    ("TTFB p99", "ttfb_p99_s", ".3f"),
    ("total p99", "total_p99_s", ".2f"),
    ("MB/s", "client_mb_s", ".0f"),
    ("bad", "bad", ""),
    ("RSS0 MiB", "rss_before_mib", ".0f"),
    ("RSS MiB", "peak_rss_mib", ".0f"),
    ("HWM MiB", "hwm_mib", ".0f"),
    ("srv CPU s", "mirror_cpu_s", ".1f"),
    ("gen cores", "generator_cores", ".2f"),
    ("proxy CPU s", "proxy_cpu_s", ".1f"),
    ("load", "load_1min", ".1f"),
]


def table(rows: list[Row]) -> str:
    lines = []
    cells = []
    for row in rows:
        values = dataclasses.asdict(row)
        values["label"] = f"{row.mirror} {row.phase}".strip()
        values["bad"] = f"{row.failed}/{row.wrong}"
        if row.skipped:
            cells.append([str(row.clients), values["label"], f"skipped: {row.skipped}"])
            continue
        cells.append([_fmt(values[key], spec) for _, key, spec in COLUMNS])
    widths = [len(title) for title, _, _ in COLUMNS]
    for cell in cells:
        if len(cell) == len(COLUMNS):
            widths = [max(w, len(c)) for w, c in zip(widths, cell)]
    lines.append("  ".join(t.rjust(w) for (t, _, _), w in zip(COLUMNS, widths)))
    for cell in cells:
        if len(cell) == len(COLUMNS):
            lines.append("  ".join(c.rjust(w) for c, w in zip(cell, widths)))
        else:
            lines.append("  ".join(cell[:2]).rjust(widths[0] + widths[1] + 2) + "  " + cell[2])
    return "\n".join(lines)


def _find(rows: list[Row], n: int, mirror: str, phase: str) -> Row | None:
    for row in rows:
        if row.clients == n and row.mirror == mirror and row.phase == phase and not row.skipped:
            return row
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


_CHECKS = {  # key -> (how the target reads, whether a value meets it)
    "cold_over_warm_wall": ("<= 1.15", lambda v: v <= TARGETS["cold_over_warm_wall"]),
    "ttfb_p99_s": ("<= 0.2", lambda v: v <= TARGETS["ttfb_p99_s"]),
    "upstream_blob_gets": ("= 1", lambda v: v == TARGETS["upstream_blob_gets"]),
    "peak_rss_mib": ("<= 150", lambda v: v <= TARGETS["peak_rss_mib"]),
}


def _targets(rows: list[Row], n: int, name: str) -> dict[str, Any]:
    cold, warm = _find(rows, n, name, "cold"), _find(rows, n, name, "warm")
    nginx = _find(rows, n, "nginx", "cold")
    if cold is None:
        return {}
    rss = [v for v in (cold.peak_rss_mib, cold.hwm_mib, warm and warm.peak_rss_mib) if v]
    return {
        "cold_over_warm_wall": _ratio(cold.wall_s, warm.wall_s if warm else None),
        "cold_over_nginx_cold_wall": _ratio(cold.wall_s, nginx.wall_s if nginx else None),
        "ttfb_p99_s": cold.ttfb_p99_s,
        "upstream_blob_gets": cold.upstream_blob_gets,
        "peak_rss_mib": max(rss) if rss else None,
    }


def _against_ceiling(rows: list[Row], n: int, ceiling: Row) -> tuple[list[str], dict[str, float]]:
    assert ceiling.wall_s
    lines = [
        (
            f"N={n} generator ceiling: {_fmt(ceiling.client_mb_s, '.0f')} MB/s into the "
            f"clients, {ceiling.wall_s:.2f} s wall, {_fmt(ceiling.generator_cores)} cores "
            "busy in the clients (nginx static, sendfile)"
        )
    ]
    data = {}
    for row in rows:
        if row.clients != n or row.mirror == "ceiling" or row.skipped or not row.wall_s:
            continue
        slack = row.wall_s / ceiling.wall_s
        note = (
            "within 15% of the ceiling: the generator may have set this pace (the mirror "
            "is at least this fast)"
            if slack < 1.15
            else "the mirror set this pace"
        )
        lines.append(
            f"  {row.mirror} {row.phase}: wall {slack:.2f}x the ceiling, clients "
            f"{_fmt(row.generator_cores)} cores busy; {note}"
        )
        data[f"{row.mirror}_{row.phase}_over_ceiling"] = slack
    return lines, data


def verdicts(rows: list[Row], clients: list[int]) -> tuple[list[str], dict[str, Any]]:
    """The ratios the targets care about, and whether the generator limited each figure."""
    lines: list[str] = []
    data: dict[str, Any] = {}
    for n in clients:
        entry: dict[str, Any] = {}
        if any(r.clients == n and r.mirror == "regmirror" for r in rows):
            figures = entry["regmirror"] = _targets(rows, n, "regmirror")
            lines.append(f"N={n} regmirror:" + ("" if figures else " no cold figures (skipped)"))
            for key, value in figures.items():
                goal, met = _CHECKS.get(key, ("", None))
                mark = "" if met is None or value is None else "  ok" if met(value) else "  MISSED"
                lines.append(
                    f"  {key:26s} {_fmt(value, '.3f'):>8s}"
                    + (f"  (target {goal}){mark}" if goal else "")
                )
        ceiling = _find(rows, n, "ceiling", "static")
        if ceiling is not None and ceiling.wall_s:
            more, entry["over_ceiling"] = _against_ceiling(rows, n, ceiling)
            lines += more
        data[str(n)] = entry
    return lines, data


# ---------------------------------------------------------------- the run


def settled_counts(proxy: CountingProxy, name: str) -> tuple[UpstreamCounts, float]:
    """The counts once the origin has sent nothing for 0.5 s (a mirror may go on filling
    after its clients are served), waiting at most 30 s."""
    counts, cpu = proxy.counts(name)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again, cpu = proxy.counts(name)
        if again.bytes_down == counts.bytes_down:
            return again, cpu
        counts = again
    return counts, cpu


def measure_mirror(
    name: str, n: int, args: argparse.Namespace, image: Image, proxy: CountingProxy, work: Path
) -> list[Row]:
    rows = [Row(n, name, "cold")]
    proxy.reset(name)
    with start_mirror(name, work, proxy.url(name), size=image.size) as mirror:
        problem = prime(mirror, image)
        if problem:
            rows[0].skipped = f"pull-through not working: {problem}"
            return rows
        url = f"{mirror.url}/v2/{REPO}/blobs/{image.digest}"
        phases = ["cold", "warm"] if name == "regmirror" else ["cold"]
        for phase in phases:
            row = rows[0] if phase == "cold" else Row(n, name, phase)
            if phase == "warm":
                rows.append(row)
                time.sleep(SETTLE)
            before, cpu_before = proxy.counts(name)
            image.warm_page_cache()
            row.rss_before_mib = (
                sum(status_kib(p, "VmRSS") for p in process_tree(mirror.pid)) / 1024
            )
            with TreeMemory(mirror.pid) as memory:
                outcome = run_herd(
                    url,
                    image,
                    clients=n,
                    procs=args.procs,
                    timeout=args.timeout,
                    verify=args.verify,
                )
            after, cpu_after = settled_counts(proxy, name)
            summarize(row, outcome)
            row.peak_rss_mib = memory.peak_kib / 1024
            row.hwm_mib = memory.hwm_kib() / 1024
            row.mirror_cpu_s = memory.cpu
            row.upstream_blob_gets = after.blob_gets.get(image.digest, 0) - before.blob_gets.get(
                image.digest, 0
            )
            # cold: everything since the mirror started (its prime included); warm: the herd
            base = UpstreamCounts() if phase == "cold" else before
            row.upstream_mib = (after.bytes_down - base.bytes_down) / MIB
            row.upstream_requests = {
                k: v - base.requests.get(k, 0)
                for k, v in after.requests.items()
                if v - base.requests.get(k, 0)
            }
            row.proxy_cpu_s = cpu_after - cpu_before
    return rows


def measure_ceiling(n: int, args: argparse.Namespace, image: Image, work: Path) -> Row:
    row = Row(n, "ceiling", "static")
    location = NGINX_STATIC_LOCATION.format(
        repo=REPO, digest=image.digest, blob_path=image.blob_path
    )
    location = location.replace("{", "{{").replace("}", "}}")
    with run_nginx(work, http_extra="", locations=location, workers=os.cpu_count() or 2) as server:
        url = f"{server.url}/v2/{REPO}/blobs/{image.digest}"
        image.warm_page_cache()
        with TreeMemory(server.pid) as memory:
            outcome = run_herd(
                url, image, clients=n, procs=args.procs, timeout=args.timeout, verify=args.verify
            )
        summarize(row, outcome)
        row.peak_rss_mib = memory.peak_kib / 1024
        row.hwm_mib = memory.hwm_kib() / 1024
        row.mirror_cpu_s = memory.cpu
    return row


def regmirror_pull_through_works(image: Image, proxy: CountingProxy, work: Path) -> str:
    """'' when a cold regmirror answers an uncached blob GET with the right bytes."""
    with start_mirror("regmirror", work, proxy.url("regmirror"), size=image.size) as mirror:
        return prime(mirror, image)


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="regmirror-herd-", dir=args.work_dir))
    print(f"# work dir {root}", file=sys.stderr)
    rows: list[Row] = []
    proxy: CountingProxy | None = None
    try:
        image = make_image(root, args.size_mib * MIB)
        print(f"# blob {image.digest} ({args.size_mib} MiB)", file=sys.stderr)
        with (
            _quiet_stop(
                run_distribution(root / "origin", extra={"log": {"level": "warn"}}),
                root / "origin.stop.log",
            ) as origin,
        ):
            asyncio.run(push_image(origin.url, image))
            hexdigest = image.digest.partition(":")[2]
            image.origin_path = (
                origin.data_dir / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest
            ) / "data"
            proxy = CountingProxy(list(args.mirrors), origin.port)
            for n in args.clients:
                if args.ceiling_runs:
                    print(
                        f"# N={n} ceiling (nginx static), best of {args.ceiling_runs}",
                        file=sys.stderr,
                    )
                    tries = []
                    for i in range(args.ceiling_runs):
                        tries.append(measure_ceiling(n, args, image, root / f"ceiling-{n}-{i}"))
                        _progress(tries[-1])
                        time.sleep(SETTLE)
                    rows.append(min(tries, key=lambda r: (r.failed + r.wrong, r.wall_s or 1e9)))
                for name in args.mirrors:
                    print(f"# N={n} {name}", file=sys.stderr)
                    work = root / f"{name}-{n}"
                    rows += measure_mirror(name, n, args, image, proxy, work)
                    for row in rows[-2:]:
                        if row.mirror == name and row.clients == n:
                            _progress(row)
                    if not args.keep:
                        shutil.rmtree(work, ignore_errors=True)  # free its cache's disk now
                    time.sleep(SETTLE)
    finally:
        if proxy is not None:
            proxy.stop()
        if args.keep:
            print(f"# kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    lines, ratios = verdicts(rows, args.clients)
    return rows, {"ratios": ratios, "verdict_lines": lines}


def _progress(row: Row) -> None:
    if row.skipped:
        print(f"#   {row.mirror} {row.phase}: skipped: {row.skipped}", file=sys.stderr)
        return
    print(
        f"#   {row.mirror} {row.phase}: wall {row.wall_s:.2f}s, ttfb p99 "
        f"{_fmt(row.ttfb_p99_s, '.3f')}s, ok {row.correct}/{row.clients}, upstream GETs "
        f"{_fmt(row.upstream_blob_gets)}, load {_fmt(row.load_1min, '.1f')}"
        + (f", errors {row.errors}" if row.errors else ""),
        file=sys.stderr,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="50,200", help="herd sizes N, comma-separated (50,200)")
    p.add_argument("--size-mib", type=int, default=256, help="size of the layer in MiB (256)")
    p.add_argument(
        "--mirrors",
        default=",".join(MIRRORS),
        help=f"comma-separated, from {','.join(MIRRORS)} (all)",
    )
    p.add_argument("--procs", type=int, default=3, help="client processes (3)")
    p.add_argument(
        "--timeout", type=float, default=180.0, help="per-client total timeout in seconds (180)"
    )
    p.add_argument(
        "--verify",
        choices=["compare", "sha256"],
        default="compare",
        help="body check: byte comparison with the pushed blob (default) or sha256",
    )
    p.add_argument(
        "--ceiling-runs",
        type=int,
        default=2,
        help="herds against nginx static per N; the best is the ceiling (2; 0: none)",
    )
    p.add_argument(
        "--probe",
        action="store_true",
        help="only say whether regmirror's pull-through answers an uncached blob",
    )
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE ('-': stdout)")
    p.add_argument("--work-dir", help="parent of the temporary directory (default: $TMPDIR)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and logs")
    args = p.parse_args(argv)
    args.clients = list(dict.fromkeys(int(c) for c in args.clients.split(",") if c.strip()))
    args.mirrors = [m.strip() for m in args.mirrors.split(",") if m.strip()]
    unknown = set(args.mirrors) - set(MIRRORS)
    if unknown or not args.clients or min(args.clients) < 1:
        p.error(f"bad --mirrors {sorted(unknown)} or --clients")
    return args


def probe(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="regmirror-herd-probe-", dir=args.work_dir))
    proxy = None
    try:
        image = make_image(root, MIB)
        with _quiet_stop(run_distribution(root / "origin"), root / "origin.stop.log") as origin:
            asyncio.run(push_image(origin.url, image))
            proxy = CountingProxy(["regmirror"], origin.port)
            problem = regmirror_pull_through_works(image, proxy, root / "regmirror")
    finally:
        if proxy is not None:
            proxy.stop()
        shutil.rmtree(root, ignore_errors=True)
    print("regmirror pull-through: " + ("works" if not problem else f"NOT working: {problem}"))
    return 0 if not problem else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe:
        return probe(args)
    started = time.time()
    rows, extra = run(args)
    load = os.getloadavg()
    header = (
        f"thundering herd: {args.size_mib} MiB layer, N in {args.clients}, "
        f"{args.procs} client processes, verify={args.verify}, "
        f"{os.cpu_count()} CPUs, load at end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}"
    )
    print(header)
    print(table(rows))
    print(
        "up GETs: origin GETs of the layer; up MiB: bytes the origin sent the mirror "
        "(manifest and config included); bad: failed/wrong bodies; RSS0: before the herd; "
        "RSS: peak of the sampled tree sum; HWM: summed VmHWM since the process started; "
        "srv CPU s: the mirror's CPU seconds in the herd; gen cores: client CPU s / wall s; load: 1-min load average after the herd"
    )
    print("\n".join(extra["verdict_lines"]))
    if args.json:
        doc = {
            "started": started,
            "args": {k: v for k, v in vars(args).items()},
            "cpus": os.cpu_count(),
            "nginx_cache_lock": {
                "proxy_cache_lock": "on",
                "proxy_cache_lock_timeout": "5s (default)",
                "proxy_cache_lock_age": "5s (default)",
            },
            "rows": [dataclasses.asdict(r) for r in rows],
            "ratios": extra["ratios"],
            "targets": TARGETS,
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

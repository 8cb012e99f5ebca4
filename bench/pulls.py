"""The pieces of the pull benchmarks (herd.py, fleet.py): the image and its origin, the
counting proxy in front of the origin, the herd of client processes, and a mirror primed
as docker primes it.

The origin is registry:2 holding ``herd/big:latest`` with one random layer. The counting
proxy is a TCP splice in its own process, one listening port per name (a mirror, or a
fleet scenario), counting per port the requests forwarded and the bytes the origin sends
back. Clients run in processes of their own, each an asyncio loop; a body counts as
correct when it has exactly the blob's length and the pushed bytes (``verify="sha256"``:
hashed instead). Only 127.0.0.1 is used; every wait has a deadline.
"""

from __future__ import annotations

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
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import aiohttp
from harness import HOST, MIB, make_blob, quiet_stop

from tests.support.processes import ServerProcess, run_distribution

REPO = "herd/big"
TAG = "latest"
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
READY_TIMEOUT = 30.0  # seconds for a server (or the proxy, or a client process) to be up
STOP_TIMEOUT = 10.0  # seconds from SIGTERM to SIGKILL
SETTLE = 1.0  # seconds of quiet between herds, so one herd's tail does not load the next
CHUNK = MIB  # client read buffer and push chunk


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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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


# ---------------------------------------------------------------- mirrors


@dataclass
class Mirror:
    name: str
    url: str
    pid: int


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


@contextlib.contextmanager
def origin_with_image(root: Path, size: int) -> Iterator[tuple[ServerProcess, Image]]:
    """registry:2 under ``root``/origin holding a fresh image with a layer of ``size``
    bytes (its data file in the origin's storage known, for page-cache warming)."""
    image = make_image(root, size)
    registry = run_distribution(root / "origin", extra={"log": {"level": "warn"}})
    with quiet_stop(registry, root / "origin.stop.log") as origin:
        asyncio.run(push_image(origin.url, image))
        hexdigest = image.digest.partition(":")[2]
        blobs = origin.data_dir / "docker/registry/v2/blobs/sha256"
        image.origin_path = blobs / hexdigest[:2] / hexdigest / "data"
        yield origin, image

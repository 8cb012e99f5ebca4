"""A full disk is an eviction trigger, not a failure.

The data directory is a small tmpfs the test mounts (as root), so ENOSPC is the
kernel's; where mounting is impossible, the same tests run on a simulated disk: the
free-space probe and the fill's writes see a capacity, and a write past it raises
OSError(ENOSPC) (``TEST_SIMULATED_DISK=1`` forces that here too). The app runs in process (aiohttp's test client) in front of a real
registry:2 upstream.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from regmirror import eviction, fill, layout
from regmirror.api.keys import METRICS, REGISTRY
from regmirror.config import CacheSettings, UpstreamSettings
from tests.support.api import blob_bytes, data_dir, get_blob_bytes, make_client, push_blob
from tests.support.processes import ServerProcess
from tests.support.upstream import push_blob as push_upstream
from tests.support.upstream import upstream_registry

__all__ = ["data_dir", "make_client", "upstream_registry"]

KiB = 1024
MiB = 1024 * KiB


def _usage(root: Path) -> int:
    """Bytes of the files under ``root``, rounded up to pages as tmpfs counts them."""
    total = 0
    for directory, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += -(-os.stat(os.path.join(directory, name)).st_size // 4096) * 4096
    return total


class SimulatedDisk:
    """A disk of ``capacity`` bytes holding only ``root``, for hosts that cannot mount."""

    def __init__(self, root: Path, capacity: int, monkeypatch: pytest.MonkeyPatch):
        self.root, self.capacity = root, capacity
        real_write = fill._write_at

        def write_at(fd: int, chunk: bytes, offset: int, hasher: Any) -> None:
            end = offset + len(chunk)
            grows = max(0, end - os.fstat(fd).st_size)
            if _usage(root) + grows > capacity:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write(fd, chunk, offset, hasher)

        monkeypatch.setattr(fill, "_write_at", write_at)
        monkeypatch.setattr(eviction, "disk_free", lambda _: max(0, capacity - _usage(root)))


@pytest.fixture
def small_disk(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[int], str]]:
    """``small_disk(capacity)``: make ``data_dir`` a filesystem of that many bytes; says
    which kind ("tmpfs" or "simulated")."""
    mounted: list[Path] = []

    def make(capacity: int) -> str:
        data_dir.mkdir(parents=True, exist_ok=True)
        mount = ["mount", "-t", "tmpfs", "-o", f"size={capacity}", "tmpfs", str(data_dir)]
        can_mount = os.geteuid() == 0 and not os.environ.get("TEST_SIMULATED_DISK")
        if can_mount and subprocess.run(mount, check=False, capture_output=True).returncode == 0:
            mounted.append(data_dir)
            return "tmpfs"
        SimulatedDisk(data_dir, capacity, monkeypatch)
        return "simulated"

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def mirror(make_client: Any, upstream: ServerProcess, **cache: Any) -> TestClient:
    cache.setdefault("min_free_bytes", 0)  # the default floor (1 GiB) is bigger than these disks
    client: TestClient = await make_client(
        upstreams=[UpstreamSettings(url=upstream.url)], cache=CacheSettings(**cache)
    )
    return client


def stored(data_dir: Path, digest: object) -> bool:
    return (data_dir / layout.blob_data(digest)).exists()  # type: ignore[arg-type]


def sample(client: TestClient, name: str, **labels: str) -> float:
    value = client.app[METRICS].registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def no_partials(data_dir: Path) -> bool:
    fills = data_dir / "fills"
    return not fills.exists() or not any(fills.iterdir())


async def test_a_fill_bigger_than_the_free_space_evicts_older_pulled_blobs_and_is_kept(
    small_disk, make_client, upstream_registry, http, data_dir
):
    kind = small_disk(8 * MiB)
    client = await mirror(make_client, upstream_registry)  # no budget: only the disk limits
    repo = f"full/{uuid.uuid4().hex[:8]}"
    older = []
    for seed in range(5):  # 5 x 1.25 MiB: most of the disk
        data = blob_bytes(5 * MiB // 4, seed)
        digest = await push_upstream(http, upstream_registry.url, repo, data)
        assert await get_blob_bytes(client, repo, str(digest)) == data
        older.append(digest)
    big = blob_bytes(3 * MiB, 99)
    digest = await push_upstream(http, upstream_registry.url, repo, big)

    assert await get_blob_bytes(client, repo, str(digest)) == big, kind

    await client.app[REGISTRY].cache.settle()
    assert stored(data_dir, digest)
    assert not stored(data_dir, older[0])  # the coldest went first...
    assert stored(data_dir, older[-1])  # ...and only as many as needed
    assert sample(client, "regmirror_evictions_total") >= 1
    assert sample(client, "regmirror_fills_total", result="ok") == 6
    assert no_partials(data_dir)


async def test_with_nothing_evictable_a_fill_streams_through_uncached(
    small_disk, make_client, upstream_registry, http, data_dir
):
    kind = small_disk(4 * MiB)
    client = await mirror(make_client, upstream_registry)
    for seed in range(3):  # pushed, no S3: the only copy, never evicted
        await push_blob(client, "local/app", blob_bytes(MiB, seed))
    repo = f"full/{uuid.uuid4().hex[:8]}"
    data = blob_bytes(2 * MiB, 7)
    digest = await push_upstream(http, upstream_registry.url, repo, data)

    assert await get_blob_bytes(client, repo, str(digest)) == data, kind

    assert not stored(data_dir, digest)
    assert no_partials(data_dir)
    assert sample(client, "regmirror_fills_total", result="stream_through") == 1
    stream_through = "regmirror_fill_stream_through_total"
    assert (
        sample(client, stream_through, reason="disk_full")
        + sample(client, stream_through, reason="over_budget")
        == 1
    )
    # And again: a pull that does not fit is served every time, never failed.
    assert await get_blob_bytes(client, repo, str(digest)) == data


async def test_a_fill_that_hits_enospc_mid_blob_finishes_streaming_through(
    small_disk, make_client, upstream_registry, http, data_dir, monkeypatch
):
    small_disk(4 * MiB)
    client = await mirror(make_client, upstream_registry)
    await push_blob(client, "local/app", blob_bytes(MiB, 1))  # pinned
    # Admission sees room (a probe that lies, as a racing writer would make it), the
    # writes find out otherwise half way through the blob.
    monkeypatch.setattr(eviction, "disk_free", lambda _: 64 * MiB)
    repo = f"full/{uuid.uuid4().hex[:8]}"
    data = blob_bytes(4 * MiB, 8)
    digest = await push_upstream(http, upstream_registry.url, repo, data)

    assert await get_blob_bytes(client, repo, str(digest)) == data

    assert not stored(data_dir, digest)
    assert no_partials(data_dir)
    assert sample(client, "regmirror_fill_stream_through_total", reason="disk_full") == 1


async def test_partial_fills_and_uploads_count_toward_the_budget(
    make_client, upstream_registry, http, data_dir
):
    client = await mirror(make_client, upstream_registry, max_bytes=4 * MiB)
    repo = f"budget/{uuid.uuid4().hex[:8]}"
    pulled = []
    for seed in range(3):
        data = blob_bytes(MiB, seed)
        digest = await push_upstream(http, upstream_registry.url, repo, data)
        assert await get_blob_bytes(client, repo, str(digest)) == data
        pulled.append(digest)
    cache = client.app[REGISTRY].cache
    await cache.settle()
    assert all(stored(data_dir, d) for d in pulled)  # 3 MiB: under the budget

    # An upload in progress takes 1.5 MiB of the disk the budget bounds...
    response = await client.post("/v2/local/app/blobs/uploads/")
    assert response.status == 202
    response = await client.patch(
        response.headers["Location"],
        data=blob_bytes(3 * MiB // 2, 50),
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status == 202
    # ...so the next pull makes room for both, not only for itself.
    data = blob_bytes(MiB // 2, 60)
    digest = await push_upstream(http, upstream_registry.url, repo, data)
    assert await get_blob_bytes(client, repo, str(digest)) == data
    await cache.settle()

    blobs = sum(p.stat().st_size for p in (data_dir / layout.ROOT / "blobs").rglob("data"))
    uploads = sum(p.stat().st_size for p in (data_dir / "uploads").rglob("*") if p.is_file())
    assert uploads >= 3 * MiB // 2
    assert blobs + uploads <= 4 * MiB * eviction.HIGH_WATERMARK
    assert not stored(data_dir, pulled[0])

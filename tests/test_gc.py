"""``regmirror gc``: offline reconciliation of a data directory, run as an operator runs it.

The store is made by the real app (pushes through the API), then given the leftovers a
crash leaves (an expired session, a frozen commit, partial and temp files, blobs no link
names); gc runs as a subprocess. It refuses to run beside a live server.
"""

# Fixtures imported from tests.support are redefined as test parameters.
# ruff: noqa: F811

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from regmirror import layout
from regmirror.digest import Digest
from regmirror.eviction import LOW_WATERMARK
from tests.support.api import (  # noqa: F401  (fixtures)
    blob_bytes,
    data_dir,
    get_blob_bytes,
    make_client,
    push_image,
    sha256,
)
from tests.support.processes import REPO_ROOT, free_port, regmirror_server  # noqa: F401

NAME = "lib/app"
DAY = 24 * 3600


def gc(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The real command line, as an operator runs it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REGMIRROR_")}
    environ.update(PYTHONPATH=str(REPO_ROOT), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "regmirror", "gc", "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=60,
        check=False,
    )


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def blob_file(data_dir: Path, digest: str) -> Path:
    return data_dir / layout.blob_data(Digest.parse(digest))


def put_blob_file(data_dir: Path, data: bytes, *, age: float = 0.0) -> str:
    """A blob in the store that no link names (as a kill -9 before its link leaves it)."""
    digest = sha256(data)
    path = blob_file(data_dir, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    aged(path, age)
    return digest


def aged(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


def proxied_blob(data_dir: Path, data: bytes, *, age: float) -> str:
    """A blob pulled through from an upstream: linked in the proxy tree only (evictable)."""
    digest = put_blob_file(data_dir, data, age=age)
    link = data_dir / "proxy" / layout.layer_link("upstream.example/lib/base", Digest.parse(digest))
    link.parent.mkdir(parents=True, exist_ok=True)
    link.write_text(digest)
    return digest


def leftovers(data_dir: Path) -> dict[str, Path]:
    """What crashes leave besides blobs: sessions, partial fills, temp files."""
    uploads = data_dir / "uploads"
    expired = uploads / ("a" * 32)
    expired.mkdir(parents=True)
    (expired / "data").write_bytes(b"x" * 1000)
    (expired / "info.json").write_text('{"name": "lib/app", "started_at": 0}')
    for path in (expired / "data", expired / "info.json"):
        aged(path, 2 * DAY)
    frozen = uploads / ("b" * 32 + ".commit")
    frozen.mkdir()
    (frozen / "data").write_bytes(b"y" * 500)
    live = uploads / ("c" * 32)
    live.mkdir()
    (live / "data").write_bytes(b"z" * 10)
    partial = data_dir / "fills" / "sha256-deadbeef.partial"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"p" * 300)
    temp = data_dir / layout.ROOT / "blobs" / "sha256" / "ab" / ".tmp-123-data"
    temp.parent.mkdir(parents=True, exist_ok=True)
    temp.write_bytes(b"t" * 200)
    return {"expired": expired, "frozen": frozen, "live": live, "partial": partial, "temp": temp}


async def stopped(client: TestClient) -> None:
    """Stop the in-process server: gc runs on a data directory no server holds."""
    await client.close()


async def test_gc_removes_leftovers_and_old_unreferenced_blobs_and_keeps_what_is_pushed(
    make_client, data_dir
):
    client = await make_client()
    image = await push_image(client, NAME)
    await stopped(client)
    left = leftovers(data_dir)
    old_orphan = put_blob_file(data_dir, blob_bytes(4000, 7), age=2 * DAY)
    new_orphan = put_blob_file(data_dir, blob_bytes(4000, 8))

    sessions_bytes = sum(
        p.stat().st_size for p in (*left["expired"].iterdir(), *left["frozen"].iterdir())
    )
    dry = report_of(gc(data_dir, "--dry-run", "--json"))

    assert dry["dry_run"] is True
    removed = {(r["kind"], r["path"]) for r in dry["removed"]}
    assert removed == {
        ("upload session", "uploads/" + left["expired"].name),
        ("upload session", "uploads/" + left["frozen"].name),
        ("partial file", "fills/" + left["partial"].name),
        ("partial file", str(left["temp"].relative_to(data_dir))),
        ("unreferenced blob", layout.blob_data(Digest.parse(old_orphan))),
    }
    assert dry["unreferenced_kept"] == 1  # the new orphan is within its grace period
    assert all(path.exists() for path in left.values())  # a dry run removes nothing
    assert blob_file(data_dir, old_orphan).exists()

    report = report_of(gc(data_dir, "--json"))

    assert {(r["kind"], r["path"]) for r in report["removed"]} == removed
    assert report["totals"]["upload session"] == {"count": 2, "bytes": sessions_bytes}
    for key in ("expired", "frozen", "partial", "temp"):
        assert not left[key].exists(), key
    assert left["live"].exists()  # a session within uploads.ttl stays
    assert not blob_file(data_dir, old_orphan).exists()
    assert blob_file(data_dir, new_orphan).exists()

    restarted = await make_client()
    for blob in (image.config, *image.layers):
        assert await get_blob_bytes(restarted, NAME, sha256(blob)) == blob
    response = await restarted.get(f"/v2/{NAME}/manifests/latest")
    assert response.status == 200
    assert hashlib.sha256(await response.read()).hexdigest() == image.digest.split(":")[1]


async def test_unreferenced_deletes_every_blob_no_link_names_and_only_those(make_client, data_dir):
    client = await make_client()
    image = await push_image(client, NAME)
    # A deleted manifest's blobs: no link names them any more.
    assert (await client.delete(f"/v2/{NAME}/manifests/{image.digest}")).status == 202
    kept = await push_image(client, "lib/kept", seed=3)
    await stopped(client)
    orphan = put_blob_file(data_dir, blob_bytes(2000, 9))

    report = report_of(gc(data_dir, "--unreferenced", "--json"))

    gone = {r["path"] for r in report["removed"] if r["kind"] == "unreferenced blob"}
    assert gone == {
        layout.blob_data(Digest.parse(orphan)),
        layout.blob_data(Digest.parse(image.digest)),
    }
    assert report["unreferenced_kept"] == 0
    for blob in (kept.config, *kept.layers, kept.raw):
        assert blob_file(data_dir, sha256(blob)).exists()
    # The deleted image's layers are still linked under lib/app (_layers): kept.
    for blob in image.layers:
        assert blob_file(data_dir, sha256(blob)).exists()


async def test_gc_trims_the_least_recently_used_evictable_blobs_to_the_low_watermark(
    make_client, data_dir
):
    client = await make_client()
    image = await push_image(client, NAME)  # pushed, no S3: the only copy, never trimmed
    await stopped(client)
    size = 10_000
    # Oldest first: proxied[0] is the least recently used.
    proxied = [proxied_blob(data_dir, blob_bytes(size, 20 + i), age=1000 - i) for i in range(6)]
    pushed_bytes = sum(len(b) for b in (image.config, *image.layers, image.raw))
    budget = 60_000
    want = int(budget * LOW_WATERMARK)  # 51,000: four proxied blobs over it, after two go
    env = {"REGMIRROR_CACHE__MAX_BYTES": str(budget), "REGMIRROR_CACHE__MIN_FREE_BYTES": "0"}

    dry = report_of(gc(data_dir, "--dry-run", "--json", env=env))
    report = report_of(gc(data_dir, "--json", env=env))

    expected_gone = []
    total = pushed_bytes + 6 * size
    for digest in proxied:
        if total <= want:
            break
        expected_gone.append(layout.blob_data(Digest.parse(digest)))
        total -= size
    for result in (dry, report):
        evicted = [r["path"] for r in result["removed"] if r["kind"] == "evicted blob"]
        assert evicted == expected_gone
        assert result["cache_bytes"] == total <= want
        assert result["low_watermark_bytes"] == want
    for blob in (image.config, *image.layers, image.raw):
        assert blob_file(data_dir, sha256(blob)).exists()


def test_gc_refuses_to_run_beside_a_live_server(regmirror_server, tmp_path):
    server = regmirror_server()
    frozen = server.data_dir / "uploads" / ("d" * 32 + ".commit")
    frozen.mkdir(parents=True)  # to a running server, maybe a commit in progress

    result = gc(server.data_dir, "--json")

    assert result.returncode == 3
    assert "server is running" in result.stderr
    assert result.stdout == ""
    assert frozen.exists()


def test_a_server_does_not_start_while_gc_holds_the_data_directory(tmp_path):
    from regmirror import datalock

    data = tmp_path / "data"
    data.mkdir()
    held = datalock.acquire(data, exclusive=True)
    try:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("REGMIRROR_")}
        environ["PYTHONPATH"] = str(REPO_ROOT)
        port = free_port()
        argv = [sys.executable, "-m", "regmirror", "serve", "--data-dir", str(data)]
        argv += ["--listen", f"127.0.0.1:{port}"]
        result = subprocess.run(
            argv, capture_output=True, text=True, env=environ, timeout=30, check=False
        )
    finally:
        held.release()
    assert result.returncode == 2
    assert "gc is running" in result.stderr
